"""Benchmark: alert latency under fleet load, through the real broker, ingester, database and
Alertmanager, all on this machine.

A fleet of healthy pumps (default 10,000) publishes telemetry at a steady rate while a set of
fault pumps, one after another, report a motor stall (the pump's own alarm: critical_pump_alarm,
high, which has no duration condition). For each fault it measures the time from publishing the
fault to (a) the alert row being visible in the database and (b) Alertmanager listing the alert,
and prints p50/p99/max of both.

The fault is what a pump sends (and the simulator models): the `motor_stall` event it logs,
then readings that show the rotor stopped. `--fault-as telemetry` sends only the stalled
reading, which waits in the telemetry queue with the fleet's readings (the main lane's figure).

    .venv/bin/python benchmarks/alert_latency_bench.py [--pumps 10000 --rate 5000 --faults 100]
    .venv/bin/python benchmarks/alert_latency_bench.py --repeat 5   # p99 min/median/max
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from _figures import record

sys.path.insert(0, str(Path(__file__).parent))
from ingest_bench import Watched, fresh_db, publish

from pumpfleet import alertmanager, contract
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions


def _telemetry(pump_id: str, seq: int, stalled: bool) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "pump_id": pump_id,
            "time": datetime.now(UTC).isoformat(),
            "seq": seq,
            "delivered_ul_per_h": 0.0 if stalled else 10.4,
            "programmed_rate_ul_per_h": 10.4,
            "programmed_dose_mcg_per_day": 500.0,
            "reservoir_ml": 15.0,
            "reservoir_capacity_ml": 20.0,
            "low_reservoir_alarm_ml": 2.0,
            "concentration_mcg_per_ml": 2000.0,
            "battery_pct": 80.0,
            "battery_eri": False,
            "pump_state": "stalled" if stalled else "infusing",
            "alarms": ["motor_stall"] if stalled else [],
        }
    ).encode()


def _stall_event(pump_id: str, seq: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "kind": "event",
            "event": "motor_stall",
            "pump_id": pump_id,
            "time": datetime.now(UTC).isoformat(),
            "seq": seq,
        }
    ).encode()


def inject_faults(
    mqtt_url: str,
    pumps: list[str],
    warmup_s: float,
    spacing_s: float,
    fault_at: dict[str, float],
    stop: threading.Event,
    as_event: bool = True,
) -> None:
    """Fault pumps report every second; after the warm-up they stall one every `spacing_s`,
    logging the stall as an event first (`as_event`) as a pump does. `mqtt_url`: the fleet
    account."""
    broker = BrokerOptions.from_url(mqtt_url)
    client = broker.paho_client(f"bench-faults-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    seq = dict.fromkeys(pumps, 0)

    def send(pump: str) -> None:
        seq[pump] += 1
        stalled = pump in fault_at
        client.publish(contract.topic(pump, "telemetry"), _telemetry(pump, seq[pump], stalled), 1)

    start = time.monotonic()
    next_beat = start
    while not stop.is_set():
        now = time.monotonic()
        due = min(len(pumps), max(0, int((now - start - warmup_s) / spacing_s) + 1))
        for pump in pumps[len(fault_at) : due]:  # the fault goes out the moment it is due
            fault_at[pump] = time.time()
            if as_event:
                seq[pump] += 1
                client.publish(contract.topic(pump, "event"), _stall_event(pump, seq[pump]), 1)
            send(pump)
        if now >= next_beat:  # every pump's regular reading, stalled or not
            for pump in pumps:
                send(pump)
            next_beat += 1.0
        stop.wait(0.01)
    client.disconnect()
    client.loop_stop()


def percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return (
        f"p50 {pick(0.5) * 1000:.0f} ms, p99 {pick(0.99) * 1000:.0f} ms, max {v[-1] * 1000:.0f} ms"
    )


async def watch(
    dsn: str, am_url: str, fault_at: dict[str, float], n: int, timeout: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Record when each fault pump's alert first shows in the database and in Alertmanager."""
    in_db: dict[str, float] = {}
    in_am: dict[str, float] = {}
    conn = await asyncpg.connect(dsn)
    deadline = time.monotonic() + timeout
    last_am = 0.0
    query = urllib.parse.quote('alertname="critical_pump_alarm"')
    try:
        while time.monotonic() < deadline and (len(in_db) < n or len(in_am) < n):
            rows = await conn.fetch(
                "SELECT pump_id FROM alerts WHERE rule = "
                "'critical_pump_alarm' AND pump_id LIKE 'X-%'"
            )
            now = time.time()
            for r in rows:
                in_db.setdefault(r["pump_id"], now)
            if time.monotonic() - last_am > 0.05:
                last_am = time.monotonic()
                with urllib.request.urlopen(
                    f"{am_url}/api/v2/alerts?filter={query}", timeout=5
                ) as resp:
                    alerts = json.load(resp)
                now = time.time()
                for a in alerts:
                    in_am.setdefault(a["labels"]["pump_id"], now)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return in_db, in_am


