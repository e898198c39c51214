"""`pumpfleet soak`: the real pipeline under load while seeded random faults hit it.

A fleet of simulated pumps publishes telemetry at a steady rate into a fresh local stack
(mosquitto, PostgreSQL) through `pumpfleet ingest`, run as a separate process the way an
operator runs it. Meanwhile faults arrive at random moments with random lengths, drawn from one
seed (printed, and replayable with `--seed`):

- the ingester killed (SIGKILL) or stopped (SIGTERM, which must end it cleanly with status 0),
  and started again after a pause, as a supervisor would;
- the active one of two alerting instances killed (SIGKILL) or frozen (SIGSTOP, then resumed
  after its lease has passed to the standby, which it must then leave alone);
- PostgreSQL shut down fast or immediately (a crash, recovered at the next start), or its
  processes frozen with SIGSTOP (a paused host: open sockets, no answers), for 1 s to 2 min;
- mosquitto stopped and started again;
- in the stream itself: messages published twice (at random later moments), runs of messages
  published in reverse order, and hostile payloads (bad JSON, bytes that are not UTF-8, JSON
  nested thousands deep, NaN, a missing field, a spoofed pump id, an oversized payload, an
  unknown topic kind), each with a marker so its dead letter can be found.

Some pumps turn faulty at a random moment: a motor stall (critical) or a reservoir at its alarm
volume. At the end the soak stops the faults, lets the pipeline drain, and counts from the
database: every telemetry message the broker acknowledged is stored exactly once, every hostile
payload is dead-lettered exactly once with a reason, every faulty pump has its alert raised
once (not twice, whatever the takeovers), no service ended by itself, and the ingester's
counters add up (received = written + dead-lettered + duplicates + superseded). Nothing is
mocked: a finding here is a finding in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt

from pumpfleet import contract, schema
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions
from pumpfleet.testing import telemetry_fields

# fault kinds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultKind:
    name: str
    resource: str  # one fault per resource at a time; different resources may overlap
    min_s: float  # how long the thing stays broken (log-uniform between min and max)
    max_s: float
    what: str


FULL_FAULTS = (
    FaultKind("ingester_sigkill", "ingester", 0.2, 10, "ingester killed, restarted after"),
    FaultKind("ingester_sigterm", "ingester", 0.2, 10, "ingester stopped, restarted after"),
    FaultKind("db_fast_shutdown", "db", 1, 120, "PostgreSQL fast shutdown, down for"),
    FaultKind("db_immediate_shutdown", "db", 1, 120, "PostgreSQL crash (immediate), down for"),
    FaultKind("db_paused", "db", 1, 30, "PostgreSQL frozen with SIGSTOP for"),
    FaultKind("broker_restart", "broker", 0.2, 10, "mosquitto stopped, down for"),
    FaultKind("alerting_sigkill", "alerting", 0.2, 10, "active alerting killed, restarted after"),
    FaultKind("alerting_paused", "alerting", 1, 30, "active alerting frozen with SIGSTOP for"),
)

# The short profile (make test) keeps every kind but short lengths, so a minute holds them all.
SHORT_FAULTS = tuple(
    FaultKind(k.name, k.resource, k.min_s, min(k.max_s, 6.0), k.what) for k in FULL_FAULTS
)

HOSTILE_KINDS = (
    "bad_json",
    "not_utf8",
    "deep_nesting",
    "nan_value",
    "missing_field",
    "spoofed_pump_id",
    "oversized",
    "unknown_topic_kind",
)

STALL_RULE = "critical_pump_alarm"
LOW_RULE = "low_reservoir"


@dataclass
class SoakConfig:
    seconds: float = 600.0
    seed: int | None = None
    rate: float = 300.0  # telemetry messages per second, whole fleet
    pumps: int = 150
    faulty_pumps: int = 6  # half stall, half run low
    duplicate_p: float = 0.01  # share of messages published a second time, later
    reorder_p: float = 0.002  # chance per tick that a run of messages goes out reversed
    hostile_per_min: float = 20.0
    mean_gap_s: float = 12.0  # mean pause between faults
    short: bool = False  # short fault lengths (the profile `make test` runs)
    run_dir: Path | None = None  # default: a temporary directory, removed afterwards
    drain_timeout_s: float = 300.0
    progress: Callable[[str], None] | None = None

    @property
    def gap_s(self) -> float:
        return min(self.mean_gap_s, 4.0) if self.short else self.mean_gap_s

    @property
    def faults(self) -> tuple[FaultKind, ...]:
        return SHORT_FAULTS if self.short else FULL_FAULTS


@dataclass
class FaultRecord:
    kind: str
    at_s: float  # from the soak's start
    length_s: float
    outcome: str = "ok"


@dataclass
class SoakReport:
    seed: int
    seconds: float
    faults: list[FaultRecord] = field(default_factory=list)
    published: int = 0  # distinct telemetry messages acknowledged by the broker
    unacked: int = 0  # telemetry the publisher could not get acknowledged (not the pipeline's)
    duplicates_published: int = 0
    reordered_runs: int = 0
    stored: int = 0
    lost: int = 0
    unexpected_rows: int = 0
    doubled_rows: int = 0
    hostile: Counter[str] = field(default_factory=Counter)
    hostile_dead_lettered_once: int = 0
    hostile_missing: list[str] = field(default_factory=list)
    hostile_doubled: list[str] = field(default_factory=list)
    other_dead_letters: int = 0
    alerts_expected: int = 0
    alerts_raised_once: int = 0
    alerts_missing: list[str] = field(default_factory=list)
    alerts_doubled: list[str] = field(default_factory=list)
    alerts_unexpected: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    sigterm_exits: Counter[str] = field(default_factory=Counter)
    counters: dict[str, float] = field(default_factory=dict)
    counters_add_up: bool = False
    final_exit: str = ""
    takeovers: int = 0

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.unexpected_rows == 0
            and self.doubled_rows == 0
            and not self.hostile_missing
            and not self.hostile_doubled
            and not self.alerts_missing
            and not self.alerts_doubled
            and not self.crashes
            and self.counters_add_up
            and self.final_exit == "rc 0"
            and all(r.outcome == "ok" for r in self.faults)
        )

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{self.lost} acknowledged telemetry messages not stored")
        if self.unexpected_rows:
            out.append(f"{self.unexpected_rows} stored rows nobody published")
        if self.doubled_rows:
            out.append(f"{self.doubled_rows} rows stored twice")
        if self.hostile_missing:
            out.append(f"hostile payloads not dead-lettered: {self.hostile_missing[:5]}")
        if self.hostile_doubled:
            out.append(f"hostile payloads dead-lettered twice: {self.hostile_doubled[:5]}")
        if self.alerts_missing:
            out.append(f"alerts not raised: {self.alerts_missing}")
        if self.alerts_doubled:
            out.append(f"alerts raised more than once: {self.alerts_doubled}")
        out += [f"a service ended by itself: {c}" for c in self.crashes]
        if not self.counters_add_up:
            out.append(f"ingester counters do not add up: {self.counters}")
        if self.final_exit != "rc 0":
            out.append(f"final SIGTERM: {self.final_exit}")
        out += [f"{r.kind} at {r.at_s:.0f}s: {r.outcome}" for r in self.faults if r.outcome != "ok"]
        return out

    def table(self) -> str:
        """Faults injected and outcomes, as plain text (a terminal, a log or a closing note)."""
        lines = [
            f"seed {self.seed}, {self.seconds:.0f} s of load",
            "",
            f"{'fault':<24}{'count':>6}{'shortest':>10}{'longest':>10}  outcome",
        ]
        by_kind: dict[str, list[FaultRecord]] = {}
        for r in self.faults:
            by_kind.setdefault(r.kind, []).append(r)
        for kind, recs in sorted(by_kind.items()):
            bad = [r for r in recs if r.outcome != "ok"]
            outcome = "all survived" if not bad else f"{len(bad)} failed"
            lengths = [r.length_s for r in recs]
            lines.append(
                f"{kind:<24}{len(recs):>6}{min(lengths):>9.1f}s{max(lengths):>9.1f}s  {outcome}"
            )
        lines.append(f"{'duplicate publishes':<24}{self.duplicates_published:>6}")
        lines.append(f"{'reordered runs':<24}{self.reordered_runs:>6}")
        for kind in HOSTILE_KINDS:
            lines.append(f"{'hostile ' + kind:<24}{self.hostile[kind]:>6}")
        lines += [
            "",
            f"telemetry acknowledged by the broker   {self.published}",
            f"stored exactly once                    {self.stored - self.doubled_rows}",
            f"lost / doubled / unexpected            "
            f"{self.lost} / {self.doubled_rows} / {self.unexpected_rows}",
            f"hostile dead-lettered exactly once     "
            f"{self.hostile_dead_lettered_once} of {sum(self.hostile.values())}",
            f"alerts raised exactly once             "
            f"{self.alerts_raised_once} of {self.alerts_expected}",
            f"services ended by themselves           {len(self.crashes)}",
            f"alerting takeovers                     {self.takeovers}",
            f"SIGTERM exits                          {dict(self.sigterm_exits)}",
            f"counters add up                        {self.counters_add_up}",
        ]
        if self.alerts_unexpected:
            lines.append(f"alerts on healthy pumps                {self.alerts_unexpected}")
        if self.unacked:
            lines.append(f"publisher could not get acked (theirs) {self.unacked}")
        lines.append("")
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.problems()))
        return "\n".join(lines)


# the fleet's publisher --------------------------------------------------------------------------


@dataclass
class _Faulty:
    pump_id: str
    rule: str
    from_s: float  # turns faulty this many seconds into the run


class _Publisher(threading.Thread):
    """Publishes the fleet's telemetry at a steady rate, plus duplicates, reversed runs and
    hostile payloads, at QoS 1 through one paho client that resends what a broker restart
    left unacknowledged."""

    def __init__(self, cfg: SoakConfig, rng: random.Random, url: str, faulty: list[_Faulty]):
        super().__init__(name="soak-publisher", daemon=True)
        self.cfg, self.rng = cfg, rng
        self.faulty = {f.pump_id: f for f in faulty}
        self.pump_ids = [f"S-{i:04d}" for i in range(cfg.pumps)]
        self.seqs = dict.fromkeys(self.pump_ids, 0)
        self.sent: dict[tuple[str, int], mqtt.MQTTMessageInfo] = {}
        self.bytes_of: dict[tuple[str, int], tuple[str, bytes]] = {}
        self.hostile: dict[str, str] = {}  # marker -> kind
        self.hostile_infos: list[mqtt.MQTTMessageInfo] = []
        self.duplicates = 0
        self.reordered = 0
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self._later: list[tuple[float, str, bytes]] = []  # duplicates due at a moment
        options = BrokerOptions.from_url(url)
        self.client = options.paho_client(f"soak-fleet-{rng.getrandbits(32):08x}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect(options.host, options.port)
        self.client.loop_start()

    def _next(self, pump_id: str) -> tuple[str, bytes]:
        seq = self.seqs[pump_id]
        self.seqs[pump_id] = seq + 1
        elapsed = time.monotonic() - self.t0
        fields = telemetry_fields(reservoir_ml=15.0 - seq * 1e-5)
        f = self.faulty.get(pump_id)
        if f is not None and elapsed >= f.from_s:
            if f.rule == STALL_RULE:
                fields.update(delivered_ul_per_h=0.0, pump_state="stalled", alarms=["motor_stall"])
            else:
                fields.update(reservoir_ml=1.9 - seq * 1e-5, alarms=["low_reservoir"])
        body = {"v": 2, "pump_id": pump_id, "time": datetime.now(UTC).isoformat(), "seq": seq}
        body.update(fields)
        out = (contract.topic(pump_id, "telemetry"), json.dumps(body).encode())
        self.bytes_of[(pump_id, seq)] = out
        return out

    def _publish(self, key: tuple[str, int] | None, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if key is not None and key not in self.sent:
            self.sent[key] = info

    def _hostile(self) -> None:
        n = len(self.hostile)
        marker = f"H{n:05d}X"
        kind = HOSTILE_KINDS[self.rng.randrange(len(HOSTILE_KINDS))]
        victim = self.rng.choice(self.pump_ids)
        topic = contract.topic(victim, "telemetry")
        body: dict[str, Any] = {
            "v": 2,
            "pump_id": victim,
            "time": datetime.now(UTC).isoformat(),
            "seq": 10**9 + n,  # never a real seq of the victim
            **telemetry_fields(),
            "note": marker,
        }
        payload: bytes
        if kind == "bad_json":
            payload = b'{"pump_id": "' + marker.encode() + b'", "seq": '
        elif kind == "not_utf8":
            payload = b'{"pump_id": "\xff\xfe' + marker.encode() + b'\xc3\x28"}'
        elif kind == "deep_nesting":
            depth = 3000
            payload = b"[" * depth + json.dumps(marker).encode() + b"]" * depth
        elif kind == "nan_value":
            del body["note"]
            body["pump_id"] = f"{victim}-{marker}"
            topic = contract.topic(body["pump_id"], "telemetry")
            body["battery_pct"] = float("nan")
            payload = json.dumps(body).encode()  # Python writes NaN, which is not JSON
        elif kind == "missing_field":
            del body["note"], body["battery_pct"]
            body["pump_id"] = f"{victim}-{marker}"
            topic = contract.topic(body["pump_id"], "telemetry")
            payload = json.dumps(body).encode()
        elif kind == "spoofed_pump_id":
            del body["note"]
            body["pump_id"] = f"{victim}-{marker}"  # topic says victim, body another pump
            payload = json.dumps(body).encode()
        elif kind == "oversized":
            body["note"] = marker + "x" * 20_000
            payload = json.dumps(body).encode()
        else:  # unknown_topic_kind
            del body["note"]
            body["pump_id"] = f"{victim}-{marker}"
            topic = f"{contract.TOPIC_ROOT}/{body['pump_id']}/firmware"
            payload = json.dumps(body).encode()
        self.hostile[marker] = kind
        self.hostile_infos.append(self.client.publish(topic, payload, qos=1))

    def run(self) -> None:
        tick = 0.02
        emitted = 0
        i = 0
        hostile_due = self.rng.expovariate(self.cfg.hostile_per_min / 60.0)
        while not self.stop_event.is_set():
            now = time.monotonic() - self.t0
            target = int(now * self.cfg.rate)
            batch: list[tuple[tuple[str, int], tuple[str, bytes]]] = []
            while emitted < target:
                pump_id = self.pump_ids[i % len(self.pump_ids)]
                i += 1
                emitted += 1
                msg = self._next(pump_id)
                batch.append(((pump_id, self.seqs[pump_id] - 1), msg))
            if len(batch) > 3 and self.rng.random() < self.cfg.reorder_p * len(batch):
                batch.reverse()
                self.reordered += 1
            for key, (topic, payload) in batch:
                self._publish(key, topic, payload)
                if self.rng.random() < self.cfg.duplicate_p:
                    self._later.append((now + self.rng.uniform(0.05, 20.0), topic, payload))
            due = [d for d in self._later if d[0] <= now]
            if due:
                self._later = [d for d in self._later if d[0] > now]
                for _, topic, payload in due:
                    self._publish(None, topic, payload)
                    self.duplicates += 1
            if now >= hostile_due:
                self._hostile()
                hostile_due = now + self.rng.expovariate(self.cfg.hostile_per_min / 60.0)
            time.sleep(tick)

    def acked(self) -> tuple[int, int]:
        done = sum(1 for info in self.sent.values() if _acked(info))
        hostile = sum(1 for info in self.hostile_infos if _acked(info))
        return done, hostile

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged it. paho queues a QoS 1 message published while it is
    disconnected and sends it after the reconnect, but its `is_published()` raises for such a
    message forever after (its rc stays 'not connected'); the flag set on PUBACK does not lie."""
    return bool(getattr(info, "_published", False))


