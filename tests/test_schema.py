"""Migrations on the local PostgreSQL and on real TimescaleDB (WebAssembly build), with the same
queries giving the same answers on both."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pumpfleet import schema
from pumpfleet.schema import panels
from pumpfleet.schema.queries import QUERIES

RUNNER = Path(__file__).parent / "timescaledb" / "runner.mjs"

# Sample rows relative to now() so retention and 'last 2 days' windows keep them.
SAMPLE = """
INSERT INTO pumps (pump_id, clinic, low_reservoir_alarm_ml, high_risk) VALUES
    ('P-1', 'north', 2, false), ('P-2', 'north', 4, true);
INSERT INTO telemetry (time, pump_id, seq, delivered_ul_per_h, programmed_rate_ul_per_h,
    programmed_dose_mcg_per_day, reservoir_ml, reservoir_capacity_ml, low_reservoir_alarm_ml,
    concentration_mcg_per_ml, battery_pct, battery_eri, pump_state, alarms)
SELECT date_trunc('hour', now()) - INTERVAL '1 day' + g * INTERVAL '10 minutes', p, g,
       10.4 + (g % 3) * 0.01, 10.4, 500, r - g * 0.0043, 20, 2, 2000, 80 - g * 0.001, false,
       'infusing', CASE WHEN r - g * 0.0043 <= 4 THEN ARRAY['low_reservoir'] ELSE '{}' END
FROM generate_series(0, 143) g, (VALUES ('P-1', 12.0), ('P-2', 4.3)) v(p, r);
INSERT INTO telemetry (time, pump_id, seq, delivered_ul_per_h, programmed_rate_ul_per_h,
    programmed_dose_mcg_per_day, reservoir_ml, reservoir_capacity_ml, low_reservoir_alarm_ml,
    concentration_mcg_per_ml, battery_pct, battery_eri, pump_state, alarms)
VALUES (date_trunc('hour', now()) - INTERVAL '1 day', 'P-1', 0, 1, 1, 1, 1, 20, 2, 2000, 1, false,
        'infusing', '{}')
ON CONFLICT DO NOTHING;
INSERT INTO events (time, pump_id, seq, event, body) VALUES
    (date_trunc('hour', now()) - INTERVAL '3 days', 'P-1', 1000, 'refill',
     '{"expected_ml": 3.5, "withdrawn_ml": 1.0}');
INSERT INTO alerts (pump_id, rule, priority, phase, summary, started_at, updated_at) VALUES
    ('P-2', 'low_reservoir', 'medium', 'start', 'low', now(), now()),
    ('P-1', 'refill_discrepancy', 'high', 'start', 'gap', now(), now());
INSERT INTO dead_letter (topic, payload, reason, received_at) VALUES
    ('pumps/x/telemetry', '\\x7b', 'Invalid JSON', date_trunc('hour', now()));
"""


# What the dashboards' panels need beyond SAMPLE, at whole hours.
PANEL_SAMPLE = """
UPDATE telemetry SET received_at = time + INTERVAL '30 seconds';
UPDATE events SET received_at = time + INTERVAL '2 minutes';
INSERT INTO pump_status (pump_id, online, time, seq) VALUES
    ('P-1', true, date_trunc('hour', now()) - INTERVAL '2 hours', 1),
    ('P-2', false, date_trunc('hour', now()) - INTERVAL '2 hours', 1);
UPDATE alerts SET started_at = date_trunc('hour', now()) - INTERVAL '30 minutes',
                  updated_at = date_trunc('hour', now()) - INTERVAL '30 minutes';
UPDATE alerts SET acked_at = started_at + INTERVAL '5 minutes', acked_by = 'dr.test'
    WHERE rule = 'low_reservoir';
INSERT INTO alert_history (alert_id, at, phase, priority)
    SELECT alert_id, started_at, 'start', priority FROM alerts;
INSERT INTO alert_history (alert_id, at, phase, priority, actor)
    SELECT alert_id, started_at + INTERVAL '15 minutes', 'escalate', priority, 'escalation'
    FROM alerts WHERE priority = 'high';
INSERT INTO alert_outbox (receiver, alert_id, action, event, created_at, attempts, last_error)
    SELECT 'alertmanager', alert_id, 'trigger', '{}', started_at, 2, 'connection refused'
    FROM alerts;
"""
READER = "pumpfleet_reader"


def _sample(anchor: datetime) -> str:
    """SAMPLE and PANEL_SAMPLE with `now()` fixed at `anchor`, so that the two databases, run
    one after the other, hold the same rows even across an hour boundary."""
    return (SAMPLE + PANEL_SAMPLE).replace("now()", f"'{anchor.isoformat()}'::timestamptz")


def _panel_queries(anchor: datetime) -> dict[str, str]:
    """Every dashboard query, expanded as Grafana would for the sample: the last day (raw
    telemetry) and four days (the hourly aggregate), pump P-1 of the north clinic."""
    hour = anchor.replace(minute=0, second=0, microsecond=0)
    to = hour + timedelta(hours=1)
    ranges = {"day": (hour - timedelta(hours=26), to), "long": (to - timedelta(days=4), to)}
    values = {"clinic": ["north"], "pump": "P-1", "priority": ["high", "medium", "low", "info"]}
    return {
        f"panel {name} {label}": panels.expand(query.sql, frm, till, values)
        for name, query in panels.SQL.items()
        for label, (frm, till) in ranges.items()
    }


def _norm(value: Any) -> Any:
    """One form for values from asyncpg and from the runner's JSON."""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, Decimal | float):
        return round(float(value), 6)
    if isinstance(value, str):
        try:
            return round(float(value), 6)
        except ValueError:
            return value
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    return value


