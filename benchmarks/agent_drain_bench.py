"""Benchmark: how fast the device agent drains an on-disk backlog to the local mosquitto.

The agent moved from a paho client stepped by one thread (`poll`) to aiomqtt on asyncio. Both
drain the same backlog (20,000 telemetry messages by default, SQLite `synchronous=FULL`, each
deleted only after its PUBACK) to the same throwaway broker in the same run, interleaved, each
`--repeat` times. Beside them, the raw limit of each client library: the same payloads with the
same window, and no store. Everything shares this machine's cores with the broker.

    .venv/bin/python benchmarks/agent_drain_bench.py
    .venv/bin/python benchmarks/agent_drain_bench.py --messages 50000 --inflight 1,100 --repeat 5

The old agent is read from git (`--old-rev`: the last commit with the paho agent).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import aiomqtt
import paho.mqtt

from device_agent import Agent, BrokerOptions, Observation, QueueLimits, Store, build_entry
from pumpfleet import stack as stack_mod
from pumpfleet.testing import telemetry_fields

PUMP = "BENCH-DRAIN"
OLD_REV = "20497e5670dfe3d0ba1177693fe9fafb74c1d2a3"
_TICK = os.sysconf("SC_CLK_TCK")
_REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU a process has used so far (from /proc)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Run:
    acked: int
    elapsed_s: float
    cpu_s: float
    broker_cpu_s: float

    @property
    def rate(self) -> float:
        return self.acked / self.elapsed_s


class _Idle:
    """A driver that produces nothing: the agent only drains what is queued."""

    pump_id = PUMP
    reporting_interval_s = 600.0

    def advance(self, until: datetime) -> list[Observation]:
        return []


def make_backlog(path: Path, messages: int) -> list[tuple[str, bytes]]:
    """A store holding `messages` telemetry messages, 10 minutes apart, ending now."""
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10 * messages)
    with Store(path, PUMP, QueueLimits(max_messages=messages + 1000)) as store:
        for first in range(0, messages, 1000):
            store.append(
                [
                    build_entry(
                        PUMP,
                        Observation(
                            "telemetry",
                            t0 + timedelta(minutes=10 * i),
                            telemetry_fields(15.0 - i * 1e-4),
                        ),
                    )
                    for i in range(first, min(first + 1000, messages))
                ]
            )
        return [(m.topic, m.payload) for m in store.messages()]


def old_agent_module(rev: str) -> ModuleType:
    """`device_agent/agent.py` as it was at `rev`, importable beside today's store and driver."""
    source = subprocess.run(
        ["git", "show", f"{rev}:device_agent/agent.py"],
        cwd=_REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # Today's modules are private (device_agent/_driver.py, _store.py, _clock.py since 3bcabb0)
    source = re.sub(r"^from \.(driver|store|clock) import", r"from ._\1 import", source, flags=re.M)
    spec = importlib.util.spec_from_loader("device_agent._agent_at_rev", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "device_agent"
    sys.modules[spec.name] = module
    exec(compile(source, f"{rev[:8]}:device_agent/agent.py", "exec"), module.__dict__)
    return module


def measure(broker_pid: int | None, drain: Callable[[], tuple[int, float]]) -> Run:
    cpu0, broker0 = time.process_time(), cpu_seconds(broker_pid)
    acked, elapsed = drain()
    return Run(acked, elapsed, time.process_time() - cpu0, cpu_seconds(broker_pid) - broker0)


def drain_old(
    module: ModuleType, backlog: Callable[[], Path], broker: BrokerOptions, inflight: int
) -> tuple[int, float]:
    with Store(backlog(), PUMP, QueueLimits(max_messages=10**7)) as store:
        agent = module.Agent(_Idle(), store, broker, inflight=inflight)
        start = time.perf_counter()
        while len(store) and time.perf_counter() - start < 600:
            agent.poll(0.05)
        elapsed = time.perf_counter() - start
        agent.close(1.0)
        return agent.stats.acked, elapsed


def drain_new(
    backlog: Callable[[], Path], broker: BrokerOptions, inflight: int
) -> tuple[int, float]:
    async def main() -> tuple[int, float]:
        with Store(backlog(), PUMP, QueueLimits(max_messages=10**7)) as store:
            agent = Agent(_Idle(), store, broker, inflight=inflight)
            start = time.perf_counter()
            running = asyncio.create_task(agent.arun(flush_timeout_s=1.0))
            while len(store) and not running.done() and time.perf_counter() - start < 600:
                await asyncio.sleep(0.002)
            elapsed = time.perf_counter() - start
            agent.request_stop()
            await running
            return agent.stats.acked, elapsed

    return asyncio.run(main())


def raw_paho(
    payloads: list[tuple[str, bytes]], broker: BrokerOptions, inflight: int
) -> tuple[int, float]:
    """One paho client, its own window of `inflight`, network loop in its thread; no store."""
    done = threading.Event()
    count = [0]

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        count[0] += 1
        if count[0] == len(payloads):
            done.set()

    client = broker.paho_client("bench-raw-paho")
    client.on_publish = on_publish
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    start = time.perf_counter()
    for topic, payload in payloads:
        client.publish(topic, payload, qos=1)
    done.wait(600)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return count[0], elapsed


def raw_aiomqtt(
    payloads: list[tuple[str, bytes]], broker: BrokerOptions, inflight: int
) -> tuple[int, float]:
    """aiomqtt, `inflight` publishes awaiting their PUBACK at once, in order; no store."""

    async def main() -> tuple[int, float]:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username=broker.username,
            password=broker.password,
            tls_context=broker.tls_context() if broker.tls else None,
            identifier="bench-raw-aiomqtt",
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=0,
            max_queued_outgoing_messages=0,
        ) as client:
            client.pending_calls_threshold = inflight
            window = asyncio.Semaphore(inflight)
            acked = [0]

            async def one(topic: str, payload: bytes) -> None:
                try:
                    await client.publish(topic, payload, qos=1, timeout=600)
                    acked[0] += 1
                finally:
                    window.release()

            start = time.perf_counter()
            tasks = []
            for topic, payload in payloads:
                await window.acquire()
                tasks.append(asyncio.create_task(one(topic, payload)))
            await asyncio.gather(*tasks)
            return acked[0], time.perf_counter() - start

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="backlog size (20000)")
    parser.add_argument("--inflight", default="100", help="windows, comma-separated (100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant (3)")
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the paho agent")
    args = parser.parse_args()
    old = old_agent_module(args.old_rev)
    with (
        tempfile.TemporaryDirectory(prefix="agent-drain-bench-") as tmp,
        stack_mod.running_stack(Path(tmp) / "stack", purge=True) as info,
    ):
        bench(info, old, Path(tmp), args)