# the ingester, run as an operator runs it ---------------------------------------------------------


class _Service:
    """`pumpfleet ingest` or `pumpfleet alerting` as a child process; any exit the soak did not
    cause is a crash."""

    def __init__(self, command: str, env: dict[str, str], log: Path) -> None:
        self.command, self.env, self.log = command, env, log
        self.port_var = (
            "PUMPFLEET_INGEST__METRICS_PORT"
            if command == "ingest"
            else "PUMPFLEET_ALERTS__METRICS_PORT"
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.expected_exit = False
        self.crashes: list[str] = []
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.port = stack_mod.free_port()
        env = {**self.env, self.port_var: str(self.port)}
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pumpfleet.cli", self.command, env=env, stdout=out, stderr=out
            )
        self.expected_exit = False
        self._watch = asyncio.create_task(self._watch_exit(self.proc))

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self.expected_exit or proc is not self.proc:
            return
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        self.crashes.append(f"{self.command} rc {rc}: {' | '.join(tail)}")
        await asyncio.sleep(1.0)  # a supervisor's restart delay
        if proc is self.proc and not self.expected_exit:
            await self.start()

    async def signal(self, sig: int, timeout: float = 60.0) -> str:
        """Send `sig` and wait for the exit; 'rc N' or 'hung' (then killed). SIGTERM waits
        until the process is up (its handlers installed): before that, a stop is a kill."""
        assert self.proc is not None
        if sig == signal.SIGTERM:
            await _until(self.up, 30, f"{self.command} up", soft=True)
        self.expected_exit = True
        proc = self.proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return "hung"
        return f"rc {rc}"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"pumpfleet_ingest_(\w+?)(?:_total)? (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def health(self) -> dict[str, Any] | None:
        """/healthz's JSON (also on 503), or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))
        except (OSError, ValueError):
            return None

    def healthy(self) -> bool:
        h = self.health()
        return bool(h and h.get("ok"))

    def up(self) -> bool:
        return self.health() is not None

    def active(self) -> bool:
        h = self.health()
        return bool(h and h.get("role") == "active")


# the run ----------------------------------------------------------------------------------------


def _length(rng: random.Random, kind: FaultKind) -> float:
    """Log-uniform: short faults are common, the long ones still come."""
    return math.exp(rng.uniform(math.log(kind.min_s), math.log(kind.max_s)))


class _Chaos:
    def __init__(self, cfg: SoakConfig, rng: random.Random, info: stack_mod.StackInfo):
        self.cfg, self.rng, self.info = cfg, rng, info
        self.records: list[FaultRecord] = []
        self.busy: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.t0 = time.monotonic()
        self.ingester: _Service | None = None
        self.alerting: list[_Service] = []
        self.sigterm_exits: Counter[str] = Counter()

    def say(self, text: str) -> None:
        if self.cfg.progress is not None:
            self.cfg.progress(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    async def run_until(self, end: float) -> None:
        # Every kind once, in a seeded order, then at random. A run whose end comes before it met
        # every kind goes on (load included) until it has, so a short run always meets them all:
        # three kinds share the database, and one slow restart used to push the last of them out.
        queue = list(self.cfg.faults)
        self.rng.shuffle(queue)
        overrun_end = end + max(60.0, 0.5 * (end - time.monotonic()))
        while True:
            gap = self.rng.expovariate(1.0 / self.cfg.gap_s)
            now = time.monotonic()
            if now + gap >= end and (not queue or now + gap >= overrun_end):
                break
            await asyncio.sleep(gap)
            overrun = time.monotonic() >= end
            free = [k for k in self.cfg.faults if k.resource not in self.busy]
            pending = [k for k in queue if k.resource not in self.busy]
            if not free or (overrun and not pending):
                continue
            kind = pending[0] if pending else self.rng.choice(free)
            if kind in queue:
                queue.remove(kind)
            length = _length(self.rng, kind)
            rec = FaultRecord(kind.name, time.monotonic() - self.t0, length)
            self.records.append(rec)
            self.busy.add(kind.resource)
            task = asyncio.create_task(self._inject(kind, rec))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.tasks:
            await asyncio.gather(*self.tasks)

    async def _inject(self, kind: FaultKind, rec: FaultRecord) -> None:
        self.say(f"{kind.what} {rec.length_s:.1f}s")
        try:
            await self._apply(kind.name, rec)
        except Exception as exc:  # the soak goes on; the record says what went wrong
            rec.outcome = f"injection failed: {exc}"
        finally:
            self.busy.discard(kind.resource)

    async def _apply(self, name: str, rec: FaultRecord) -> None:
        info, ing = self.info, self.ingester
        assert ing is not None
        if name in ("ingester_sigkill", "ingester_sigterm"):
            sig = signal.SIGKILL if name == "ingester_sigkill" else signal.SIGTERM
            result = await ing.signal(sig)
            if sig == signal.SIGTERM:
                self.sigterm_exits[result] += 1
                if result != "rc 0":
                    rec.outcome = f"SIGTERM ended it with {result}"
            await asyncio.sleep(rec.length_s)
            await ing.start()
        elif name in ("db_fast_shutdown", "db_immediate_shutdown"):
            mode = "fast" if name == "db_fast_shutdown" else "immediate"
            await asyncio.to_thread(stack_mod.stop_database, info, mode=mode)
            try:
                await asyncio.sleep(rec.length_s)
            finally:
                await asyncio.to_thread(stack_mod.start_database, info)
        elif name == "db_paused":
            pids = await asyncio.to_thread(stack_mod.pause_database, info)
            try:
                await asyncio.sleep(rec.length_s)
            finally:
                stack_mod.resume_database(pids)
        elif name in ("alerting_sigkill", "alerting_paused"):
            active = [a for a in self.alerting if await asyncio.to_thread(a.active)]
            if not active:
                rec.outcome = "ok"
                rec.length_s = 0.0
                return  # between takeovers: nothing to hit this time
            target = active[0]
            assert target.proc is not None
            if name == "alerting_sigkill":
                await target.signal(signal.SIGKILL)
                await asyncio.sleep(rec.length_s)
                await target.start()
            else:
                target.proc.send_signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(rec.length_s)
                finally:
                    target.proc.send_signal(signal.SIGCONT)
        elif name == "broker_restart":
            await asyncio.to_thread(stack_mod.stop_broker, info)
            try:
                await asyncio.sleep(rec.length_s)
            finally:
                await asyncio.to_thread(stack_mod.start_broker, info)
        else:
            raise ValueError(f"unknown fault {name}")


@contextlib.contextmanager
def _run_dir(cfg: SoakConfig) -> Iterator[Path]:
    if cfg.run_dir is not None:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        yield cfg.run_dir
        return
    with tempfile.TemporaryDirectory(prefix="pumpfleet-soak-") as tmp:
        yield Path(tmp)


def run(cfg: SoakConfig) -> SoakReport:
    """Run one soak on a fresh stack of its own; the report says what happened."""
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    with _run_dir(cfg) as run_dir, stack_mod.running_stack(run_dir / "stack", purge=True) as info:
        return asyncio.run(_soak(cfg, seed, info, run_dir))


async def _soak(cfg: SoakConfig, seed: int, info: stack_mod.StackInfo, run_dir: Path) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport(seed=seed, seconds=cfg.seconds)
    say = cfg.progress or (lambda _: None)
    say(f"soak seed {seed}: {cfg.seconds:.0f} s, {cfg.rate:.0f} msg/s from {cfg.pumps} pumps")
    db_url = stack_mod.create_database(info, "soak")
    await schema.migrate(db_url)

    ids = [f"S-{i:04d}" for i in range(cfg.pumps)]
    faulty = [
        _Faulty(pid, STALL_RULE if n % 2 == 0 else LOW_RULE, rng.uniform(0.1, 0.7) * cfg.seconds)
        for n, pid in enumerate(rng.sample(ids, cfg.faulty_pumps))
    ]
    env = {
        **os.environ,
        **info.to_env(),
        "PUMPFLEET_DATABASE_URL": db_url,
        "PUMPFLEET_INGEST__CLIENT_ID": "soak-ingest",
        "PUMPFLEET_LOG_LEVEL": "INFO",
        # A lab: the S- pumps are never provisioned, so the soak opts in to registering them.
        "PUMPFLEET_INGEST__UNKNOWN_PUMPS": "register",
    }
    ingester = _Service("ingest", env, run_dir / "ingest.log")
    alerting = [_Service("alerting", env, run_dir / f"alerting-{n}.log") for n in (1, 2)]
    for service in (ingester, *alerting):
        await service.start()
    await _until(lambda: ingester.healthy(), 60, f"ingester healthy (log: {ingester.log})")
    await _until(lambda: any(a.active() for a in alerting), 60, f"an active alerting ({run_dir})")

    chaos = _Chaos(cfg, rng, info)
    chaos.ingester = ingester
    chaos.alerting = alerting
    pub = _Publisher(cfg, random.Random(rng.getrandbits(64)), info.mqtt_url_for("fleet"), faulty)
    pub.start()
    try:
        await chaos.run_until(time.monotonic() + cfg.seconds)
        remaining = cfg.seconds - (time.monotonic() - chaos.t0)
        if remaining > 0:
            await asyncio.sleep(remaining)
        pub.stop_event.set()
        report.seconds = time.monotonic() - chaos.t0  # longer when faults still had to be met
        await asyncio.to_thread(pub.join, 30)
        # Everything back up (a fault task may still hold a resource down: they all finished).
        await asyncio.to_thread(stack_mod.start_database, info)
        await asyncio.to_thread(stack_mod.start_broker, info)
        say("load stopped; waiting for the broker's acknowledgements and the drain")
        total = len(pub.sent)
        await _until(lambda: pub.acked()[0] == total, 120, "broker acknowledgements", soft=True)
        acked, _ = pub.acked()
        report.unacked = total - acked
        report.published = acked
        await _drain(db_url, acked, cfg.drain_timeout_s, say)
        await asyncio.sleep(2.0)  # late redeliveries (duplicates) settle into the counters
        await _until(lambda: ingester.healthy(), 60, "ingester healthy at the end", soft=True)
        try:
            report.counters = await asyncio.to_thread(ingester.metrics)
        except OSError as exc:
            report.counters = {"unreadable": 1.0, str(exc): 0.0}
        c = report.counters
        report.counters_add_up = bool(c) and c.get("messages_received") == sum(
            c.get(k, -1.0)
            for k in (
                "messages_written",
                "messages_dead_lettered",
                "duplicates_dropped",
                "statuses_superseded",
            )
        )
        await _settle_alerts(db_url, faulty)
        report.takeovers = sum(_takeovers(a) for a in alerting)
        exits = [await s.signal(signal.SIGTERM) for s in (ingester, *alerting)]
        bad = [
            f"{s.command}: {e}"
            for s, e in zip((ingester, *alerting), exits, strict=True)
            if e != "rc 0"
        ]
        report.final_exit = "rc 0" if not bad else ", ".join(bad)
    finally:
        pub.stop_event.set()
        pub.close()
        for service in (ingester, *alerting):
            if service.proc is not None and service.proc.returncode is None:
                service.expected_exit = True
                service.proc.kill()
                await service.proc.wait()

    report.faults = chaos.records
    report.sigterm_exits = chaos.sigterm_exits
    report.crashes = ingester.crashes + [c for a in alerting for c in a.crashes]
    report.duplicates_published = pub.duplicates
    report.reordered_runs = pub.reordered
    report.hostile = Counter(pub.hostile.values())
    acked_keys = {k for k, i in pub.sent.items() if _acked(i)}
    await _count(db_url, report, acked_keys, set(pub.sent), pub.hostile, faulty)
    return report


def _takeovers(service: _Service) -> int:
    """Takeovers by this instance since its (last) start, from its /healthz."""
    h = service.health()
    return int(h.get("takeovers", 0)) if h else 0


async def _settle_alerts(db_url: str, faulty: list[_Faulty], timeout: float = 60.0) -> None:
    """Wait until alerting has judged everything stored (its feed is empty) and every faulty
    pump's alert is there, or the deadline passes (the count then says what is missing)."""

    async def settled() -> bool:
        try:
            conn = await asyncpg.connect(db_url)
            try:
                left = await conn.fetchval("SELECT count(*) FROM alert_feed")
                raised = await conn.fetchval(
                    "SELECT count(DISTINCT (pump_id, rule)) FROM alerts "
                    "WHERE (pump_id, rule) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                    [f.pump_id for f in faulty],
                    [f.rule for f in faulty],
                )
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            return False
        return bool(left == 0 and raised == len(faulty))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not await settled():
        await asyncio.sleep(0.5)


