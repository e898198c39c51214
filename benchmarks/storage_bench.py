"""Benchmark: database bytes per pump-year of telemetry, on plain PostgreSQL and on TimescaleDB.

A pump reports one telemetry row every 600 s: 52,560 rows per pump-year. The script builds a
realistic fleet history in SQL (generate_series): `--pumps` pumps x `--days` days of 10-minute
readings, each pump with its own rate, reservoir and battery (the reservoir falls as programmed
and is refilled before it runs dry, or a little after its low-reservoir alarm; the battery falls
slowly; nearly every reading 'infusing' with no alarms; contract v2 fields filled in, device
times to the millisecond, received a second or two later). Then, on the project's own schema
(`pumpfleet.schema`'s migrations):

- plain PostgreSQL: a throwaway local stack (`pumpfleet.stack.running_stack`), a fresh migrated
  database, the dataset inserted, VACUUM ANALYZE, then pg_total_relation_size of telemetry
  (heap + indexes + TOAST): bytes per row, and per pump-year (bytes/row x 52,560). Nothing else
  grows per reading: the hourly figures are a view, and the alert_feed row each reading gets is
  deleted once the alerting service has judged it, so it is left out;
- TimescaleDB: the real extension in its WebAssembly build (tests/timescaledb/runner.mjs, PGlite),
  the timescaledb migrations, the same dataset (for `--tsdb-pumps` pumps, WASM being slower),
  hypertable_size('telemetry') before and after compressing every chunk with the project's
  compression settings (segment by pump_id, order by time DESC, seq DESC; 1-day chunks).

MB here is 10^6 bytes. Figures go to the report through `_figures.record` (storage.*).

    .venv/bin/python benchmarks/storage_bench.py                       # 100 pumps x 30 days
    .venv/bin/python benchmarks/storage_bench.py --pumps 500 --days 60 --skip-timescaledb
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from _figures import record

from pumpfleet import schema
from pumpfleet import stack as stack_mod

READING_INTERVAL_S = 600
ROWS_PER_PUMP_YEAR = 365 * 86_400 // READING_INTERVAL_S  # 52,560
MB = 1_000_000
RUNNER = Path(__file__).resolve().parents[1] / "tests" / "timescaledb" / "runner.mjs"
TSDB_TIMEOUT_S = 240


def dataset_sql(pumps: int, days: int) -> list[str]:
    """Statements that register `pumps` pumps and insert `days` days of their readings, ending at
    the start of today (so retention windows keep them). Deterministic (setseed)."""
    pumps, days = int(pumps), int(days)
    readings = days * 86_400 // READING_INTERVAL_S
    # One row per pump: its programme and where its reservoir and battery start.
    pump_params = f"""
        SELECT p,
               format('P-%s', lpad(p::text, 6, '0'))            AS pump_id,
               CASE WHEN p % 3 = 0 THEN 40.0 ELSE 20.0 END      AS cap,
               CASE WHEN p % 5 = 0 THEN 4.0 ELSE 2.0 END        AS alarm_ml,
               (ARRAY[500.0, 1000.0, 2000.0])[1 + p % 3]        AS conc,
               round((4 + (p * 37 % 360) / 10.0)::numeric, 3)::float8 AS rate,
               (p * 7919 % 600000) * INTERVAL '1 millisecond'   AS phase,
               (p * 104729) % 50000                             AS seq0,
               mod(p * 0.618034, 1)::float8                     AS fill0,
               60 + (p * 13 % 35)                               AS bat0
        FROM generate_series(1, {pumps}) p"""
    return [
        "SELECT setseed(0.42)",
        f"""
        INSERT INTO pumps (pump_id, clinic, reservoir_capacity_ml, concentration_mcg_per_ml,
                           low_reservoir_alarm_ml, reporting_interval_s, high_risk)
        SELECT pump_id, 'clinic-' || (p % 7), cap, conc, alarm_ml, {READING_INTERVAL_S},
               alarm_ml > 2
        FROM ({pump_params}) k
        """,
        f"""
        INSERT INTO telemetry (time, pump_id, seq, received_at, delivered_ul_per_h,
            programmed_rate_ul_per_h, programmed_dose_mcg_per_day, reservoir_ml,
            reservoir_capacity_ml, low_reservoir_alarm_ml, concentration_mcg_per_ml, battery_pct,
            battery_eri, pump_state, alarms, v, reservoir_source, reporting_interval_s,
            scheduled_ul_per_h, eri_since)
        SELECT r.t, k.pump_id, k.seq0 + g, r.t + (0.2 + 2 * random()) * INTERVAL '1 second',
               CASE WHEN r.suspended THEN 0
                    ELSE round((k.rate * (1 + (random() - 0.5) * 0.004))::numeric, 3)::float8
               END,
               k.rate, round((k.rate * 24 / 1000 * k.conc)::numeric, 1)::float8, r.res,
               k.cap, k.alarm_ml, k.conc,
               round((k.bat0 - g * 0.0003)::numeric, 1)::float8, false,
               CASE WHEN r.suspended THEN 'suspended' ELSE 'infusing' END,
               CASE WHEN r.res <= k.alarm_ml THEN ARRAY['low_reservoir'] ELSE '{{}}' END,
               2, 'calculated', {READING_INTERVAL_S},
               CASE WHEN r.suspended THEN 0 ELSE k.rate END, NULL
        FROM ({pump_params}) k
        CROSS JOIN generate_series(0, {readings - 1}) g
        CROSS JOIN LATERAL (
            SELECT date_trunc('day', now()) - INTERVAL '{days} days'
                       + g * INTERVAL '{READING_INTERVAL_S} seconds' + k.phase AS t,
                   -- Falls as programmed; refilled to capacity at 1 mL above the alarm
                   -- (every 4th pump half a mL below it, so some readings carry the alarm).
                   round(k.cap::numeric - mod(
                       (k.fill0 * (k.cap - k.alarm_ml) + g * k.rate / 6000.0)::numeric,
                       (k.cap - k.alarm_ml + CASE WHEN k.p % 4 = 0 THEN 0.5 ELSE -1 END)::numeric),
                         3)::float8 AS res,
                   random() < 0.0005 AS suspended
        ) r
        """,
    ]


def per_year(bytes_per_row: float) -> float:
    return bytes_per_row * ROWS_PER_PUMP_YEAR / MB


# Plain PostgreSQL -------------------------------------------------------------------------------


async def measure_postgres(info: stack_mod.StackInfo, pumps: int, days: int) -> dict[str, Any]:
    dsn = stack_mod.create_database(info, "bench_storage")
    await schema.migrate(dsn, flavour="postgres")
    conn = await asyncpg.connect(dsn)
    try:
        start = time.perf_counter()
        for sql in dataset_sql(pumps, days):
            await conn.execute(sql)
        insert_s = time.perf_counter() - start
        await conn.execute("VACUUM ANALYZE")
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM telemetry)               AS rows,
                      pg_total_relation_size('telemetry')            AS total,
                      pg_relation_size('telemetry')                  AS heap,
                      pg_indexes_size('telemetry')                   AS indexes,
                      pg_total_relation_size('telemetry') - pg_indexes_size('telemetry')
                          - pg_relation_size('telemetry')            AS toast_and_maps,
                      (SELECT count(*) FROM alert_feed)              AS feed_rows,
                      current_setting('server_version')              AS server,
                      (SELECT count(*) FILTER (WHERE cardinality(alarms) > 0)
                       FROM telemetry)                               AS alarm_rows"""
        )
    finally:
        await conn.close()
    return {**dict(row), "insert_s": insert_s}


