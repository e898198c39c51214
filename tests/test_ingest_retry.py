"""Database outages are waited out with tenacity's backoff, logged once when they start and once
when they end, and never end a process: the ingester's connect and batch write, the alerting
book's connection, the notifier's pauses. Fast: stand-in connections, no servers."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from tenacity import wait_none

import ingest._service
from ingest import DeadLetter, Ingester, WriteResult
from ingest.alerts._notify import Notifier
from ingest.alerts._service import Alerting, build_engine
from pumpfleet.settings import AlertSettings, Settings


class FakeConn:
    """What the retry paths touch of an asyncpg connection."""

    def __init__(self) -> None:
        self.terminated = False

    def is_closed(self) -> bool:
        return self.terminated

    def terminate(self) -> None:
        self.terminated = True

    async def close(self) -> None:
        self.terminated = True


def _settings() -> Settings:
    return Settings(
        database_url="postgresql://pumpfleet@127.0.0.1:9/pumpfleet",
        mqtt={"url": "mqtt://127.0.0.1:9"},
    )


def _said(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith(text))


async def test_a_database_absent_at_the_start_is_logged_once_and_once_when_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="pumpfleet.ingest")
    ing = Ingester(_settings())
    ing._reconnecting = ing._reconnecting.copy(wait=wait_none())
    opened: list[FakeConn] = []

    async def open_db() -> Any:
        if len(opened) < 3:
            opened.append(FakeConn())
            raise ConnectionRefusedError("connection refused")
        opened.append(FakeConn())
        return opened[-1]

    monkeypatch.setattr(ing, "_open_db", open_db)
    conn = await ing._connect_db()
    assert conn is opened[-1] and len(opened) == 4
    assert _said(caplog, "database unavailable; retrying") == 1  # not once per retry
    assert _said(caplog, "database connected") == 1
    assert ing.stats.db_errors == 3 and ing._db_ok


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
        ConnectionResetError("connection reset by peer"),
    ],
    ids=type,
)
async def test_a_transient_write_error_drops_the_connection_and_the_batch_is_written(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    caplog.set_level(logging.INFO, logger="pumpfleet.ingest")
    ing = Ingester(_settings())
    ing._rewriting = ing._rewriting.copy(wait=wait_none())
    ing._revoked_read_at = time.monotonic()  # no look-up of revoked pumps
    first = FakeConn()
    ing._db, ing._db_ok = first, True
    fresh: list[FakeConn] = []

    async def open_db() -> Any:
        fresh.append(FakeConn())
        return fresh[-1]

    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> WriteResult:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise error
        return WriteResult(dead_letters=1)

    monkeypatch.setattr(ing, "_open_db", open_db)
    monkeypatch.setattr(ingest._service, "write_batch", flaky)
    dead = DeadLetter("pumps/P-1/telemetry", b"{", "not JSON", datetime.now(UTC))
    batch = [ingest._service._Item(1, 1, 1, time.time(), dead.topic, dead.payload, None, dead)]
    result = await ing._write(batch)
    assert result.dead_letters == 1 and calls == 3
    assert first.terminated and fresh[0].terminated and not fresh[1].terminated
    assert ing._db is fresh[1] and ing._db_ok
    assert ing.stats.db_errors == 2  # each failed write counted
    assert _said(caplog, "batch write failed; retrying") == 2


async def test_a_data_error_is_not_retried_as_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the transient classes are retried: anything else is the caller's to handle."""
    ing = Ingester(_settings())
    ing._db = FakeConn()
    ing._revoked_read_at = time.monotonic()

    async def refuse(*args: Any, **kwargs: Any) -> WriteResult:
        raise ValueError("a bug, not an outage")

    monkeypatch.setattr(ingest._service, "write_batch", refuse)
    dead = DeadLetter("pumps/P-1/telemetry", b"{", "not JSON", datetime.now(UTC))
    batch = [ingest._service._Item(1, 1, 1, time.time(), dead.topic, dead.payload, None, dead)]
    with pytest.raises(ValueError, match="a bug"):
        await ing._write(batch)
    assert ing.stats.db_errors == 0


async def test_alerting_waits_out_an_outage_logging_it_once_and_its_end_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="pumpfleet.alerts")
    settings = _settings()
    alerting = Alerting(settings, build_engine(settings))
    opened: list[FakeConn] = []
    refusals = 1

    async def open_conn() -> Any:
        nonlocal refusals
        if opened and refusals:  # the reconnect after the first failure is refused once
            refusals -= 1
            raise ConnectionRefusedError("connection refused")
        opened.append(FakeConn())
        return opened[-1]

    async def load(conn: Any) -> int:
        return 0

    monkeypatch.setattr(alerting, "_open", open_conn)
    monkeypatch.setattr(alerting.book, "load", load)
    tries = 0

    async def action(conn: Any) -> str:
        nonlocal tries
        tries += 1
        if tries <= 2:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert await alerting._with_db(action) == "done"
    assert tries == 3 and len(opened) == 3 and not opened[-1].terminated
    assert all(c.terminated for c in opened[:-1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["alerting: database error; retrying"]  # once, not once per retry
    assert _said(caplog, "alerting: database reachable again") == 1


def test_a_receivers_pause_grows_exponentially_up_to_the_cap() -> None:
    notifier = Notifier(AlertSettings(retry_min_s=1.0, retry_max_s=8.0), "postgresql://x@y/z")
    assert 1.0 <= notifier._pause_s(1) <= 2.0
    assert 4.0 <= notifier._pause_s(3) <= 5.0
    assert notifier._pause_s(10) == 8.0
