"""Benchmark: how much QoS 1 load `pumpfleet sim load` puts through the broker, and at what cost.

Starts a throwaway stack (mosquitto + PostgreSQL from their binaries), then, in one run:
- baseline: ONE plain paho-mqtt client publishing the same telemetry payloads at QoS 1 as fast
  as it can (network loop in its own thread, 1000 in flight), counting PUBACKs;
- `sim load` at a few fixed rates: sent, acknowledged, failed, publish -> PUBACK latency p50/p99,
  the generator's CPU and memory (per message and per simulated pump) and mosquitto's CPU;
and prints each rate as a ratio to the paho baseline. Everything shares this machine's cores.

With `--compare-with REV`, each rate runs twice against the same broker, old and new alternating
(`--repeat` times): once as now and once with the MQTT publisher and load worker
(sim_fleet/_mqtt.py, sim_fleet/_load.py) as they were at REV, the rest of sim_fleet as now; the
old workers import a copy of the package from a temporary directory (PYTHONPATH, PYTHONSAFEPATH).

    .venv/bin/python benchmarks/sim_load_bench.py                  # 10 s per rate
    .venv/bin/python benchmarks/sim_load_bench.py --rates 20000 --duration 60 --pumps 10000
    .venv/bin/python benchmarks/sim_load_bench.py --compare-with 98aa747 --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _figures import record

import sim_fleet
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions
from sim_fleet._load import LoadConfig, LoadReport, render, run_load, templates

_TICK = os.sysconf("SC_CLK_TCK")
_ROOT = Path(__file__).resolve().parent.parent
_OLD_FILES = ("mqtt.py", "load.py")
_PRIVATE = "check|detect|fleet|load|model|mqtt|run|scenario"


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU a process has used so far (from /proc)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def paho_baseline(info: stack_mod.StackInfo, messages: int) -> dict[str, float]:
    """One paho client, QoS 1, as fast as it goes: acknowledged messages per second."""
    config = LoadConfig(pumps=100, id_prefix="BASE")
    shard = templates(config, range(config.pumps))
    t0 = int(time.time()) - (messages // len(shard) + 2) * 600
    payloads = [
        (t.topic, render(t, i // len(shard), 1, t0, 600))
        for i, t in ((i, shard[i % len(shard)]) for i in range(messages))
    ]
    acked = threading.Event()
    count = [0]

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        count[0] += 1
        if count[0] == messages:
            acked.set()

    broker = BrokerOptions.from_url(info.mqtt_url_for("fleet"))
    client = broker.paho_client("bench-paho-baseline")
    client.on_publish = on_publish
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    cpu0 = time.process_time()
    start = time.monotonic()
    for topic, payload in payloads:
        client.publish(topic, payload, qos=1)
    acked.wait(120)
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
    client.disconnect()
    client.loop_stop()
    return {"acked": count[0], "rate": count[0] / elapsed, "cpu_s": cpu, "elapsed_s": elapsed}


@contextlib.contextmanager
def old_code(rev: str) -> Iterator[dict[str, str]]:
    """Environment under which `sim load` workers run sim_fleet's MQTT publisher and load worker
    as they were at `rev` (the rest of sim_fleet as now)."""
    with tempfile.TemporaryDirectory(prefix="sim-load-old-") as tmp:
        package = Path(tmp) / "sim_fleet"
        shutil.copytree(
            Path(sim_fleet.__file__).parent,
            package,
            ignore=shutil.ignore_patterns("tests", "__pycache__"),
        )
        for name in _OLD_FILES:  # private since 172c9b5: an older rev has them public
            for path in (f"sim_fleet/_{name}", f"sim_fleet/{name}"):
                shown = subprocess.run(
                    ["git", "show", f"{rev}:{path}"], cwd=_ROOT, capture_output=True, text=True
                )
                if shown.returncode == 0:
                    break
            else:
                raise SystemExit(f"no sim_fleet/_{name} or {name} at {rev}")
            # An old module imports its siblings by their old, public names.
            source = re.sub(rf"\bsim_fleet\.({_PRIVATE})\b", r"sim_fleet._\1", shown.stdout)
            source = re.sub(
                rf"^from sim_fleet import ({_PRIVATE})\b",
                r"from sim_fleet import _\1 as \1",
                source,
                flags=re.M,
            )
            (package / f"_{name}").write_text(source)
        env = {"PYTHONPATH": tmp, "PYTHONSAFEPATH": "1"}
        with environment(env):
            where = subprocess.run(
                [sys.executable, "-c", "import sim_fleet._mqtt as m; print(m.__file__)"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        if not where.startswith(tmp):
            raise RuntimeError(f"old code not picked up: the workers would import {where}")
        yield env


@contextlib.contextmanager
def environment(overrides: dict[str, str]) -> Iterator[None]:
    """`os.environ` with `overrides` (the workers `run_load` starts inherit it), then as before."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_rate(
    info: stack_mod.StackInfo,
    mqtt_pid: int | None,
    args: argparse.Namespace,
    rate: float,
    env: dict[str, str] | None = None,
) -> tuple[LoadReport, float]:
    config = LoadConfig(
        pumps=args.pumps,
        rate=rate,
        duration_s=args.duration,
        processes=args.processes,
        connections=args.connections,
        id_prefix=f"B{int(rate)}",
    )
    broker = BrokerOptions.from_url(info.mqtt_url_for("fleet"))  # the load publishes as the fleet
    broker_cpu0 = cpu_seconds(mqtt_pid)
    with environment(env or {}):
        report = run_load(config, broker)
    return report, cpu_seconds(mqtt_pid) - broker_cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5000,20000,40000", help="msgs/s, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate (10)")
    parser.add_argument("--pumps", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=LoadConfig.processes)
    parser.add_argument("--connections", type=int, default=LoadConfig.connections)
    parser.add_argument("--baseline-messages", type=int, default=50_000)
    parser.add_argument(
        "--compare-with",
        metavar="REV",
        help="also run each rate with sim_fleet/_mqtt.py and load.py as at this git revision",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per rate (and code)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sim-load-bench-"))
        codes: dict[str, dict[str, str] | None] = {"now": None}
        if args.compare_with:
            codes[args.compare_with] = stack.enter_context(old_code(args.compare_with))
        info = stack.enter_context(stack_mod.running_stack(Path(tmp) / "stack", purge=True))
        bench(info, args, rates, codes)


def bench(
    info: stack_mod.StackInfo,
    args: argparse.Namespace,
    rates: list[float],
    codes: dict[str, dict[str, str] | None],
) -> None:
    mqtt_pid = stack_mod.status(info.run_dir).mqtt.pid
    cores = os.cpu_count()
    print(f"machine: {cores} cores; broker mosquitto at {info.mqtt_url} (same machine)")
    base_cpu0 = cpu_seconds(mqtt_pid)
    base = paho_baseline(info, args.baseline_messages)
    base_broker = cpu_seconds(mqtt_pid) - base_cpu0
    print(
        f"baseline  one paho client, QoS 1: {base['acked']:,.0f} acked in "
        f"{base['elapsed_s']:.1f} s = {base['rate']:,.0f} msg/s "
        f"(client CPU {base['cpu_s']:.1f} s, broker CPU {base_broker:.1f} s)"
    )
    record("load.paho_baseline", base["rate"], "msg/s", what="one paho client, QoS 1")
    print()
    header = (
        f"{'code':>8} {'target':>8} {'sent/s':>8} {'acked/s':>8} {'x paho':>7} {'failed':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'gen CPU':>8} {'us/msg':>7} "
        f"{'broker CPU':>10} {'RSS MiB':>8} {'B/pump':>7}"
    )
    print(header)
    details = []
    summary: dict[tuple[str, float], list[LoadReport]] = {}
    for rate in rates:
        for i in range(args.repeat):
            # old and new alternate, and swap who goes first on every repeat
            order = list(codes.items()) if i % 2 == 0 else list(codes.items())[::-1]
            for code, env in order:
                report, broker_cpu = run_rate(info, mqtt_pid, args, rate, env)
                summary.setdefault((code, rate), []).append(report)
                if code == "now":
                    what = f"sim load at {rate:,.0f} msg/s offered, {args.pumps:,} pumps"
                    record(f"load.acked_{rate:.0f}", report.acked_rate, "msg/s", what=what)
                    us = report.cpu_s / max(report.sent, 1) * 1e6
                    record(f"load.cpu_us_{rate:.0f}", us, "us/msg", "lower", what)
                details.append(report)
                print(row(code, rate, report, broker_cpu, base["rate"]))
    print()
    print(
        f"{args.pumps} pumps, {args.processes} processes x {args.connections} connections,"
        f" {args.duration:g} s per rate; CPU as % of one core; 'x paho' = acknowledged "
        "rate / the one-paho-client baseline"
    )
    if len(codes) > 1:
        print()
        print(f"median of {args.repeat} per rate and code:")
        for (code, rate), reports in summary.items():
            acked = statistics.median(r.acked_rate for r in reports)
            us = statistics.median(r.cpu_s / max(r.sent, 1) * 1e6 for r in reports)
            failed = sum(r.failed for r in reports)
            print(
                f"{code:>8} {rate:>8,.0f}: acked {acked:>8,.0f} msg/s, generator "
                f"{us:.1f} us CPU/msg, failed {failed}"
            )
    for report in details[-1:]:
        print()
        print("\n".join(report.lines()))


def row(code: str, rate: float, report: LoadReport, broker_cpu: float, base_rate: float) -> str:
    p50 = report.latency.quantile(0.5) or 0.0
    p99 = report.latency.quantile(0.99) or 0.0
    return (
        f"{code:>8} {rate:>8,.0f} {report.rate:>8,.0f} {report.acked_rate:>8,.0f} "
        f"{report.acked_rate / base_rate:>7.2f} {report.failed:>7} "
        f"{p50 * 1e3:>7.2f} {p99 * 1e3:>7.2f} "
        f"{100 * report.cpu_s / report.elapsed_s:>7.0f}% "
        f"{report.cpu_s / max(report.sent, 1) * 1e6:>7.1f} "
        f"{100 * broker_cpu / report.elapsed_s:>9.0f}% "
        f"{report.peak_rss_bytes / 2**20:>8.0f} "
        f"{report.pump_state_bytes / report.pumps:>7.0f}"
    )


if __name__ == "__main__":
    main()
