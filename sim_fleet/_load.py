"""`pumpfleet sim load`: the benchmark load generator.

Contract-valid telemetry from many simulated pumps, rate-limited, from several processes, each
driving a few lean MQTT connections (`sim_fleet._mqtt`). It must not be the bottleneck of what it
measures, so per message it does only arithmetic and byte joins:

- Each pump's telemetry comes from the fleet model's spec (`make_fleet`: size, drug, dose,
  alarm volume) and is built ONCE by `device_agent.build_entry`, which validates it exactly as
  the ingester will. The encoded payload is cut at three sentinel values (time, seq,
  reservoir_ml) into a template; a message is the template joined with those three values, so
  every payload has the agent's exact bytes and field order.
- Pumps send round-robin: round r of pump k carries seq `seq_start + r` and device time
  `t0 + r * interval + phase_k`, with `t0` placed so the last round ends before the wall clock
  (the contract rejects device times more than 10 minutes ahead). Reservoirs fall at the pump's
  programmed flow and are refilled (silently) before they reach the alarm volume.
- The rate is split evenly over worker processes (`python -m sim_fleet._load_worker`); in each,
  a token bucket releases messages in batches of about 2 ms (the decisions, pure and unit-tested,
  are `sim_fleet._pacing`'s). Workers report counters for the live line every 0.1 s and their
  totals, latency histogram, CPU and memory at the end, as JSON lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pumpfleet import logs
from pumpfleet.broker import BrokerOptions
from pumpfleet.contract import PUMP_ID_PATTERN
from pumpfleet.envelope import Observation, build_entry
from sim_fleet._fleet import make_fleet
from sim_fleet._mqtt import (
    MAX_MESSAGE_IDS,
    ConnectError,
    Connection,
    ConnectionLost,
    Histogram,
)
from sim_fleet._pacing import Row, payload, release, select_timeout, share
from sim_fleet._run import seq_base

__all__ = [
    "LoadConfig",
    "LoadReport",
    "Progress",
    "load_pump_id",
    "render",
    "run_load",
    "templates",
    "worker_main",
]

log = logging.getLogger("sim_fleet._load")

_SENTINEL_TIME = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)
_SENTINEL_SEQ = 918_273_645_546_372_819
_SENTINEL_RESERVOIR = 1.23456789
_SLOTS = (b"2001-02-03T04:05:06Z", b"918273645546372819", b"1.23456789")


@dataclass(frozen=True)
class LoadConfig:
    """What `sim load` runs; the CLI's options map one to one."""

    pumps: int = 10_000
    rate: float = 20_000.0
    """Messages per second for the whole command, over all processes."""
    duration_s: float = 60.0
    processes: int = 2
    connections: int = 2
    """MQTT connections per process; each carries an equal share of that process's pumps."""
    qos: int = 1
    inflight: int = 20_000
    """Unacknowledged publishes per connection (at most 65,535, and the broker's Receive Max)."""
    interval_s: int = 600
    """Simulated reporting interval: device time advances this much per message of a pump."""
    seed: int = 1
    id_prefix: str = "LOAD"
    seq_start: int | None = None
    """First seq of every pump; None: the run's start in microseconds since 1970, so seqs keep
    increasing across runs like a real pump's."""
    drain_timeout_s: float = 15.0
    """After the last send, how long to wait for outstanding PUBACKs."""
    client_prefix: str = ""

    def check(self) -> None:
        """Raise ValueError naming the option for impossible settings."""
        if self.pumps < 1:
            raise ValueError("--pumps must be at least 1")
        if self.rate <= 0 or not math.isfinite(self.rate):
            raise ValueError("--rate must be a positive number of messages per second")
        if self.duration_s <= 0:
            raise ValueError("--duration must be positive")
        if self.processes < 1 or self.connections < 1:
            raise ValueError("--processes and --connections must be at least 1")
        if self.processes * self.connections > self.pumps:
            raise ValueError("more connections than pumps: lower --processes or --connections")
        if self.qos not in (0, 1):
            raise ValueError("--qos must be 0 or 1")
        if not 1 <= self.inflight <= MAX_MESSAGE_IDS:
            raise ValueError(f"--inflight must be in 1..{MAX_MESSAGE_IDS} (MQTT message ids)")
        if self.interval_s < 1:
            raise ValueError("--interval must be at least 1 second")
        if not re.fullmatch(PUMP_ID_PATTERN, load_pump_id(self.id_prefix, self.pumps - 1)):
            raise ValueError("--id-prefix: use letters, digits, - and _ (pump ids <= 64 chars)")


