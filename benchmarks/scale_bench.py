"""Benchmark: the pipeline once alerting is its own service (issue: alerting as its own service).

Two figures, each side by side in one run on this machine's real mosquitto and PostgreSQL:

- drain: a queued telemetry backlog drained by one stateless ingester, then by two on a shared
  subscription (full validation, dedup, ack after commit, the alerting feed written); msg/s from
  the first commit to the last, counted rows, loss and duplicates.
- alarm: a motor-stall event published while a backlog of queued telemetry drains (a fleet
  coming back after an outage), timed to its alert row and to Alertmanager, with the urgent
  lane on (the default) and off.

    .venv/bin/python benchmarks/scale_bench.py                       # drain 200k, alarm 300k
    .venv/bin/python benchmarks/scale_bench.py --drain 400000 --alarm-backlog 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from _figures import record
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).parent))
from ingest_bench import (
    Watched,
    count_rows,
    fresh_db,
    ingester_env,
    loss_and_duplicates,
    publish,
    wait_count,
)

from pumpfleet import alertmanager, contract
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions


def session(mqtt_url: str, client_id: str, topic_filter: str) -> None:
    """A persistent session subscribed to `topic_filter`, so a backlog queues for it;
    `mqtt_url` carries the consuming account (the stack's `mqtt_url_for("ingest")`)."""
    broker = BrokerOptions.from_url(mqtt_url)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c = broker.paho_client(client_id)
    granted = threading.Event()
    c.on_connect = lambda cl, *a: cl.subscribe(topic_filter, qos=1)
    c.on_subscribe = lambda *a: granted.set()
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    if not granted.wait(10):
        raise SystemExit("broker did not grant the subscription")
    c.disconnect()
    c.loop_stop()


async def drain(info: stack_mod.StackInfo, n: int, workers: int, work: Path) -> dict[str, float]:
    """`workers` ingesters (a shared group when more than one) drain an n-message backlog."""
    dsn = await fresh_db(info, f"scale_{workers}_{uuid.uuid4().hex[:6]}")
    group = f"g{uuid.uuid4().hex[:6]}" if workers > 1 else None
    cids = [f"scale-{uuid.uuid4().hex[:6]}-{i}" for i in range(workers)]
    for cid in cids:
        session(info.mqtt_url_for("ingest"), cid, contract.subscription(shared_group=group))
    publish(info.mqtt_url_for("fleet"), n, 4)
    procs = []
    for cid in cids:
        env = ingester_env(info, dsn, cid)
        env["PUMPFLEET_INGEST__URGENT_LANE"] = "false"
        if group:
            env["PUMPFLEET_INGEST__SHARED_GROUP"] = group
        procs.append(
            Watched([sys.executable, "-m", "pumpfleet.cli", "ingest"], env, work / f"{cid}.log")
        )
    try:
        deadline = time.monotonic() + 900
        while await count_rows(dsn) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        cpu = sum(p.cpu_s() for p in procs)
    finally:
        for p in procs:
            p.stop()
    loss, dup = await loss_and_duplicates(dsn, n)
    conn = await asyncpg.connect(dsn)
    try:
        span = float(
            await conn.fetchval(
                "SELECT extract(epoch FROM max(received_at) - min(received_at)) FROM telemetry"
            )
            or 0.0
        )
    finally:
        await conn.close()
    out = {"rate": n / span if span else 0.0, "span_s": span, "cpu_s": cpu, "loss": loss}
    out["dup"] = dup
    if workers == 1:  # the feed those n messages left: how fast the alerting service judges it
        out.update(await judge(info, dsn, n, work))
    return out


async def feed_left(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM alert_feed"))
    finally:
        await conn.close()


async def judge(info: stack_mod.StackInfo, dsn: str, n: int, work: Path) -> dict[str, float]:
    """`pumpfleet alerting` (the real rules) judging a feed of n stored messages."""
    env = ingester_env(info, dsn, "unused")
    env["PUMPFLEET_ALERTS__METRICS_PORT"] = "0"
    start = time.perf_counter()
    proc = Watched(
        [sys.executable, "-m", "pumpfleet.cli", "alerting"], env, work / "judge-alerting.log"
    )
    try:
        left, first = n, None
        while left and time.perf_counter() - start < 900:
            left = await feed_left(dsn)
            if first is None and left < n:
                first = (time.perf_counter(), left)
            await asyncio.sleep(0.2)
        cpu = proc.cpu_s()
    finally:
        proc.stop()
    t0, left0 = first or (start, n)
    span = time.perf_counter() - t0
    return {"judge_rate": left0 / span if span else 0.0, "judge_cpu_us": 1e6 * cpu / n}


def _stall(mqtt_url: str, pump_id: str) -> float:
    """Publish one motor-stall event at QoS 1 (`mqtt_url`: the fleet account); return the wall
    time it was acknowledged."""
    broker = BrokerOptions.from_url(mqtt_url)
    c = broker.paho_client(f"stall-{uuid.uuid4().hex[:6]}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    body = {
        "v": 2,
        "pump_id": pump_id,
        "time": datetime.now(UTC).isoformat(),
        "seq": 1,
        "event": "motor_stall",
    }
    sent = time.time()
    c.publish(contract.topic(pump_id, "event"), json.dumps(body), qos=1).wait_for_publish(30)
    c.disconnect()
    c.loop_stop()
    return sent


async def alarm(
    info: stack_mod.StackInfo,
    am: alertmanager.Alertmanager,
    n: int,
    urgent: bool,
    work: Path,
    pumps: int = 1000,
) -> dict[str, float]:
    dsn = await fresh_db(info, f"alarm_{int(urgent)}_{uuid.uuid4().hex[:6]}")
    cid = f"alarm-{uuid.uuid4().hex[:6]}"
    session(info.mqtt_url_for("ingest"), cid, contract.subscription())
    session(info.mqtt_url_for("ingest"), f"{cid}-urgent", contract.subscription("event"))
    publish(info.mqtt_url_for("fleet"), n, 4, pumps_per_worker=max(1, pumps // 4))
    env = ingester_env(info, dsn, cid)
    env["PUMPFLEET_INGEST__URGENT_LANE"] = "true" if urgent else "false"
    env["PUMPFLEET_ALERTS__ALERTMANAGER_URL"] = am.url
    env["PUMPFLEET_ALERTS__METRICS_PORT"] = "0"
    started = time.perf_counter()
    ingester = Watched([sys.executable, "-m", "pumpfleet.cli", "ingest"], env, work / f"{cid}.log")
    alerting = Watched(
        [sys.executable, "-m", "pumpfleet.cli", "alerting"], env, work / f"{cid}-alerting.log"
    )
    pump = f"STALL-{uuid.uuid4().hex[:6]}"
    try:
        while await count_rows(dsn) < min(n // 10, 50_000):  # the drain is under way
            await asyncio.sleep(0.1)
        backlog_left = n - await count_rows(dsn)
        sent = await asyncio.to_thread(_stall, info.mqtt_url_for("fleet"), pump)
        conn = await asyncpg.connect(dsn)
        try:
            in_db = am_at = None
            deadline = time.monotonic() + 600
            while (in_db is None or am_at is None) and time.monotonic() < deadline:
                if in_db is None and await conn.fetchval(
                    "SELECT 1 FROM alerts WHERE pump_id = $1", pump
                ):
                    in_db = time.time()
                if am_at is None and _am_lists(am.url, pump):
                    am_at = time.time()
                await asyncio.sleep(0.02)
        finally:
            await conn.close()
        drained_at = await wait_count(dsn, n, timeout=1800)  # the whole backlog stored
    finally:
        ingester.stop()
        alerting.stop()
    return {
        "backlog_left": backlog_left,
        "to_row_s": (in_db - sent) if in_db else float("nan"),
        "to_am_s": (am_at - sent) if am_at else float("nan"),
        "drain_s": drained_at - started,
    }


def _am_lists(url: str, pump: str) -> bool:
    """Whether Alertmanager lists the pump's alert; a slow answer (a machine busy draining a
    backlog) is a "not yet", asked again."""
    try:
        with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as r:
            return any(a["labels"].get("pump_id") == pump for a in json.loads(r.read()))
    except (OSError, TimeoutError):
        return False


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--drain", type=int, default=200_000, help="backlog for the drain figure")
    ap.add_argument("--alarm-backlog", type=int, default=300_000, help="backlog for the alarm")
    ap.add_argument("--skip", default="", help="comma list: drain,alarm")
    ap.add_argument(
        "--pumps", type=int, default=1000, help="pumps the alarm's backlog comes from (1000)"
    )
    ap.add_argument("--lanes", default="on,off", help="the alarm with the urgent lane on, off")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = Path(tmp)
        with stack_mod.running_stack(work / "stack", purge=True) as info:
            if "drain" not in skip:
                one = await drain(info, args.drain, 1, work)
                two = await drain(info, args.drain, 2, work)
                print(f"drain of {args.drain:,} queued messages (same run):")
                for name, r in (("one ingester", one), ("two, shared subscription", two)):
                    print(
                        f"  {name:<26} {r['rate']:>8,.0f} msg/s  ({r['span_s']:.1f} s, "
                        f"CPU {r['cpu_s']:.0f} s, loss {r['loss']:.0f}, dup {r['dup']:.0f})"
                    )
                print(f"  ratio two/one: {two['rate'] / one['rate']:.2f}")
                record("scale.one", one["rate"], "msg/s", what="drain, one ingester")
                record(
                    "scale.two", two["rate"], "msg/s", what="drain, two on a shared subscription"
                )
                record("scale.judge", one["judge_rate"], "msg/s", what="alerting judging the feed")
                record("scale.judge_cpu_us", one["judge_cpu_us"], "us/msg", "lower", "alerting CPU")
                print(
                    f"alerting judging that feed: {one['judge_rate']:,.0f} msg/s, "
                    f"{one['judge_cpu_us']:.0f} us CPU per message (start-up included)"
                )
            if "alarm" not in skip:
                am = alertmanager.start(work / "am", "http://127.0.0.1:9/none")
                lanes = [lane for lane in ("on", "off") if lane in args.lanes.split(",")]
                results: dict[str, dict[str, float]] = {}
                try:
                    for lane in lanes:
                        results[lane] = await alarm(
                            info, am, args.alarm_backlog, lane == "on", work, args.pumps
                        )
                finally:
                    alertmanager.stop(am)
                print(f"motor stall published behind {args.alarm_backlog:,} queued messages:")
                for name, r in ((f"urgent lane {k}", v) for k, v in results.items()):
                    print(
                        f"  {name:<16} to alert row {r['to_row_s']:7.2f} s, to Alertmanager "
                        f"{r['to_am_s']:7.2f} s  ({r['backlog_left']:,.0f} still queued; whole "
                        f"backlog stored {r['drain_s']:.1f} s after the ingester started)"
                    )
                for lane, r in results.items():
                    what = f"urgent lane {lane}"
                    record(f"recovery.{lane}.row_s", r["to_row_s"], "s", "lower", what)
                    record(f"recovery.{lane}.am_s", r["to_am_s"], "s", "lower", what)
                    record(f"recovery.{lane}.drain_s", r["drain_s"], "s", "lower", what)


if __name__ == "__main__":
    asyncio.run(main())