# TimescaleDB (WebAssembly) ----------------------------------------------------------------------


def measure_timescaledb(pumps: int, days: int) -> dict[str, Any]:
    """Run the timescaledb migrations and the dataset in the PGlite build; raise RuntimeError
    with a one-line reason when that cannot be done."""
    node = shutil.which("node")
    if not node:
        raise RuntimeError("node not found (apt-get install nodejs npm)")
    if not (RUNNER.parent / "node_modules").is_dir():
        raise RuntimeError("TimescaleDB runner not installed: run `make node`")
    statements = [m.sql for m in schema.migrations("timescaledb")]
    statements += dataset_sql(pumps, days)
    statements.append("VACUUM ANALYZE telemetry")
    size = "SELECT (SELECT count(*) FROM telemetry), hypertable_size('telemetry')"
    queries = [
        {"name": "before", "sql": size},
        {"name": "chunks", "sql": "SELECT count(*) FROM show_chunks('telemetry')"},
        {
            "name": "compress",
            "sql": "SELECT count(compress_chunk(c)) FROM show_chunks('telemetry') c",
        },
        {"name": "vacuum", "sql": "VACUUM ANALYZE telemetry"},
        {"name": "after", "sql": size},
        {
            "name": "stats",
            "sql": "SELECT sum(before_compression_total_bytes), "
            "sum(after_compression_total_bytes) FROM chunk_compression_stats('telemetry')",
        },
    ]
    doc = json.dumps({"statements": statements, "queries": queries}).encode()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [node, str(RUNNER)], input=doc, capture_output=True, timeout=TSDB_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the TimescaleDB runner took over {TSDB_TIMEOUT_S} s") from exc
    elapsed = time.perf_counter() - start
    try:
        out = json.loads(proc.stdout or b"{}")
    except json.JSONDecodeError as exc:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"the runner gave no JSON (exit {proc.returncode}): {tail}") from exc
    if not out.get("ok"):
        raise RuntimeError(
            f"TimescaleDB refused at {out.get('stage')} {out.get('index')} "
            f"{out.get('name') or ''}: {out.get('error')}"
        )
    res = out["results"]
    rows, before = res["before"]["rows"][0]
    rows_after, after = res["after"]["rows"][0]
    return {
        "version": out["timescaledb_version"],
        "server": out["server_version"],
        "rows": int(rows),
        "rows_after": int(rows_after),
        "before": int(before),
        "after": int(after),
        "chunks": int(res["chunks"]["rows"][0][0]),
        "compressed_chunks": int(res["compress"]["rows"][0][0]),
        "stats": res["stats"]["rows"][0],
        "elapsed_s": elapsed,
    }


