"""Writing one batch of decoded messages in one transaction.

Telemetry and events go in with `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING
RETURNING` (COPY has no ON CONFLICT): a redelivered message hits the (pump_id, time, seq) key and
is dropped, and RETURNING says which rows are new, so only those reach the alert rules.

The dedup key is (pump_id, time, seq), in the table and inside a batch alike. A message with a
stored seq but another device time is not a redelivery (a redelivery carries the same bytes): it
is an agent that lost its seq store and counts again, or a replay from elsewhere. It is stored,
whatever the batching, and the rules treat an old seq with a newer time as an agent that started
its seqs again (ingest/rules/README.md, "Clocks, order, restarts").

Each first-stored message also gets a row in `alert_feed`, in the same statement: the alerting
service's inbox (ingest/alerts/README.md, "The feed"). A duplicate writes none.

Dead letters go in the same transaction, so one commit covers every message of the batch and
the broker is acknowledged for all of them at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from ingest.rules import CRITICAL
from pumpfleet import contract
from pumpfleet.contract import Message, Status, Telemetry

_TELEMETRY_COLUMNS = (
    "time",
    "pump_id",
    "seq",
    "delivered_ul_per_h",
    "programmed_rate_ul_per_h",
    "programmed_dose_mcg_per_day",
    "reservoir_ml",
    "reservoir_capacity_ml",
    "low_reservoir_alarm_ml",
    "concentration_mcg_per_ml",
    "battery_pct",
    "battery_eri",
    "pump_state",
    "alarms",
    "v",
    "reservoir_source",
    "reporting_interval_s",
    "scheduled_ul_per_h",
    "eri_since",
)
# A reading that carries one of the pump's critical alarms is urgent in the alerting feed, like
# an alarm event (ingest/rules/_alarms.py, CRITICAL): read ahead of other pumps' backlog.
CRITICAL_ALARMS = tuple(sorted(a.value for a in CRITICAL))
_STAGE = "telemetry_stage"
# A session-private staging table: binary COPY into it is the fastest way in, and it empties
# itself at every commit.
_STAGE_SQL = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
# The server counts what it stored and names the stored keys only when some were duplicates (a
# redelivery, which is rare): decoding a row per message would cost the hot path.
_TELEMETRY_SQL = f"""
WITH ins AS (
    INSERT INTO telemetry ({", ".join(_TELEMETRY_COLUMNS)})
    SELECT {", ".join(_TELEMETRY_COLUMNS)} FROM {_STAGE}
    ON CONFLICT DO NOTHING
    RETURNING pump_id, time, seq, alarms),
feed AS (
    INSERT INTO alert_feed (urgent, pump_id, time, seq, kind)
    SELECT alarms && '{{{",".join(CRITICAL_ALARMS)}}}'::text[], pump_id, time, seq, 'telemetry'
    FROM ins)
SELECT count(*)::int,
       CASE WHEN count(*) < $1 THEN array_agg(pump_id) END,
       CASE WHEN count(*) < $1 THEN array_agg(time) END,
       CASE WHEN count(*) < $1 THEN array_agg(seq) END
FROM ins
"""

URGENT_EVENTS = ("motor_stall", "alarm_raised")
"""The pump's own alarms: the alerting service reads them before any queued telemetry (their
rules need no order against telemetry: alarm bits are ordered by seq per alarm)."""

_EVENTS_SQL = f"""
WITH ins AS (
    INSERT INTO events (time, pump_id, seq, event, body)
    SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int8[], $4::text[], $5::jsonb[])
    ON CONFLICT DO NOTHING
    RETURNING pump_id, time, seq, event),
feed AS (
    INSERT INTO alert_feed (urgent, pump_id, time, seq, kind)
    SELECT event IN ({", ".join(f"'{e}'" for e in URGENT_EVENTS)}), pump_id, time, seq, 'event'
    FROM ins)
SELECT pump_id, time, seq FROM ins
"""

# Every status goes into the log (the alerting feed follows it); pump_status keeps the newest.
_STATUS_SQL = """
WITH logged AS (
    INSERT INTO status_log (pump_id, online, reason, time, seq)
    SELECT * FROM unnest($6::text[], $7::bool[], $8::text[], $9::timestamptz[], $10::int8[])
    ON CONFLICT DO NOTHING
    RETURNING pump_id, time, seq),
