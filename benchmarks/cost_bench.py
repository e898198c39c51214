"""Benchmark: how cost grows with the fleet, at 1,000, 10,000, 50,000 and 100,000 simulated pumps.

For each fleet size, on this machine's real mosquitto and PostgreSQL: a fresh database, the
ingester and the alerting service started, then `pumpfleet sim load --pumps N` publishing at one
fixed rate (so the figures compare: only the number of pumps changes) for long enough that every
pump reports at least twice. It waits until every acknowledged message is stored and judged
(the alerting feed empty), then reads, per size:
- throughput: messages stored per second, first commit to last;
- the ingester's and the alerting service's CPU per message (microseconds, from /proc);
- their resident memory at the end (VmRSS: what they keep), and the memory per pump as the
  growth from the previous size divided by the pumps added (per-pump state, start-up excluded);
- loss: acknowledged by the broker but not stored (must be 0).

A pump first seen is registered by the ingester (a lab setting, as in every benchmark here).

    .venv/bin/python benchmarks/cost_bench.py                        # 1k,10k,50k,100k at 5,000/s
    .venv/bin/python benchmarks/cost_bench.py --pumps 1000,10000 --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from _figures import record

sys.path.insert(0, str(Path(__file__).parent))
from ingest_bench import Watched, fresh_db, ingester_env, sim_load, wait_count, wait_healthy

from pumpfleet import stack as stack_mod


async def _feed_judged(conn: asyncpg.Connection, timeout: float) -> None:
    """Wait until the alerting service has judged every stored message (its feed is empty)."""
    deadline = time.monotonic() + timeout
    while await conn.fetchval("SELECT EXISTS (SELECT 1 FROM alert_feed)"):
        if time.monotonic() > deadline:
            raise SystemExit(f"the alerting feed was not judged within {timeout:.0f} s")
        await asyncio.sleep(0.25)


async def one_size(
    info: stack_mod.StackInfo, pumps: int, rate: float, work: Path
) -> dict[str, float]:
    dsn = await fresh_db(info, f"cost_{pumps}_{uuid.uuid4().hex[:6]}")
    env = ingester_env(info, dsn, f"cost-{pumps}-{uuid.uuid4().hex[:6]}")
    ports = stack_mod.free_port(), stack_mod.free_port()
    env["PUMPFLEET_INGEST__METRICS_PORT"], env["PUMPFLEET_ALERTS__METRICS_PORT"] = map(str, ports)
    ingester = Watched([sys.executable, "-m", "pumpfleet.cli", "ingest"], env, work / "ingest.log")
    alerting = Watched(
        [sys.executable, "-m", "pumpfleet.cli", "alerting"], env, work / "alerting.log"
    )
    seconds = max(30.0, 2.5 * pumps / rate)  # every pump reports at least twice
    try:
        for port in ports:  # both up (their start-up is not what is measured)
            await wait_healthy(port)
        ing0, alert0 = ingester.cpu_s(), alerting.cpu_s()
        report = work / f"sim_load_{pumps}.txt"
        acked, _ = await sim_load(info, env, pumps, rate, seconds, report)
        await wait_count(dsn, acked, timeout=600)  # every acknowledged message stored
        conn = await asyncpg.connect(dsn)
        try:
            await _feed_judged(conn, 900)
            stored, span, seen = await conn.fetchrow(
                "SELECT count(*), extract(epoch FROM max(received_at) - min(received_at)), "
                "count(DISTINCT pump_id) FROM telemetry"
            )
        finally:
            await conn.close()
        ing_cpu, alert_cpu = ingester.cpu_s() - ing0, alerting.cpu_s() - alert0
        ing_rss, alert_rss = ingester.rss_mb(), alerting.rss_mb()
    finally:
        ingester.stop()
        alerting.stop()
    return {
        "pumps": pumps,
        "seen": float(seen),
        "acked": acked,
        "stored": float(stored),
        "rate": float(stored) / float(span) if span else 0.0,
        "ing_us": 1e6 * ing_cpu / max(acked, 1),
        "alert_us": 1e6 * alert_cpu / max(acked, 1),
        "ing_rss": ing_rss,
        "alert_rss": alert_rss,
        "loss": float(acked - stored),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pumps", default="1000,10000,50000,100000", help="fleet sizes, comma list")
    ap.add_argument("--rate", type=float, default=5000, help="offered msg/s, every size (5000)")
    args = ap.parse_args()
    sizes = [int(p) for p in args.pumps.split(",")]
    with tempfile.TemporaryDirectory(prefix="cost-bench-") as tmp:
        work = Path(tmp)
        with stack_mod.running_stack(work / "stack", purge=True) as info:
            print(f"offered {args.rate:,.0f} msg/s at every size; CPU in us per message")
            print(
                f"{'pumps':>8} {'stored/s':>9} {'ingest us':>9} {'alert us':>9} "
                f"{'ingest MB':>9} {'alert MB':>9} {'ingest B/pump':>13} {'alert B/pump':>12} "
                f"{'lost':>5}"
            )
            prev: dict[str, float] | None = None
            for n in sizes:
                r = await one_size(info, n, args.rate, work)
                if prev is None:
                    ing_pp = alert_pp = float("nan")
                else:
                    added = r["pumps"] - prev["pumps"]
                    ing_pp = (r["ing_rss"] - prev["ing_rss"]) * 2**20 / added
                    alert_pp = (r["alert_rss"] - prev["alert_rss"]) * 2**20 / added
                print(
                    f"{n:>8,} {r['rate']:>9,.0f} {r['ing_us']:>9.0f} {r['alert_us']:>9.0f} "
                    f"{r['ing_rss']:>9.0f} {r['alert_rss']:>9.0f} {ing_pp:>13,.0f} "
                    f"{alert_pp:>12,.0f} {r['loss']:>5.0f}"
                )
                what = f"{n:,} pumps"
                record(f"cost.{n}.stored", r["rate"], "msg/s", what=what)
                record(f"cost.{n}.ingest_us", r["ing_us"], "us/msg", "lower", what)
                record(f"cost.{n}.alerting_us", r["alert_us"], "us/msg", "lower", what)
                record(f"cost.{n}.ingest_mb", r["ing_rss"], "MB", "lower", what)
                record(f"cost.{n}.alerting_mb", r["alert_rss"], "MB", "lower", what)
                if prev is not None:
                    record(f"cost.{n}.ingest_b_per_pump", ing_pp, "B/pump", "lower", what)
                    record(f"cost.{n}.alerting_b_per_pump", alert_pp, "B/pump", "lower", what)
                record(f"cost.{n}.lost", r["loss"], "messages", "lower", what)
                prev = r


if __name__ == "__main__":
    asyncio.run(main())
