"""The ingester against real mosquitto and PostgreSQL: nothing lost, nothing doubled.

Every test counts rows in the database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pubtools import Publisher, forget_session, stream, telemetry

from ingest import Ingester
from pumpfleet import contract, schema
from pumpfleet import stack as stack_mod
from pumpfleet.contract import Message
from pumpfleet.settings import Settings
from pumpfleet.testing import until

pytestmark = pytest.mark.integration


@pytest.fixture
async def db_url(database_url: str) -> str:
    await schema.migrate(database_url)
    return database_url


@pytest.fixture
def client_ids(stack: stack_mod.StackInfo) -> Any:
    """Fresh MQTT client ids for a test's ingesters; their sessions are removed afterwards."""
    made: list[str] = []

    def new() -> str:
        made.append(f"ingest-test-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for cid in made:
        forget_session(stack.mqtt_url_for("ingest"), cid)


def settings_for(
    stack_info: stack_mod.StackInfo, db_url: str, client_id: str, **ingest: Any
) -> Settings:
    # A lab: the T- pumps (and other tests' retained statuses) publish unprovisioned, so this
    # opts in to registering them; tests/test_security.py covers the default, quarantine.
    return Settings(
        database_url=db_url,
        mqtt={"url": stack_info.mqtt_url_for("ingest")},
        ingest={
            "client_id": client_id,
            "metrics_port": 0,
            "flush_ms": 50,
            "unknown_pumps": "register",
            **ingest,
        },
    )


@asynccontextmanager
async def running(settings: Settings, on_commit: Any = None) -> AsyncIterator[Ingester]:
    ingester = Ingester(settings, on_commit)
    task = asyncio.create_task(ingester.run())
    try:
        await ingester.wait_connected(timeout=20)
        yield ingester
    finally:
        ingester.stop()
        await asyncio.wait_for(task, timeout=60)


async def count(db_url: str, sql: str = "SELECT count(*) FROM telemetry") -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def wait_rows(
    db_url: str, n: int, timeout: float = 60.0, sql: str = "SELECT count(*) FROM telemetry"
) -> None:
    async def enough() -> bool:
        return await count(db_url, sql) >= n

    await until(enough, timeout, f"{n} rows from {sql!r}")


def publish(stack_info: stack_mod.StackInfo, messages: Sequence[tuple[str, bytes]]) -> None:
    pub = Publisher(stack_info.mqtt_url_for("fleet"))
    try:
        pub.publish(messages)
        pub.wait_acked()
    finally:
        pub.close()


async def test_each_message_stored_once_even_when_published_twice(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    seen: Counter[tuple[str, int]] = Counter()

    async def rules(msgs: Sequence[Message]) -> None:
        # Only this test's pumps: retained statuses of other tests' pumps arrive on subscribe.
        seen.update((m.pump_id, m.seq) for m in msgs if m.pump_id.startswith("T-"))

    msgs = stream(pumps=20, per_pump=100)
    async with running(settings_for(stack, db_url, client_ids()), rules) as ing:
        await asyncio.to_thread(publish, stack, msgs)
        await wait_rows(db_url, len(msgs))
        await asyncio.to_thread(publish, stack, msgs)  # every message a second time
        await until(lambda: _received(ing, 2 * len(msgs)), 60, "second copies processed")
    assert await count(db_url) == len(msgs)
    assert await count(db_url, "SELECT count(DISTINCT (pump_id, seq)) FROM telemetry") == len(msgs)
    assert ing.stats.duplicates == len(msgs)
    # The rules saw each message exactly once, in per-pump order.
    assert len(seen) == len(msgs) and set(seen.values()) == {1}
    assert (
        await count(
            db_url,
            "SELECT count(*) FROM pumps WHERE registered_by = 'ingest' AND pump_id LIKE 'T-%'",
        )
        == 20
    )


async def _received(ing: Ingester, n: int) -> bool:
    return ing.stats.received >= n


async def test_bad_messages_are_dead_lettered_and_the_rest_stored(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    good = stream(pumps=3, per_pump=50)
    bad = [
        ("pumps/B-1/telemetry", b"{not json"),
        ("pumps/B-1/telemetry", b"x" * 20_000),
        ("pumps/B-2/telemetry", telemetry("B-3", 1)),
        ("pumps/B-1/telemetry", telemetry("B-1", 2, reservoir_ml=-4.0)),
        ("pumps/B-1/telemetry", telemetry("B-1", 3, battery_pct=140.0)),
        ("pumps/B-1/telemetry", telemetry("B-1", 4, surprise=1)),
        ("pumps/B-1/gossip", b"{}"),
    ]
    mixed = good[:70] + bad + good[70:]
    async with running(settings_for(stack, db_url, client_ids())):
        await asyncio.to_thread(publish, stack, mixed)
        await wait_rows(db_url, len(good))
        await wait_rows(db_url, len(bad), sql="SELECT count(*) FROM dead_letter")
    assert await count(db_url) == len(good)
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT topic, payload, reason FROM dead_letter ORDER BY id")
    finally:
        await conn.close()
    reasons = {r["reason"].split(":")[0] for r in rows}
    assert {r["payload"] for r in rows} == {payload for _, payload in bad}  # raw bytes kept
    joined = " | ".join(r["reason"] for r in rows)
    for expected in (
        "Invalid JSON",
        "exceeds the",
        "spoofing",
        "reservoir_ml",
        "battery_pct",
        "surprise",
        "unknown kind",
    ):
        assert expected in joined, f"no dead letter says {expected!r}: {joined}"
    assert "payload" in reasons


async def test_unknown_pumps_can_be_dead_lettered_instead(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    conn = await asyncpg.connect(db_url)
    await conn.execute("INSERT INTO pumps (pump_id) VALUES ('T-00000')")
    await conn.close()
    msgs = stream(pumps=2, per_pump=10)  # T-00000 is registered, T-00001 is not
    async with running(settings_for(stack, db_url, client_ids(), unknown_pumps="quarantine")):
        await asyncio.to_thread(publish, stack, msgs)
        await wait_rows(db_url, 10, sql="SELECT count(*) FROM dead_letter")
        await wait_rows(db_url, 10)
    assert await count(db_url, "SELECT count(*) FROM telemetry WHERE pump_id='T-00000'") == 10
    assert await count(db_url, "SELECT count(*) FROM telemetry WHERE pump_id='T-00001'") == 0
    assert (
        await count(
            db_url,
            "SELECT count(*) FROM dead_letter WHERE pump_id='T-00001' "
            "AND reason = 'quarantine: pump T-00001 is not provisioned'",
        )
        == 10
    )


def _ingest_process(
    stack_info: stack_mod.StackInfo, db_url: str, client_id: str, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = stack_mod.free_port()
    env = {
        **os.environ,
        **stack_info.to_env(),
        "PUMPFLEET_DATABASE_URL": db_url,
        "PUMPFLEET_INGEST__CLIENT_ID": client_id,
        "PUMPFLEET_INGEST__METRICS_PORT": str(port),
        "PUMPFLEET_INGEST__BATCH_MAX": "500",
        "PUMPFLEET_INGEST__UNKNOWN_PUMPS": "register",  # a lab (settings_for)
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pumpfleet.cli", "ingest"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, port


async def _healthy(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
    return (await reader.read()).startswith(b"HTTP/1.1 200")


async def test_sigkill_mid_stream_loses_nothing(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any, tmp_path: Path
) -> None:
    cid = client_ids()
    msgs = stream(pumps=50, per_pump=200)  # 10,000
    log = tmp_path / "ingest.log"
    proc, port = _ingest_process(stack, db_url, cid, log)
    try:
        # The first run creates the session; once it is healthy, publish.
        await until(lambda: _healthy(port), 30, f"ingester healthy (log: {log})")
        await asyncio.to_thread(publish, stack, msgs[:100])
        await wait_rows(db_url, 100)
        pub_task = asyncio.create_task(asyncio.to_thread(publish, stack, msgs[100:]))
        await wait_rows(db_url, 2000)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = await count(db_url)
        await pub_task
        assert killed_at < len(msgs), "the kill came too late to prove anything"
        proc, port = _ingest_process(stack, db_url, cid, log)
        await wait_rows(db_url, len(msgs), timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert await count(db_url) == len(msgs)
    assert await count(db_url, "SELECT count(*) FROM dead_letter") == 0


async def test_database_outage_loses_nothing_and_memory_stays_bounded(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    max_pending = 2000
    msgs = stream(pumps=40, per_pump=200)  # 8,000: four times what the ingester may hold
    settings = settings_for(stack, db_url, client_ids(), max_pending=max_pending, batch_max=500)
    async with running(settings) as ing:
        await asyncio.to_thread(publish, stack, msgs[:1000])
        await wait_rows(db_url, 1000)
        stack_stopped = False
        try:
            await asyncio.to_thread(stack_mod.stop_database, stack)
            stack_stopped = True
            await asyncio.to_thread(publish, stack, msgs[1000:])
            # While the database is down the ingester holds at most Receive Maximum messages.
            peak = 0
            for _ in range(40):
                peak = max(peak, ing.pending())
                await asyncio.sleep(0.05)
            assert 0 < peak <= max_pending, f"held {peak} messages with the database down"
            healthy, detail = ing.healthy()
            assert not healthy and detail["database_ok"] is False
        finally:
            if stack_stopped:
                await asyncio.to_thread(stack_mod.start_database, stack)
        await wait_rows(db_url, len(msgs), timeout=120)
        assert ing.stats.db_errors > 0
    assert await count(db_url) == len(msgs)


async def test_broker_restart_loses_nothing(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    cid = client_ids()
    first, second, third = stream(10, 300, 0), stream(10, 300, 300), stream(10, 300, 600)
    settings = settings_for(stack, db_url, cid)
    async with running(settings):
        await asyncio.to_thread(publish, stack, first)
        await asyncio.to_thread(stack_mod.stop_broker, stack)  # likely while still draining `first`
        await asyncio.to_thread(stack_mod.start_broker, stack)
        await asyncio.to_thread(publish, stack, second)
        await wait_rows(db_url, len(first) + len(second))
    # Queued in the broker for a stopped ingester, across a broker restart.
    await asyncio.to_thread(publish, stack, third)
    await asyncio.to_thread(stack_mod.stop_broker, stack)
    await asyncio.to_thread(stack_mod.start_broker, stack)
    async with running(settings):
        await wait_rows(db_url, len(first) + len(second) + len(third))
    assert await count(db_url) == len(first) + len(second) + len(third)


async def test_two_ingesters_on_a_shared_subscription_store_each_message_once(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    msgs = stream(pumps=30, per_pump=100)
    a = settings_for(stack, db_url, client_ids(), shared_group=group)
    b = settings_for(stack, db_url, client_ids(), shared_group=group)
    async with running(a) as ing_a, running(b) as ing_b:
        await asyncio.to_thread(publish, stack, msgs)
        await wait_rows(db_url, len(msgs))
        assert ing_a.stats.received > 0 and ing_b.stats.received > 0, "load was not shared"
        # At least: other tests' pumps may have retained statuses on the broker.
        assert ing_a.stats.received + ing_b.stats.received >= len(msgs)
    assert await count(db_url) == len(msgs)


async def test_metrics_and_health_endpoints(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    async with running(settings_for(stack, db_url, client_ids())) as ing:
        await asyncio.to_thread(publish, stack, stream(2, 5))
        await wait_rows(db_url, 10)
        assert ing.metrics_port
        reader, writer = await asyncio.open_connection("127.0.0.1", ing.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = (await reader.read()).decode()
        written = next(
            float(line.split()[1])
            for line in body.splitlines()
            if line.startswith("pumpfleet_ingest_messages_written_total ")
        )
        assert written >= 10  # and retained statuses of other tests' pumps
        assert "pumpfleet_ingest_commit_seconds_bucket" in body
        reader, writer = await asyncio.open_connection("127.0.0.1", ing.metrics_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        health = (await reader.read()).decode()
        assert health.startswith("HTTP/1.1 200") and '"ok": true' in health
    _ = contract


async def test_message_the_database_refuses_is_dead_lettered_not_retried_forever(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    """Valid by the contract yet refused by the database (here a constraint the contract does
    not know): that message goes to the dead letters, its batch-mates are stored."""
    conn = await asyncpg.connect(db_url)
    await conn.execute(
        "ALTER TABLE telemetry ADD CONSTRAINT test_refuse CHECK (battery_pct <> 42.5)"
    )
    await conn.close()
    msgs = stream(pumps=5, per_pump=20)
    poison = ("pumps/T-00002/telemetry", telemetry("T-00002", 500, battery_pct=42.5))
    async with running(settings_for(stack, db_url, client_ids(), flush_ms=500)) as ing:
        await asyncio.to_thread(publish, stack, [*msgs[:50], poison, *msgs[50:]])
        await wait_rows(db_url, len(msgs))
        await wait_rows(db_url, 1, sql="SELECT count(*) FROM dead_letter")
    assert await count(db_url) == len(msgs)
    reason = await count(
        db_url,
        "SELECT count(*) FROM dead_letter WHERE reason LIKE 'database refused:%test_refuse%'",
    )
    assert reason == 1
    assert ing.stats.dead_lettered == 1


async def test_every_received_message_has_one_outcome_statuses_included(
    stack: stack_mod.StackInfo, db_url: str, client_ids: Any
) -> None:
    """received = written + dead lettered + duplicates + statuses superseded, also when a
    status comes again (retained, on every resubscribe) or an older one arrives late."""

    def status(pump_id: str, seq: int, online: bool) -> tuple[str, bytes]:
        now = datetime.now(UTC).isoformat()
        body = {"v": 2, "pump_id": pump_id, "time": now, "seq": seq, "online": online}
        return contract.topic(pump_id, "status"), json.dumps(body).encode()

    pump = f"S-{uuid.uuid4().hex[:6]}"
    msgs = [status(pump, 5, True), status(pump, 5, True), status(pump, 3, False)]
    msgs += stream(pumps=1, per_pump=4)  # and some telemetry beside them
    async with running(settings_for(stack, db_url, client_ids())) as ing:
        await asyncio.to_thread(publish, stack, msgs)
        s = ing.stats

        async def settled() -> bool:
            return (
                s.received >= len(msgs)
                and s.received == s.written + s.dead_lettered + s.duplicates + s.statuses_superseded
            )

        await until(settled, 30, "every message counted once")
        assert s.statuses_superseded >= 1  # the older seq 3 (the copy of 5 is a duplicate)
    assert await count(db_url, f"SELECT count(*) FROM pump_status WHERE pump_id = '{pump}'") == 1


async def test_an_unreachable_broker_is_logged_once_when_lost_and_once_when_back(
    broker: stack_mod.StackInfo,
    db_url: str,
    client_ids: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="pumpfleet.ingest")
    stack_mod.stop_broker(broker)
    ingester = Ingester(settings_for(broker, db_url, client_ids()))
    task = asyncio.create_task(ingester.run())

    def said(text: str) -> int:
        return sum(1 for r in caplog.records if r.getMessage().startswith(text))

    try:
        await until(lambda: _true(said("broker unreachable") == 1), 20, "the outage logged")
        first = ingester._gen  # one more per connection attempt
        await until(lambda: _true(ingester._gen >= first + 2), 30, "two more attempts")
        stack_mod.start_broker(broker)
        await until(lambda: _true(said("broker reachable again") == 1), 60, "the return logged")
        await ingester.wait_connected(20)
        assert said("broker unreachable") == 1  # once per outage, not once per retry
    finally:
        ingester.stop()
        await asyncio.wait_for(task, timeout=60)


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_connection_that_lost_its_place_is_replaced_not_fatal(
    stack: stack_mod.StackInfo,
    db_url: str,
    client_ids: Any,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
) -> None:
    """asyncpg's InternalClientError ("cannot switch to state 15; another operation is in
    progress") came out of write_batch on some database shutdowns and ended the ingester. Here
    the first write hits it a seeded number of times in a row, then a second wave follows."""
    import random

    import ingest._service

    rng = random.Random(seed)
    first, times = 0, rng.randint(1, 4)
    real = ingest._service.write_batch
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if first < calls <= first + times:
            raise asyncpg.InternalClientError(
                "cannot switch to state 15; another operation is in progress"
            )
        return await real(*args, **kwargs)

    monkeypatch.setattr(ingest._service, "write_batch", flaky)
    msgs = stream(pumps=5, per_pump=40)
    later = stream(pumps=5, per_pump=20, start_seq=40)
    async with running(settings_for(stack, db_url, client_ids(), batch_max=50)) as ing:
        await asyncio.to_thread(publish, stack, msgs)
        await wait_rows(db_url, len(msgs))
        assert ing.stats.db_errors == times  # it happened, and the ingester lived through it
        await asyncio.to_thread(publish, stack, later)  # and it goes on taking messages
        await wait_rows(db_url, len(msgs) + len(later))
    msgs += later
    assert await count(db_url) == len(msgs)