# Report -----------------------------------------------------------------------------------------


def line(label: str, value: str) -> None:
    print(f"  {label:<44} {value:>16}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pumps", type=int, default=100, help="pumps on PostgreSQL (default 100)")
    ap.add_argument("--days", type=int, default=30, help="days of readings (default 30)")
    ap.add_argument(
        "--tsdb-pumps",
        type=int,
        default=None,
        help="pumps on TimescaleDB (WebAssembly, slower; default: as --pumps)",
    )
    ap.add_argument("--skip-timescaledb", action="store_true", help="plain PostgreSQL only")
    args = ap.parse_args()
    if args.pumps < 1 or args.days < 1:
        raise SystemExit("--pumps and --days must be at least 1")
    tsdb_pumps = args.pumps if args.tsdb_pumps is None else args.tsdb_pumps
    readings = args.days * 86_400 // READING_INTERVAL_S
    print(
        f"dataset: {args.pumps:,} pumps x {args.days} days, one reading per "
        f"{READING_INTERVAL_S} s ({readings:,} per pump, {ROWS_PER_PUMP_YEAR:,} per pump-year)"
    )

    workdir = Path(tempfile.mkdtemp(prefix="pumpfleet-storage-"))
    with stack_mod.running_stack(workdir / "stack", purge=True) as info:
        pg = await measure_postgres(info, args.pumps, args.days)
    shutil.rmtree(workdir, ignore_errors=True)
    rows = int(pg["rows"])
    bytes_per_row = pg["total"] / rows
    print(
        f"\nplain PostgreSQL {pg['server']} ({rows:,} rows inserted in {pg['insert_s']:.1f} s, "
        "VACUUM ANALYZE)"
    )
    line("telemetry heap", f"{pg['heap'] / MB:,.2f} MB")
    line("telemetry indexes (primary key)", f"{pg['indexes'] / MB:,.2f} MB")
    line("telemetry TOAST, free-space and visibility maps", f"{pg['toast_and_maps'] / MB:,.2f} MB")
    line("telemetry total (pg_total_relation_size)", f"{pg['total'] / MB:,.2f} MB")
    line("bytes per row", f"{bytes_per_row:,.1f} B")
    record(
        "storage.pg.bytes_per_row",
        bytes_per_row,
        "B",
        "lower",
        what="plain PostgreSQL telemetry, table + indexes + TOAST, per reading",
    )
    line("per pump-year (x 52,560)", f"{per_year(bytes_per_row):,.2f} MB")
    record(
        "storage.pg.mb_per_pump_year",
        per_year(bytes_per_row),
        "MB",
        "lower",
        what="plain PostgreSQL telemetry per pump-year (one reading per 600 s)",
    )
    print(
        f"  ({pg['alarm_rows']:,} readings carry an alarm. Not counted: alert_feed, one row per\n"
        "   reading only until the alerting service judges it and deletes it\n"
        f"   ({pg['feed_rows']} rows here: no ingester ran); the hourly view has no storage.)"
    )

    if args.skip_timescaledb:
        print("\nTimescaleDB: skipped (--skip-timescaledb)")
        return
    print(f"\nTimescaleDB (WebAssembly build, {tsdb_pumps:,} pumps x {args.days} days) ...")
    try:
        ts = measure_timescaledb(tsdb_pumps, args.days)
    except (RuntimeError, OSError) as exc:
        print(f"TimescaleDB: not measured: {exc}")
        return
    before_row, after_row = ts["before"] / ts["rows"], ts["after"] / ts["rows"]
    ratio = ts["before"] / ts["after"]
    print(
        f"  TimescaleDB {ts['version']} on PostgreSQL {ts['server']}, {ts['rows']:,} rows in "
        f"{ts['chunks']} chunks of 1 day, {ts['compressed_chunks']} compressed; "
        f"{ts['elapsed_s']:.0f} s in all"
    )
    print("  (a hypertable has a second index, on time DESC, beside the primary key)")
    if ts["rows_after"] != ts["rows"]:
        print(f"  WARNING: {ts['rows_after']:,} rows after compression, {ts['rows']:,} before")
    line("hypertable_size, uncompressed", f"{ts['before'] / MB:,.2f} MB")
    line("bytes per row, uncompressed", f"{before_row:,.1f} B")
    line("per pump-year, uncompressed", f"{per_year(before_row):,.2f} MB")
    record(
        "storage.tsdb.mb_per_pump_year",
        per_year(before_row),
        "MB",
        "lower",
        what="TimescaleDB telemetry hypertable per pump-year, uncompressed",
    )
    line("hypertable_size, compressed", f"{ts['after'] / MB:,.3f} MB")
    line("bytes per row, compressed", f"{after_row:,.1f} B")
    line("per pump-year, compressed", f"{per_year(after_row):,.3f} MB")
    record(
        "storage.tsdb.compressed_mb_per_pump_year",
        per_year(after_row),
        "MB",
        "lower",
        what="TimescaleDB telemetry per pump-year, all chunks compressed (segment by pump)",
    )
    stats_after = int(ts["stats"][1] or 0)
    if stats_after:
        line("  of which compressed data (chunk stats)", f"{stats_after / MB:,.3f} MB")
        print(
            f"  (the rest, {(ts['after'] - stats_after) / MB:,.2f} MB, is each chunk's emptied "
            "heap and indexes: per chunk, not per pump)"
        )
    line("compression ratio (uncompressed / compressed)", f"{ratio:,.1f} x")
    record(
        "storage.tsdb.compression_ratio",
        ratio,
        "x",
        "higher",
        what="hypertable_size before / after compress_chunk on every chunk",
    )
    print(
        f"\nsummary: per pump-year, PostgreSQL {per_year(bytes_per_row):,.1f} MB; TimescaleDB "
        f"{per_year(before_row):,.1f} MB uncompressed, {per_year(after_row):,.2f} MB compressed"
    )


if __name__ == "__main__":
    asyncio.run(main())
