"""Benchmark: how much QoS 1 load `pumpfleet sim load` puts through the broker, and at what cost.

Starts a throwaway stack (mosquitto + PostgreSQL from their binaries), then, in one run:
- baseline: ONE plain paho-mqtt client publishing the same telemetry payloads at QoS 1 as fast
  as it can (network loop in its own thread, 1000 in flight), counting PUBACKs;
- `sim load` at a few fixed rates: sent, acknowledged, failed, publish -> PUBACK latency p50/p99,
  the generator's CPU and memory (per message and per simulated pump) and mosquitto's CPU;
and prints each rate as a ratio to the paho baseline. Everything shares this machine's cores.

    .venv/bin/python benchmarks/sim_load_bench.py                  # 10 s per rate
    .venv/bin/python benchmarks/sim_load_bench.py --rates 20000 --duration 60 --pumps 10000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions
from sim_fleet.load import LoadConfig, LoadReport, render, run_load, templates

_TICK = os.sysconf("SC_CLK_TCK")


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

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-paho-baseline",
        protocol=mqtt.MQTTv5,
    )
    client.on_publish = on_publish
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(info.mqtt_host, info.mqtt_port)
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


def run_rate(
    info: stack_mod.StackInfo, mqtt_pid: int | None, args: argparse.Namespace, rate: float
) -> tuple[LoadReport, float]:
    config = LoadConfig(
        pumps=args.pumps,
        rate=rate,
        duration_s=args.duration,
        processes=args.processes,
        connections=args.connections,
        id_prefix=f"B{int(rate)}",
    )
    broker = BrokerOptions(host=info.mqtt_host, port=info.mqtt_port)
    broker_cpu0 = cpu_seconds(mqtt_pid)
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
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    with (
        tempfile.TemporaryDirectory(prefix="sim-load-bench-") as tmp,
        stack_mod.running_stack(Path(tmp) / "stack", purge=True) as info,
    ):
        bench(info, args, rates)


def bench(info: stack_mod.StackInfo, args: argparse.Namespace, rates: list[float]) -> None:
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
    print()
    header = (
        f"{'target':>8} {'sent/s':>8} {'acked/s':>8} {'x paho':>7} {'failed':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'gen CPU':>8} {'us/msg':>7} "
        f"{'broker CPU':>10} {'RSS MiB':>8} {'B/pump':>7}"
    )
    print(header)
    details = []
    for rate in rates:
        report, broker_cpu = run_rate(info, mqtt_pid, args, rate)
        p50 = report.latency.quantile(0.5) or 0.0
        p99 = report.latency.quantile(0.99) or 0.0
        print(
            f"{rate:>8,.0f} {report.rate:>8,.0f} {report.acked_rate:>8,.0f} "
            f"{report.acked_rate / base['rate']:>7.2f} {report.failed:>7} "
            f"{p50 * 1e3:>7.2f} {p99 * 1e3:>7.2f} "
            f"{100 * report.cpu_s / report.elapsed_s:>7.0f}% "
            f"{report.cpu_s / max(report.sent, 1) * 1e6:>7.1f} "
            f"{100 * broker_cpu / report.elapsed_s:>9.0f}% "
            f"{report.peak_rss_bytes / 2**20:>8.0f} "
            f"{report.pump_state_bytes / report.pumps:>7.0f}"
        )
        details.append(report)
    print()
    print(
        f"{args.pumps} pumps, {args.processes} processes x {args.connections} connections,"
        f" {args.duration:g} s per rate; CPU as % of one core; 'x paho' = acknowledged "
        "rate / the one-paho-client baseline"
    )
    for report in details[-1:]:
        print()
        print("\n".join(report.lines()))


if __name__ == "__main__":
    main()