async def _postgres_results(dsn: str, anchor: datetime) -> dict[str, list[list[Any]]]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_sample(anchor))
        out = {
            name: [_norm(list(r.values())) for r in await conn.fetch(sql)]
            for name, sql in QUERIES.items()
        }
        await conn.execute(f"SET ROLE {READER}")  # as Grafana reads
        for name, sql in _panel_queries(anchor).items():
            out[name] = [_norm(list(r.values())) for r in await conn.fetch(sql)]
        return out
    finally:
        await conn.close()


def _timescaledb(statements: list[str], queries: dict[str, str]) -> dict[str, Any]:
    node = shutil.which("node")
    assert node, "node not found: install Node.js (`apt-get install nodejs npm`)"
    assert (RUNNER.parent / "node_modules").is_dir(), (
        "TimescaleDB runner not installed: run `make node` (npm ci in tests/timescaledb)"
    )
    doc = {"statements": statements, "queries": [{"name": n, "sql": q} for n, q in queries.items()]}
    proc = subprocess.run(
        [node, str(RUNNER)],
        input=json.dumps(doc).encode(),
        capture_output=True,
        timeout=300,
        check=False,
    )
    out = json.loads(proc.stdout or b"{}")
    assert out.get("ok"), f"TimescaleDB rejected: {out} {proc.stderr.decode()[-2000:]}"
    return out


@pytest.mark.integration
async def test_migrate_is_idempotent_and_safe_concurrently(database_url: str) -> None:
    first, second = await asyncio.gather(schema.migrate(database_url), schema.migrate(database_url))
    assert sorted(len(x) for x in (first, second)) == [0, len(schema.migrations("postgres"))]
    assert await schema.migrate(database_url) == []
    versions = await schema.applied_versions(database_url)
    assert [v for v, _, _ in versions] == [m.version for m in schema.migrations("postgres")]
    assert {f for _, _, f in versions} == {"postgres"}


@pytest.mark.integration
async def test_edited_migration_is_refused(database_url: str) -> None:
    await schema.migrate(database_url)
    conn = await asyncpg.connect(database_url)
    await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
    await conn.close()
    with pytest.raises(schema.MigrationError, match="changed after it was applied"):
        await schema.migrate(database_url)


def test_flavours_share_versions_and_names() -> None:
    ts, pg = schema.migrations("timescaledb"), schema.migrations("postgres")
    assert [(m.version, m.name) for m in ts] == [(m.version, m.name) for m in pg]
    # The flavour-specific migration, wherever later (common) migrations put it in the list.
    ts_hourly = next(m for m in ts if m.name == "telemetry_hourly")
    pg_hourly = next(m for m in pg if m.name == "telemetry_hourly")
    assert "create_hypertable" in ts_hourly.sql and "create_hypertable" not in pg_hourly.sql
    assert "timescaledb.continuous" in ts_hourly.sql
    assert ts[0].sql == pg[0].sql


@pytest.mark.integration
async def test_same_queries_same_answers_on_timescaledb_and_postgres(database_url: str) -> None:
    await schema.migrate(database_url, flavour="postgres")
    anchor = datetime.now(UTC)
    pg = await _postgres_results(database_url, anchor)
    statements = [m.sql for m in schema.migrations("timescaledb")] + [_sample(anchor)]
    checks = {
        "hypertables": "SELECT hypertable_name, compression_enabled FROM "
        "timescaledb_information.hypertables ORDER BY 1",
        "jobs": "SELECT proc_name, hypertable_name FROM timescaledb_information.jobs "
        "WHERE proc_name IN ('policy_compression', 'policy_retention', "
        "'policy_refresh_continuous_aggregate') ORDER BY 1, 2",
        "caggs": "SELECT view_name, materialized_only FROM "
        "timescaledb_information.continuous_aggregates",
        "segmentby": "SELECT attname FROM timescaledb_information.compression_settings "
        "WHERE hypertable_name = 'telemetry' AND segmentby_column_index = 1",
    }
    # The panels run last, as the read-only role (the runner keeps one session).
    reader = {"as reader": f"SET ROLE {READER}"}
    queries = {**QUERIES, **checks, **reader, **_panel_queries(anchor)}
    ts = await asyncio.to_thread(_timescaledb, statements, queries)
    res = ts["results"]
    assert res["hypertables"]["rows"] == [["events", True], ["telemetry", True]]
    assert res["caggs"]["rows"] == [["telemetry_hourly", False]]
    assert res["segmentby"]["rows"] == [["pump_id"]]
    procs = {tuple(r) for r in res["jobs"]["rows"]}
    assert ("policy_retention", "telemetry") in procs
    assert ("policy_compression", "telemetry") in procs
    assert any(p == "policy_refresh_continuous_aggregate" for p, _ in procs)
    for name in QUERIES:
        ts_rows = [_norm(r) for r in res[name]["rows"]]
        assert ts_rows == pg[name], f"{name} differs between TimescaleDB and PostgreSQL"
        assert pg[name], f"{name} returned nothing: the sample does not exercise it"
    # The dashboards' queries: the same rows on both, raw telemetry for the day and the hourly
    # continuous aggregate (TimescaleDB) or its view (PostgreSQL) for four days.
    for name in _panel_queries(anchor):
        ts_rows = [_norm(r) for r in res[name]["rows"]]
        assert ts_rows == pg[name], f"{name} differs between TimescaleDB and PostgreSQL"
    for name in ("pump.reservoir", "pump.delivery", "pump.battery", "fleet.closest_to_empty"):
        for label in ("day", "long"):
            assert pg[f"panel {name} {label}"], f"{name} ({label}) returned nothing"
    assert len(pg["panel pump.reservoir long"]) < len(pg["panel pump.reservoir day"])
    assert res["as reader"]["rows"] == []