async def _drain(db_url: str, n: int, timeout: float, say: Callable[[str], None]) -> None:
    """Wait until `n` telemetry rows are stored, or nothing has arrived for a minute."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(db_url)
            try:
                have = int(await conn.fetchval("SELECT count(*) FROM telemetry"))
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            have = last
        if have >= n:
            return
        if have != last:
            last, last_change = have, time.monotonic()
        elif time.monotonic() - last_change > 60:
            say(f"drain stalled at {have} of {n} rows")
            return
        await asyncio.sleep(0.5)


async def _count(
    db_url: str,
    report: SoakReport,
    acked: set[tuple[str, int]],
    sent: set[tuple[str, int]],
    hostile: dict[str, str],
    faulty: list[_Faulty],
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT pump_id, seq FROM telemetry")
        keys = Counter((r["pump_id"], int(r["seq"])) for r in rows)
        report.stored = len(rows)
        report.doubled_rows = sum(n - 1 for n in keys.values() if n > 1)
        report.lost = len(acked - keys.keys())
        report.unexpected_rows = len(keys.keys() - sent)
        dead = await conn.fetch("SELECT payload, reason FROM dead_letter")
        seen: Counter[str] = Counter()
        for d in dead:
            found = re.findall(rb"H\d{5}X", bytes(d["payload"]))
            if found:
                seen[found[0].decode()] += 1
            else:
                report.other_dead_letters += 1
        report.hostile_dead_lettered_once = sum(1 for m in hostile if seen[m] == 1)
        report.hostile_missing = [f"{m} ({hostile[m]})" for m in hostile if seen[m] == 0]
        report.hostile_doubled = [f"{m} ({hostile[m]})" for m in hostile if seen[m] > 1]
        alerts = await conn.fetch("SELECT pump_id, rule, priority FROM alerts")
        raised = Counter((a["pump_id"], a["rule"]) for a in alerts)
        expected = {(f.pump_id, f.rule) for f in faulty}
        report.alerts_expected = len(expected)
        report.alerts_raised_once = sum(1 for k in expected if raised[k] == 1)
        report.alerts_missing = [f"{p} {r}" for p, r in sorted(expected) if raised[(p, r)] == 0]
        report.alerts_doubled = [
            f"{p} {r} x{raised[(p, r)]}" for p, r in sorted(expected) if raised[(p, r)] > 1
        ]
        # Healthy pumps only: a pump run low is also due a refill, which is no surprise.
        faulty_ids = {f.pump_id for f in faulty}
        report.alerts_unexpected = sorted(
            f"{a['pump_id']} {a['rule']} ({a['priority']})"
            for a in alerts
            if a["pump_id"] not in faulty_ids and a["priority"] != "info"
        )
    finally:
        await conn.close()


async def _until(check: Callable[[], Any], timeout: float, what: str, soft: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.2)
    if not soft:
        raise stack_mod.StackError(f"timed out after {timeout:.0f}s waiting for {what}")