feed AS (
    INSERT INTO alert_feed (urgent, pump_id, time, seq, kind)
    SELECT false, pump_id, time, seq, 'status' FROM logged),
ins AS (
    INSERT INTO pump_status AS s (pump_id, online, reason, time, seq)
    SELECT * FROM unnest($1::text[], $2::bool[], $3::text[], $4::timestamptz[], $5::int8[])
    ON CONFLICT (pump_id) DO UPDATE
        SET online = EXCLUDED.online, reason = EXCLUDED.reason, time = EXCLUDED.time,
            seq = EXCLUDED.seq, received_at = now()
        WHERE (s.time, s.seq) < (EXCLUDED.time, EXCLUDED.seq)
    RETURNING pump_id, time, seq)
SELECT pump_id, time, seq FROM ins
"""

# A redelivered dead letter (same topic, same bytes) is a duplicate, not a second dead letter.
_DEAD_LETTER_SQL = """
WITH ins AS (
    INSERT INTO dead_letter (topic, payload, reason, pump_id, received_at)
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::timestamptz[])
    ON CONFLICT (topic, sha256(payload)) DO NOTHING
    RETURNING 1)
SELECT count(*)::int FROM ins
"""

_REGISTER_SQL = """
INSERT INTO pumps (pump_id, reservoir_capacity_ml, concentration_mcg_per_ml,
                   low_reservoir_alarm_ml, registered_by)
SELECT p, c, k, coalesce(a, 2), 'ingest'
FROM unnest($1::text[], $2::float4[], $3::float4[], $4::float4[]) AS u(p, c, k, a)
ON CONFLICT (pump_id) DO NOTHING
"""


# Pumps whose messages this batch quarantined (ingest/README.md, "Unknown and revoked pumps"):
# the alerting service raises one unprovisioned_device alert per pump from this table. Sorted
# by pump so that two ingesters lock the rows in the same order.
_QUARANTINE_SQL = """
INSERT INTO quarantine_seen AS q (pump_id, first_at, last_at, messages)
SELECT p, now(), now(), n FROM unnest($1::text[], $2::int8[]) AS u(p, n)
ON CONFLICT (pump_id) DO UPDATE SET last_at = now(), messages = q.messages + EXCLUDED.messages
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    received_at: datetime

    @property
    def pump_id(self) -> str | None:
        parts = self.topic.split("/")
        return parts[1] if len(parts) == 3 and parts[0] == contract.TOPIC_ROOT else None


@dataclass(slots=True)
class WriteResult:
    new: list[Message] = field(default_factory=list)
    """Messages stored by this batch for the first time, in batch order."""
    duplicates: int = 0
    dead_letters: int = 0
    statuses_superseded: int = 0
    """Statuses no newer than the one stored: retained statuses come again at every
    resubscribe, and an older one may arrive late. Kept out of `duplicates` (they are not
    redeliveries of a stored row) but counted, so received = written + dead letters +
    duplicates + statuses superseded."""
    registered: list[str] = field(default_factory=list)
    quarantined: int = 0
    """Messages of pumps not provisioned or revoked, kept as dead letters (counted there too)."""


async def prepare(conn: asyncpg.Connection) -> None:
    """Once per connection, before the first write_batch."""
    await conn.execute(_STAGE_SQL)