@dataclass
class Progress:
    """Totals over all workers at one moment (the live line)."""

    elapsed_s: float
    sent: int
    acked: int
    refused: int
    lost: int
    inflight: int
    errors: int


@dataclass
class LoadReport:
    """What a run did: counts, latency, and what it cost."""

    config: LoadConfig
    pumps: int
    elapsed_s: float
    """Wall time from the start signal to the last send."""
    sent: int
    acked: int
    refused: int
    """PUBACKs with an error reason code."""
    unacked: int
    """Lost with a dropped connection, or still unacknowledged after the drain timeout."""
    errors: int
    """Connection losses (each followed by a reconnect)."""
    latency: Histogram
    cpu_s: float
    """CPU (user + system) of the workers and the parent from the start signal to the end."""
    cpu_total_s: float
    """The same including the workers' start-up (imports, building templates, connecting)."""
    peak_rss_bytes: int
    """Sum of the processes' peak resident memory."""
    pump_state_bytes: int
    """Resident memory the pumps' templates and state added (measured while building them)."""
    setup_s: float
    errors_text: list[str] = field(default_factory=list)
    interrupted: bool = False
    """Ended early by Ctrl-C: the figures cover the part that ran."""

    @property
    def failed(self) -> int:
        return self.refused + self.unacked

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def acked_rate(self) -> float:
        return self.acked / self.elapsed_s if self.elapsed_s else 0.0

    def lines(self) -> list[str]:
        c = self.config
        q = self.latency.quantile
        p50, p99, top = q(0.5), q(0.99), self.latency.max_s
        per_pump_cpu_us = self.cpu_s / self.elapsed_s / self.pumps * 1e6 if self.elapsed_s else 0
        out = [
            f"sim load: {self.pumps} pumps, {c.processes} process(es) x {c.connections} "
            f"connection(s), QoS {c.qos}, target {c.rate:,.0f} msg/s for {c.duration_s:g} s"
            + (" - INTERRUPTED" if self.interrupted else ""),
            f"sent          {self.sent:>12,}  ({self.rate:,.0f} msg/s over {self.elapsed_s:.1f} s)",
        ]
        if c.qos:
            share = 100.0 * self.acked / self.sent if self.sent else 0.0
            out += [
                f"acknowledged  {self.acked:>12,}  ({share:.2f} %, {self.acked_rate:,.0f} msg/s)",
                f"failed        {self.failed:>12,}  (refused {self.refused}, "
                f"unacknowledged {self.unacked})",
            ]
            if p50 is not None and p99 is not None:
                out.append(
                    f"latency       publish -> PUBACK p50 {p50 * 1e3:.2f} ms, "
                    f"p99 {p99 * 1e3:.2f} ms, max {top * 1e3:.1f} ms"
                )
        out += [
            f"errors        {self.errors:>12,}  (connection losses)",
            f"cpu           {self.cpu_s:.1f} s ({100 * self.cpu_s / max(self.elapsed_s, 1e-9):.0f} "
            f"% of one core); {self.cpu_s / max(self.sent, 1) * 1e6:.1f} us per message; "
            f"{per_pump_cpu_us:.1f} us per simulated pump per second",
            f"memory        peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB over "
            f"{c.processes + 1} processes ({self.peak_rss_bytes / self.pumps / 1024:.1f} KiB per "
            f"pump, interpreters included); pump state {self.pump_state_bytes / self.pumps:.0f} "
            "B per pump",
        ]
        out += [f"error: {e}" for e in self.errors_text]
        return out


