"""Storage's dedup key, inside a batch as in the table: one outcome whatever the batching."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingest.store import prepare, write_batch
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
