"""Storage's dedup key, inside a batch as in the table: one outcome whatever the batching."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingest import DeadLetter, prepare, write_batch
from pumpfleet import contract, schema
from pumpfleet.testing import telemetry_fields

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)


def reading(seq: int, time: datetime) -> contract.Message:
    body = {"v": 2, "pump_id": "D-000001", "seq": seq, "time": time.isoformat()}
    payload = json.dumps({**body, **telemetry_fields()}).encode()
    return contract.decode(contract.topic("D-000001", "telemetry"), payload)


@pytest.mark.parametrize("batching", ["one batch", "two batches"])
async def test_a_reused_seq_with_another_time_is_stored_however_it_is_batched(
    database_url: str, batching: str
) -> None:
    await schema.migrate(database_url)
    first = reading(7, NOW - timedelta(hours=2))
    again = reading(7, NOW - timedelta(hours=1))  # an agent that lost its seq store
    copy = reading(7, NOW - timedelta(hours=2))  # a redelivery: same time, same seq
    conn = await asyncpg.connect(database_url)
    try:
        await prepare(conn)
        if batching == "one batch":
            results = [await write_batch(conn, [first, again, copy], [])]
        else:
            results = [
                await write_batch(conn, [first], []),
                await write_batch(conn, [again, copy], []),
            ]
        rows = await conn.fetch("SELECT time, seq FROM telemetry WHERE pump_id = 'D-000001'")
    finally:
        await conn.close()
    assert sorted(r["time"] for r in rows) == [first.time, again.time]
    assert sum(len(r.new) for r in results) == 2  # both reach the rules
    assert sum(r.duplicates for r in results) == 1  # only the true copy is a duplicate


@pytest.mark.parametrize("batching", ["one batch", "two batches"])
async def test_a_redelivered_dead_letter_is_kept_once_and_counted_as_a_duplicate(
    database_url: str, batching: str
) -> None:
    """Found by the chaos soak: an ingester killed between committing a dead letter and
    acknowledging it got the same bytes again and kept them twice."""
    await schema.migrate(database_url)
    topic = contract.topic("D-000001", "telemetry")
    bad = DeadLetter(topic, b'{"seq": ', "Invalid JSON", NOW)
    other_topic = DeadLetter(contract.topic("D-000002", "telemetry"), b'{"seq": ', "x", NOW)
    conn = await asyncpg.connect(database_url)
    try:
        await prepare(conn)
        if batching == "one batch":
            results = [await write_batch(conn, [], [bad, bad, other_topic])]
        else:
            results = [
                await write_batch(conn, [], [bad]),
                await write_batch(conn, [], [bad, other_topic]),
            ]
        stored = await conn.fetchval("SELECT count(*) FROM dead_letter")
    finally:
        await conn.close()
    assert stored == 2  # the same bytes on another topic are another message
    assert sum(r.dead_letters for r in results) == 2
    assert sum(r.duplicates for r in results) == 1