def load_pump_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index + 1:06d}"


# Templates ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Template:
    """One pump's telemetry, cut around its time, seq and reservoir_ml."""

    pump_id: str
    topic: str
    parts: tuple[bytes, bytes, bytes, bytes]
    capacity_ml: float
    alarm_ml: float
    drain_ml: float
    """Reservoir drop per message (programmed flow x interval)."""
    used_ml: float
    phase_s: int


def templates(config: LoadConfig, indexes: range) -> list[_Template]:
    """Validated message templates for the pumps at `indexes` of the fleet."""
    specs = make_fleet(config.pumps, config.seed)
    out = []
    for i in indexes:
        spec = specs[i]
        pid = load_pump_id(config.id_prefix, i)
        rate = round(spec.rate_ul_per_h, 3)
        fields = {
            "delivered_ul_per_h": rate,
            "programmed_rate_ul_per_h": rate,
            "programmed_dose_mcg_per_day": spec.schedule.dose_mcg_per_day,
            "reservoir_ml": _SENTINEL_RESERVOIR,
            "reservoir_capacity_ml": spec.reservoir_capacity_ml,
            "low_reservoir_alarm_ml": spec.low_reservoir_alarm_ml,
            "concentration_mcg_per_ml": spec.concentration_mcg_per_ml,
            "battery_pct": round(spec.initial_battery_pct, 1),
            "battery_eri": False,
            "pump_state": "infusing",
            "alarms": [],
            # The load generator's reservoir falls exactly as programmed: a calculated volume.
            "reservoir_source": "calculated",
            "reporting_interval_s": int(spec.reporting_interval_s),
            "scheduled_ul_per_h": rate,
        }
        entry = build_entry(pid, Observation("telemetry", _SENTINEL_TIME, fields))
        payload = entry.payload(_SENTINEL_SEQ)
        spots = [payload.find(s) for s in _SLOTS]
        if any(p < 0 or payload.count(s) != 1 for p, s in zip(spots, _SLOTS, strict=True)):
            raise RuntimeError(f"template for {pid}: a sentinel is missing or repeated")
        if spots != sorted(spots):
            raise RuntimeError(f"template for {pid}: unexpected field order")
        t, s, r = spots
        parts = (
            payload[:t],
            payload[t + len(_SLOTS[0]) : s],
            payload[s + len(_SLOTS[1]) : r],
            payload[r + len(_SLOTS[2]) :],
        )
        span = spec.reservoir_capacity_ml - spec.low_reservoir_alarm_ml - 0.5
        drain = spec.rate_ul_per_h / 1000.0 * config.interval_s / 3600.0
        used = (spec.reservoir_capacity_ml - (spec.initial_reservoir_ml or 0.0)) % span
        out.append(
            _Template(
                pid,
                entry.topic,
                parts,
                spec.reservoir_capacity_ml,
                spec.low_reservoir_alarm_ml,
                drain,
                used,
                spec.report_offset_s % config.interval_s,
            )
        )
    return out


def render(t: _Template, round_: int, seq_start: int, t0: int, interval_s: int) -> bytes:
    """Payload of round `round_` of a pump, device time not capped (tests and benchmarks use
    it; the worker calls `_pacing.payload` on the same row, capped at the wall clock)."""
    return payload(_row(t, t0), round_, seq_start, interval_s, sys.maxsize)


def _row(t: _Template, t0: int, conn: Connection | None = None) -> Row:
    """A pump flat for the hot loop (`_pacing.Row`)."""
    return (
        conn,
        t.topic,
        *t.parts,
        t0 + t.phase_s,
        t.capacity_ml,
        t.used_ml,
        t.drain_ml,
        t.capacity_ml - t.alarm_ml - 0.5,
    )