async def write_batch(
    conn: asyncpg.Connection,
    messages: Sequence[Message],
    dead: Sequence[DeadLetter],
    register: Iterable[str] = (),
    quarantined: Mapping[str, int] | None = None,
) -> WriteResult:
    """Store one batch in one transaction; the caller acks the broker after this returns.

    `quarantined`: pump id -> how many of the batch's dead letters are that pump's quarantined
    messages; recorded in `quarantine_seen` in the same transaction."""
    result = WriteResult()
    seen: set[tuple[str, datetime, int]] = set()
    telemetry: list[Telemetry] = []
    events: list[Message] = []
    statuses: dict[str, Status] = {}
    status_log: list[Status] = []
    unique: list[Message] = []
    for msg in messages:
        # The storage key, so a batch decides exactly as the table would (module docstring).
        key = (msg.pump_id, msg.time, msg.seq)
        if key in seen:  # the same message twice in one batch: QoS 1 redelivery
            result.duplicates += 1
            continue
        seen.add(key)
        unique.append(msg)
        kind = msg.kind  # cheaper than isinstance on pydantic models
        if kind == "telemetry":
            telemetry.append(msg)  # type: ignore[arg-type]
        elif kind == "status":
            assert isinstance(msg, Status)
            status_log.append(msg)
            prev = statuses.get(msg.pump_id)
            if prev is None or (prev.time, prev.seq) < (msg.time, msg.seq):
                statuses[msg.pump_id] = msg
        else:
            events.append(msg)

    new_keys: set[tuple[str, datetime, int]] = set()
    register_ids = sorted(set(register))
    stored_dead = 0
    async with conn.transaction():
        if register_ids:
            first = {m.pump_id: m for m in reversed(telemetry)}
            await conn.execute(
                _REGISTER_SQL,
                register_ids,
                [first[p].reservoir_capacity_ml if p in first else None for p in register_ids],
                [first[p].concentration_mcg_per_ml if p in first else None for p in register_ids],
                [first[p].low_reservoir_alarm_ml if p in first else None for p in register_ids],
            )
            result.registered = register_ids
        if telemetry:
            await conn.copy_records_to_table(
                _STAGE,
                columns=_TELEMETRY_COLUMNS,
                records=[
                    (
                        m.time,
                        m.pump_id,
                        m.seq,
                        m.delivered_ul_per_h,
                        m.programmed_rate_ul_per_h,
                        m.programmed_dose_mcg_per_day,
                        m.reservoir_ml,
                        m.reservoir_capacity_ml,
                        m.low_reservoir_alarm_ml,
                        m.concentration_mcg_per_ml,
                        m.battery_pct,
                        m.battery_eri,
                        m.pump_state.value,
                        m.alarms,
                        m.v,
                        m.reservoir_source.value if m.reservoir_source is not None else None,
                        m.reporting_interval_s,
                        m.scheduled_ul_per_h,
                        m.eri_since,
                    )
                    for m in telemetry
                ],
            )
            stored, pumps, times, seqs = await conn.fetchrow(_TELEMETRY_SQL, len(telemetry))
            if stored == len(telemetry):
                new_keys.update((m.pump_id, m.time, m.seq) for m in telemetry)
            elif stored:
                new_keys.update(zip(pumps, times, seqs, strict=True))
        if events:
            rows = await conn.fetch(
                _EVENTS_SQL,
                [m.time for m in events],
                [m.pump_id for m in events],
                [m.seq for m in events],
                [getattr(m, "event", "unknown") for m in events],
                [m.model_dump_json() for m in events],
            )
            new_keys.update((r[0], r[1], r[2]) for r in rows)
        if statuses:
            st = list(statuses.values())
            rows = await conn.fetch(
                _STATUS_SQL,
                [m.pump_id for m in st],
                [m.online for m in st],
                [m.reason for m in st],
                [m.time for m in st],
                [m.seq for m in st],
                [m.pump_id for m in status_log],
                [m.online for m in status_log],
                [m.reason for m in status_log],
                [m.time for m in status_log],
                [m.seq for m in status_log],
            )
            new_keys.update((r[0], r[1], r[2]) for r in rows)
        if quarantined:
            pumps_held = sorted(quarantined)
            await conn.execute(_QUARANTINE_SQL, pumps_held, [quarantined[p] for p in pumps_held])
            result.quarantined = sum(quarantined.values())
        if dead:
            stored_dead = await conn.fetchval(
                _DEAD_LETTER_SQL,
                [d.topic for d in dead],
                [d.payload for d in dead],
                [d.reason for d in dead],
                [d.pump_id for d in dead],
                [d.received_at for d in dead],
            )
    result.dead_letters = stored_dead
    result.duplicates += len(dead) - stored_dead
    for msg in unique:
        if (msg.pump_id, msg.time, msg.seq) in new_keys:
            result.new.append(msg)
        elif msg.kind == "status":
            result.statuses_superseded += 1
        else:
            result.duplicates += 1
    return result