def bench(info: Any, old: ModuleType, tmp: Path, args: argparse.Namespace) -> None:
    broker_pid = stack_mod.status(info.run_dir).mqtt.pid
    broker = BrokerOptions.from_url(info.mqtt_url_for("fleet"))  # publishes for many pumps
    template = tmp / "backlog.sqlite3"
    payloads = make_backlog(template, args.messages)
    print(
        f"machine: {os.cpu_count()} cores, shared with mosquitto at {info.mqtt_url}; "
        f"backlog {len(payloads):,} telemetry messages ({len(payloads[0][1])} B each), "
        f"SQLite synchronous=FULL; paho-mqtt {paho.mqtt.__version__}, "
        f"aiomqtt {aiomqtt.__version__}; old agent from {args.old_rev[:8]}"
    )

    def copy() -> Path:
        db = tmp / "run.sqlite3"
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(template, db)
        return db

    print()
    print(
        f"{'variant':<34} {'inflight':>8} {'msg/s':>8} {'runs (msg/s)':<26} "
        f"{'CPU us/msg':>10} {'broker us/msg':>13}"
    )
    for inflight in [int(w) for w in args.inflight.split(",")]:
        variants: dict[str, Callable[[], tuple[int, float]]] = {
            "old agent (paho, poll loop)": partial(drain_old, old, copy, broker, inflight),
            "new agent (aiomqtt, asyncio)": partial(drain_new, copy, broker, inflight),
            "raw paho client, no store": partial(raw_paho, payloads, broker, inflight),
            "raw aiomqtt client, no store": partial(raw_aiomqtt, payloads, broker, inflight),
        }
        runs: dict[str, list[Run]] = {name: [] for name in variants}
        for _ in range(args.repeat):  # interleaved, so that a noisy neighbour hits every variant
            for name, drain in variants.items():
                runs[name].append(measure(broker_pid, drain))
        for name, rs in runs.items():
            rates = [r.rate for r in rs]
            acked = {r.acked for r in rs}
            assert min(acked) >= len(payloads), f"{name}: only {sorted(acked)} acknowledged"
            per = sum(r.acked for r in rs)
            print(
                f"{name:<34} {inflight:>8} {statistics.median(rates):>8,.0f} "
                f"{' '.join(f'{x:,.0f}' for x in rates):<26} "
                f"{sum(r.cpu_s for r in rs) / per * 1e6:>10.0f} "
                f"{sum(r.broker_cpu_s for r in rs) / per * 1e6:>13.0f}"
            )
        ratio = statistics.median(r.rate for r in runs["new agent (aiomqtt, asyncio)"]) / (
            statistics.median(r.rate for r in runs["old agent (paho, poll loop)"])
        )
        print(f"{'new / old':<34} {inflight:>8} {ratio:>8.2f}")
    print()
    print(
        "msg/s: messages acknowledged (and, for the agents, deleted from the store) per second "
        "from start to an empty outbox, median of the runs; CPU per message: this process "
        "(all threads) and mosquitto"
    )


if __name__ == "__main__":
    main()