# The worker process ---------------------------------------------------------------------------
# A worker is `python -m sim_fleet._load_worker`: a fresh interpreter (no fork of a threaded
# parent, no re-import of the caller's main module). The parent writes one JSON line with the job,
# then `go` (or `stop`); the worker answers with JSON lines: `ready`, `progress` every 0.1 s, and
# finally `result` or `fatal`. Its logs go to stderr.


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _say(**message: Any) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def worker_main() -> int:
    """One worker: the job from stdin, JSON lines to stdout (see above)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it sends `stop`
    job = json.loads(sys.stdin.buffer.readline())
    logs.setup(job.get("log_level", "INFO"))
    config = LoadConfig(**job["config"])
    broker = _broker_from(job["broker"])
    try:
        result = _work(int(job["index"]), config, broker, job["plan"])
    except (ConnectError, ConnectionLost) as exc:
        _say(fatal=str(exc))
        return 1
    except Exception as exc:  # a bug: say so rather than leave the parent waiting
        log.exception("load worker failed")
        _say(fatal=f"{type(exc).__name__}: {exc}")
        return 1
    _say(result=result)
    return 0


def _broker_to(broker: BrokerOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(broker).items()}


def _broker_from(data: dict[str, Any]) -> BrokerOptions:
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if data.get(key):
            data[key] = Path(data[key])
    return BrokerOptions(**data)


def _work(index: int, config: LoadConfig, broker: BrokerOptions, plan: dict[str, Any]) -> Any:
    rss0 = _rss_bytes()
    shard = templates(config, range(index, config.pumps, config.processes))
    pump_bytes = max(0, _rss_bytes() - rss0)
    latency = Histogram()
    conns = [
        Connection(
            broker,
            f"{config.client_prefix}-{index}-{c}",
            max_inflight=config.inflight,
            latency=latency,
        )
        for c in range(min(config.connections, len(shard)))
    ]
    for conn in conns:
        conn.connect()
    t0 = int(plan["t0"])
    rows = _rows(shard, conns, t0)
    _say(ready=True)
    if sys.stdin.buffer.readline().strip() != b"go":
        for conn in conns:
            conn.close()
        return _result(index, len(rows), 0.0, 0, conns, 0, 0, latency, 0.0, pump_bytes, [])

    cpu0 = time.process_time()
    links = _Links(conns, config.qos)
    start = time.monotonic()
    sent, shown = _window(links, rows, config, int(plan["seq_start"]), start)
    elapsed = time.monotonic() - start
    if config.qos:
        links.drain(time.monotonic() + config.drain_timeout_s, shown, sent)
    unacked = links.lost + sum(c.inflight for c in conns) if config.qos else 0
    for conn in conns:
        conn.close()
    links.progress(sent)
    return _result(
        index,
        len(rows),
        elapsed,
        sent,
        conns,
        unacked,
        links.errors,
        latency,
        time.process_time() - cpu0,
        pump_bytes,
        links.errors_text,
    )


def _rows(shard: list[_Template], conns: list[Connection], t0: int) -> list[Row]:
    """The pumps as flat rows for the hot loop (`_pacing.Row`), dealt over the connections."""
    return [_row(t, t0, conns[k % len(conns)]) for k, t in enumerate(shard)]


def _window(
    links: _Links, rows: list[Row], config: LoadConfig, seq_start: int, start: float
) -> tuple[int, float]:
    """Send at the worker's rate until the window ends or the parent says `stop`; (the count,
    when the counters were last told)."""
    rate, total, min_batch = share(config.rate, config.duration_s, config.processes)
    end = start + config.duration_s
    qos, interval = config.qos, config.interval_s
    sent = k = rnd = 0  # sent so far; the next pump, and the round it is in
    housekeeping = start
    wall_cap = int(time.time())
    stopped = False
    while not stopped:
        now = time.monotonic()
        batch, last = release(now, start, end, rate, sent, total, min_batch)
        if batch:
            n, k, rnd = _publish(rows, k, rnd, batch, qos, now, seq_start, interval, wall_cap)
            sent += n
            links.flush()
        if last:
            break
        pending = links.pending()
        t, stopped = links.poll(
            select_timeout(time.monotonic(), start, sent, min_batch, rate, pending)
        )
        if t - housekeeping > 0.1:
            housekeeping = t
            wall_cap = int(time.time())
            links.tick(t)
            links.progress(sent)
    return sent, housekeeping


def _publish(
    rows: list[Row],
    k: int,
    rnd: int,
    batch: int,
    qos: int,
    now: float,
    seq_start: int,
    interval: int,
    wall_cap: int,
) -> tuple[int, int, int]:
    """Queue up to `batch` messages from pump `k` of round `rnd` on, stopping early at a full
    window or a lost connection; returns (queued, next pump, its round)."""
    n_pumps = len(rows)
    make = payload
    n = 0
    while n < batch:
        p = rows[k]
        conn = p[0]
        if (qos and conn.inflight >= conn.window) or not conn.connected:
            break  # backpressure, or reconnecting: wait
        conn.publish(p[1], make(p, rnd, seq_start, interval, wall_cap), qos=qos, now=now)
        n += 1
        k += 1
        if k == n_pumps:
            k = 0
            rnd += 1
    return n, k, rnd


class _Links:
    """A worker's connections and what happens to them: the selector over them and the
    parent's stdin, writes, reads, keep-alive, reconnects, and the counts of what was lost."""

    def __init__(self, conns: list[Connection], qos: int) -> None:
        self.conns = conns
        self.qos = qos
        self.lost = self.errors = 0
        self.errors_text: list[str] = []
        self.sel = selectors.DefaultSelector()
        self.sel.register(0, selectors.EVENT_READ, None)  # the parent's `stop`, or EOF
        self._fds: dict[int, int] = {}
        for conn in conns:
            self._register(conn)

    def _register(self, conn: Connection) -> None:
        self._fds[id(conn)] = conn.fileno()
        self.sel.register(self._fds[id(conn)], selectors.EVENT_READ, conn)

    def broken(self, conn: Connection, exc: Exception | None) -> None:
        """Count the connection's unacknowledged publishes as lost; reconnect (or try later)."""
        if exc is not None:
            self.errors += 1
            self.errors_text.append(str(exc))
            log.warning("connection lost; reconnecting", extra={"error": str(exc)})
        self.lost += conn.inflight if self.qos else 0
        conn.reset()
        fd = self._fds.pop(id(conn), None)
        if fd is not None:
            self.sel.unregister(fd)
        try:
            conn.connect()
        except ConnectError:
            time.sleep(0.2)  # housekeeping tries again
            return
        self._register(conn)

    def flush(self) -> None:
        """Write what the connected connections have queued."""
        for conn in self.conns:
            if conn.connected and conn.wants_write:
                try:
                    conn.write()
                except ConnectionLost as exc:
                    self.broken(conn, exc)

    def pending(self) -> bool:
        return any(c.wants_write for c in self.conns)

    def poll(self, timeout: float) -> tuple[float, bool]:
        """Wait up to `timeout`, read what arrived; (the time after the wait, `stop` seen)."""
        stopped = False
        events = self.sel.select(timeout)
        t = time.monotonic()
        for key, _ in events:
            conn = key.data
            if conn is None:
                stopped = True
                continue
            try:
                conn.read(t)
            except ConnectionLost as exc:
                self.broken(conn, exc)
        return t, stopped

    def tick(self, t: float) -> None:
        """Keep-alive, and reconnect those that are down."""
        for conn in self.conns:
            if not conn.connected:
                self.broken(conn, None)
                continue
            try:
                conn.tick(t)
            except ConnectionLost as exc:
                self.broken(conn, exc)

    def drain(self, deadline: float, shown: float, sent: int) -> None:
        """After the window: write and read until nothing is in flight or it is `deadline`;
        the counters (`sent` of them the sender's) are told every 0.1 s after `shown`."""
        housekeeping = shown
        while time.monotonic() < deadline:
            self.flush()
            if not any(c.inflight or c.wants_write for c in self.conns if c.connected):
                break
            for key, _ in self.sel.select(0.01):
                if key.data is not None:
                    try:
                        key.data.read()
                    except ConnectionLost as exc:
                        self.broken(key.data, exc)
            if time.monotonic() - housekeeping > 0.1:
                housekeeping = time.monotonic()
                self.progress(sent)

    def progress(self, sent: int) -> None:
        """Tell the parent the counters (the live line)."""
        _say(progress=[sent, *_counts(self.conns), self.lost, self.errors])