async def register(dsn: str, pumps: list[str]) -> None:
    """The clinic's registry, as for a real fleet: no pump is an unknown one."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO pumps (pump_id, clinic, reservoir_capacity_ml, concentration_mcg_per_ml,"
            " registered_by) SELECT p, 'bench', 20, 2000, 'operator' FROM unnest($1::text[]) p",
            pumps,
        )
    finally:
        await conn.close()


def p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(0.99 * len(v)))] if v else float("nan")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pumps", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=5_000, help="fleet telemetry msgs/s")
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh stack")
    ap.add_argument(
        "--fault-as",
        choices=("event", "telemetry"),
        default="event",
        help="event: the pump's motor_stall event, then stalled readings (what a pump sends); "
        "telemetry: a stalled reading only",
    )
    args = ap.parse_args()
    results = [await one_run(args) for _ in range(args.repeat)]
    if args.repeat > 1:
        for name, i in (("fault -> alert row", 0), ("fault -> Alertmanager", 1)):
            v = sorted(r[i] * 1000 for r in results)
            print(
                f"{name} p99 over {args.repeat} runs: min {v[0]:.0f} ms, "
                f"median {v[len(v) // 2]:.0f} ms, max {v[-1]:.0f} ms "
                f"({', '.join(f'{x:.0f}' for x in v)})"
            )


async def one_run(args: argparse.Namespace) -> tuple[float, float]:
    workdir = Path(tempfile.mkdtemp(prefix="pumpfleet-alert-bench-"))
    print(f"logs in {workdir}")
    with (
        stack_mod.running_stack(workdir / "stack", purge=True) as info,
        alertmanager.running(workdir / "alertmanager", "http://127.0.0.1:9/unused") as am,
    ):
        dsn = await fresh_db(info, f"bench_alerts_{uuid.uuid4().hex[:6]}")
        per = args.pumps // args.workers  # the publishers' pump ids (ingest_bench)
        fleet = [f"W{w:02d}-{p:05d}" for w in range(args.workers) for p in range(per)]
        await register(dsn, [*fleet, *(f"X-{i:05d}" for i in range(args.faults))])
        port = stack_mod.free_port()
        env = {
            **os.environ,
            **info.to_env(),
            "PUMPFLEET_DATABASE_URL": dsn,
            "PUMPFLEET_INGEST__CLIENT_ID": f"bench-alerts-{uuid.uuid4().hex[:6]}",
            "PUMPFLEET_INGEST__METRICS_PORT": str(port),
            "PUMPFLEET_LOG_LEVEL": "WARNING",
            "PUMPFLEET_ALERTS__ALERTMANAGER_URL": am.url,
        }
        ingester = Watched(
            [sys.executable, "-m", "pumpfleet.cli", "ingest"], env, workdir / "ingest.log"
        )
        alerting = Watched(
            [sys.executable, "-m", "pumpfleet.cli", "alerting", "--metrics-port", "0"],
            env,
            workdir / "alerting.log",
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                        break
                except OSError:
                    await asyncio.sleep(0.2)
            fault_pumps = [f"X-{i:05d}" for i in range(args.faults)]

            fault_at: dict[str, float] = {}
            stop = threading.Event()
            spacing = max(0.05, (args.seconds - 15) / args.faults)
            injector = threading.Thread(
                target=inject_faults,
                args=(
                    info.mqtt_url_for("fleet"),
                    fault_pumps,
                    10.0,
                    spacing,
                    fault_at,
                    stop,
                    args.fault_as == "event",
                ),
                daemon=True,
            )
            n_fleet = int(args.rate * args.seconds)
            load = asyncio.create_task(
                asyncio.to_thread(
                    publish,
                    info.mqtt_url_for("fleet"),
                    n_fleet,
                    args.workers,
                    args.rate,
                    0,
                    args.pumps // args.workers,
                )
            )
            injector.start()
            in_db, in_am = await watch(dsn, am.url, fault_at, args.faults, args.seconds + 60)
            achieved = await load
            stop.set()
            injector.join(10)
            cpu = ingester.cpu_s()
        finally:
            ingester.stop()
            alerting.stop()
        db_lat = [in_db[p] - fault_at[p] for p in in_db if p in fault_at]
        am_lat = [in_am[p] - fault_at[p] for p in in_am if p in fault_at]
        print(
            f"fleet: {args.pumps:,} pumps publishing {achieved:,.0f} msg/s for "
            f"{args.seconds:.0f} s (offered {args.rate:,.0f}); {len(fault_at)} faults injected"
        )
        print(
            f"fault -> alert row in the database ({len(db_lat)}/{len(fault_at)}): "
            f"{percentiles(db_lat)}"
        )
        print(
            f"fault -> alert listed by Alertmanager ({len(am_lat)}/{len(fault_at)}): "
            f"{percentiles(am_lat)}"
        )
        print(f"ingester CPU {cpu:.0f} s over the run")
        for kind, lat in (("row", db_lat), ("am", am_lat)):
            v = sorted(lat)
            if v:
                what = "fault -> " + ("alert row" if kind == "row" else "Alertmanager")
                p50, p99_ = v[len(v) // 2], v[min(len(v) - 1, int(0.99 * len(v)))]
                record(f"alert.{kind}_p50_ms", p50 * 1000, "ms", "lower", what + " p50")
                record(f"alert.{kind}_p99_ms", p99_ * 1000, "ms", "lower", what + " p99")
            record(f"alert.{kind}_missed", len(fault_at) - len(v), "faults", "lower", what)
        return p99(db_lat), p99(am_lat)


if __name__ == "__main__":
    asyncio.run(main())
