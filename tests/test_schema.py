"""Migrations on the local PostgreSQL and on real TimescaleDB (WebAssembly build), with the same
queries giving the same answers on both."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pumpfleet import schema
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


async def _postgres_results(dsn: str) -> dict[str, list[list[Any]]]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SAMPLE)
        return {
            name: [_norm(list(r.values())) for r in await conn.fetch(sql)]
            for name, sql in QUERIES.items()
        }
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
    pg = await _postgres_results(database_url)
    statements = [m.sql for m in schema.migrations("timescaledb")] + [SAMPLE]
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
    ts = await asyncio.to_thread(_timescaledb, statements, {**QUERIES, **checks})
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
