"""The alerting feed and the lease, against a real PostgreSQL: every stored message reaches the
rules exactly once across restarts, a pump's own alarm overtakes other pumps' backlog without
breaking any pump's order, and a stale holder cannot write after a takeover."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingest.alerts._lease import Lease, LeaseLost
from ingest.alerts._service import Alerting
from ingest.alerts.tests.test_service import FakeEngine, settings, store, telemetry
from pumpfleet import contract
from pumpfleet.contract import Message
from pumpfleet.findings import Finding

pytestmark = pytest.mark.integration

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)


def reading(pump_id: str, seq: int, reservoir_ml: float = 9.0) -> Message:
    return telemetry(pump_id, seq, reservoir_ml, BASE + timedelta(minutes=seq))


class Recorder(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int, str]] = []

    def observe(self, msg: Message) -> list[Finding]:
        self.seen.append((msg.pump_id, msg.seq, msg.kind))
        return super().observe(msg)


def stall(pump_id: str, seq: int) -> Message:
    body = {
        "v": 1,
        "pump_id": pump_id,
        "time": (BASE + timedelta(minutes=seq)).isoformat(),
        "seq": seq,
        "event": "motor_stall",
    }
    return contract.decode(contract.topic(pump_id, "event"), json.dumps(body))


async def test_every_stored_message_reaches_the_rules_once_across_a_restart(
    conn: asyncpg.Connection, db: str
) -> None:
    first_half = [reading("P-1", s, 9.0 - s / 100) for s in range(30)]
    second_half = [reading("P-1", s, 9.0 - s / 100) for s in range(30, 60)]
    await store(db, first_half, judged=False)
    a = Recorder()
    alerting = Alerting(settings(db), a, profile_factory=None)
    await alerting.start()
    assert a.warmed == []  # still in the feed: judged from there, not replayed
    assert await alerting.consume_once(limit=1000) == 30
    await alerting.close()
    await store(db, second_half, judged=False)
    # A restart: history that was judged is replayed quietly; the rest comes from the feed.
    b = Recorder()
    again = Alerting(settings(db), b, profile_factory=None)
    await again.start()
    while await again.consume_once(limit=7):
        pass
    await again.close()
    assert [s for _, s, _ in a.seen] == list(range(30))
    assert [s for _, s, _ in b.warmed] == list(range(30))
    assert [s for _, s, _ in b.seen] == list(range(30, 60))  # in order, each once
    assert await conn.fetchval("SELECT count(*) FROM alert_feed") == 0


async def test_an_alarm_overtakes_other_pumps_backlog_but_not_its_own_pump(
    conn: asyncpg.Connection, db: str
) -> None:
    backlog = [reading("P-2", s) for s in range(500)]
    own = [reading("P-1", s) for s in range(3)]
    await store(db, [*backlog, *own, stall("P-1", 3)], judged=False)
    engine = Recorder()
    alerting = Alerting(settings(db), engine, profile_factory=None)
    await alerting.start()
    assert await alerting.consume_once(limit=50) == 50
    await alerting.close()
    first = engine.seen
    # The stalled pump's rows, in its own order, all in the first batch...
    assert [(s, k) for p, s, k in first if p == "P-1"] == [
        (0, "telemetry"),
        (1, "telemetry"),
        (2, "telemetry"),
        (3, "event"),
    ]
    # ...and the rest of the batch is the oldest of the backlog, in order.
    assert [s for p, s, _ in first if p == "P-2"] == list(range(46))


async def test_a_stale_holder_is_fenced_out_after_a_takeover(db: str) -> None:
    a, b = Lease(ttl_s=1.0), Lease(ttl_s=1.0)
    conn_a = await asyncpg.connect(a.dsn(db))
    conn_b = await asyncpg.connect(b.dsn(db))
    try:
        assert await a.try_acquire(conn_a)
        assert not await b.try_acquire(conn_b)
        # A is "frozen" inside a transaction holding the lease row, past its lease.
        tx = conn_a.transaction()
        await tx.start()
        await a.check(conn_a)
        await conn_b.execute("SELECT pg_sleep(1.2)")
        assert await b.try_acquire(conn_b)  # ended A's sessions instead of waiting on them
        assert conn_a.is_closed() or not await _alive(conn_a)
        conn_a = await asyncpg.connect(a.dsn(db))
        async with conn_a.transaction():
            with pytest.raises(LeaseLost):
                await a.check(conn_a)
        assert not await a.renew(conn_a)
        assert await b.renew(conn_b)
    finally:
        for c in (conn_a, conn_b):
            if not c.is_closed():
                c.terminate()


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
        return False
    return True