def _counts(conns: list[Connection]) -> list[int]:
    """acked, refused, in flight: summed over the connections."""
    return [
        sum(c.acked for c in conns),
        sum(c.refused for c in conns),
        sum(c.inflight for c in conns),
    ]


def _result(
    index: int,
    pumps: int,
    elapsed: float,
    sent: int,
    conns: list[Connection],
    unacked: int,
    errors: int,
    latency: Histogram,
    cpu_s: float,
    pump_bytes: int,
    errors_text: list[str],
) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    acked, refused, _ = _counts(conns)
    return {
        "index": index,
        "pumps": pumps,
        "elapsed_s": elapsed,
        "sent": sent,
        "acked": acked,
        "refused": refused,
        "unacked": unacked,
        "errors": errors,
        "latency": latency.to_dict(),
        "cpu_s": cpu_s,
        "cpu_total_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "pump_state_bytes": pump_bytes,
        "errors_text": errors_text[:5],
    }


# The parent -----------------------------------------------------------------------------------


def _plan(config: LoadConfig, now: float) -> dict[str, Any]:
    """Device times and seqs shared by the workers: the last round ends before `now`."""
    rate = config.rate / config.processes
    smallest_shard = max(1, config.pumps // config.processes)
    rounds = math.ceil(rate * config.duration_s / smallest_shard) + 2
    t0 = int(now) - (rounds + 1) * config.interval_s - 60
    seq_start = config.seq_start if config.seq_start is not None else seq_base(now)
    return {"rounds": rounds, "t0": t0, "seq_start": seq_start}


class _Worker:
    """The parent's handle on one worker process and the lines it sends."""

    def __init__(self, index: int, job: dict[str, Any]) -> None:
        self.index = index
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sim_fleet._load_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.stdout = self.proc.stdout
        os.set_blocking(self.stdout.fileno(), False)
        self._buf = b""
        self.ready = False
        self.progress = [0] * 6
        self.result: dict[str, Any] | None = None
        self.fatal: str | None = None
        self.tell(json.dumps(job))

    def tell(self, line: str) -> None:
        try:
            self.stdin.write(line.encode() + b"\n")
            self.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it has ended; its exit is noticed elsewhere

    def pump(self) -> None:
        """Read whatever it has said."""
        try:
            data = os.read(self.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        if not data:
            if self.result is None and self.fatal is None:
                self.proc.wait()
                self.fatal = f"load worker {self.index} exited ({self.proc.returncode})"
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "ready" in message:
                self.ready = True
            elif "progress" in message:
                self.progress = message["progress"]
            elif "result" in message:
                self.result = message["result"]
            elif "fatal" in message:
                self.fatal = message["fatal"]

    @property
    def done(self) -> bool:
        return self.result is not None or self.fatal is not None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()


def run_load(
    config: LoadConfig,
    broker: BrokerOptions,
    progress: Callable[[Progress], None] | None = None,
    *,
    progress_every_s: float = 0.5,
    ready_timeout_s: float = 120.0,
) -> LoadReport:
    """Run the load; `progress(Progress)` is called every `progress_every_s` while it runs.

    Ctrl-C (KeyboardInterrupt) ends the run early and still returns the report. Raises
    ConnectError (one line) when a worker cannot reach the broker.
    """
    config.check()
    if not config.client_prefix:
        config = dataclasses.replace(config, client_prefix=f"sim-load-{uuid.uuid4().hex[:8]}")
    plan = _plan(config, time.time())
    job = {
        "config": asdict(config),
        "broker": _broker_to(broker),
        "plan": plan,
        "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
    }
    setup_start = time.monotonic()
    workers = [_Worker(i, {**job, "index": i}) for i in range(config.processes)]
    sel = selectors.DefaultSelector()
    for w in workers:
        sel.register(w.stdout.fileno(), selectors.EVENT_READ, w)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not all(w.ready for w in workers):
            for key, _ in sel.select(0.2):
                key.data.pump()
            failed = [w.fatal for w in workers if w.fatal]
            if failed:
                raise ConnectError(str(failed[0]))
            if time.monotonic() > deadline:
                raise RuntimeError(f"load workers not ready within {ready_timeout_s:g} s")
        setup_s = time.monotonic() - setup_start
        cpu0 = time.process_time()
        for w in workers:
            w.tell("go")
        start = time.monotonic()
        shown = start
        interrupted = False
        while not all(w.done for w in workers):
            try:
                for key, _ in sel.select(0.1):
                    key.data.pump()
                    if key.data.done:
                        sel.unregister(key.fd)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                for w in workers:
                    w.tell("stop")
            now = time.monotonic()
            if progress is not None and now - shown >= progress_every_s:
                shown = now
                progress(_progress(workers, now - start))
        if progress is not None:
            progress(_progress(workers, time.monotonic() - start))
        parent_cpu = time.process_time() - cpu0
    finally:
        for w in workers:
            w.tell("stop")
            w.close()
        sel.close()
    fatal = [w.fatal for w in workers if w.fatal]
    if fatal:
        raise ConnectError(str(fatal[0]))
    report = _report(config, [w.result for w in workers if w.result], setup_s, parent_cpu)
    report.interrupted = interrupted
    return report


def _progress(workers: list[_Worker], elapsed: float) -> Progress:
    sent, acked, refused, inflight, lost, errors = (
        sum(int(w.progress[i]) for w in workers) for i in range(6)
    )
    return Progress(elapsed, sent, acked, refused, lost, inflight, errors)


def _report(
    config: LoadConfig, parts: list[dict[str, Any]], setup_s: float, parent_cpu_s: float
) -> LoadReport:
    latency = Histogram()
    for p in parts:
        latency.merge(Histogram.from_dict(p["latency"]))
    own = resource.getrusage(resource.RUSAGE_SELF)
    return LoadReport(
        config=config,
        pumps=sum(p["pumps"] for p in parts),
        elapsed_s=max(p["elapsed_s"] for p in parts),
        sent=sum(p["sent"] for p in parts),
        acked=sum(p["acked"] for p in parts),
        refused=sum(p["refused"] for p in parts),
        unacked=sum(p["unacked"] for p in parts),
        errors=sum(p["errors"] for p in parts),
        latency=latency,
        cpu_s=sum(p["cpu_s"] for p in parts) + parent_cpu_s,
        cpu_total_s=sum(p["cpu_total_s"] for p in parts) + parent_cpu_s,
        peak_rss_bytes=sum(p["peak_rss_bytes"] for p in parts) + own.ru_maxrss * 1024,
        pump_state_bytes=sum(p["pump_state_bytes"] for p in parts),
        setup_s=setup_s,
        errors_text=[e for p in parts for e in p["errors_text"]],
    )
