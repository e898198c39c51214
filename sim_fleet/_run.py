"""`pumpfleet sim run SCENARIO`: a scenario's fleet through the real broker, paced in time.

One thread drives everything: it advances every pump to the run's simulated "now", turns each
observation into a message with `device_agent.build_entry` (the agent's envelope and contract
check), gives it the pump's next seq, and publishes it at QoS 1 over a few shared connections
(`pumps_per_connection` pumps each, so thousands of pumps need a handful of sockets). A pump's
messages always use the same connection, so they reach the broker in seq order except where
the scenario says otherwise:

- `lost`: the seq is spent and nothing is sent (the receiver sees a gap);
- `duplicate`: the same bytes are published twice;
- `delay_s`: the message is held back that many simulated seconds, and later ones overtake it.

Nothing is lost on our side: a publish waits in a per-connection backlog while the in-flight
window is full, and everything unacknowledged when a connection drops is published again (in
order) after reconnecting; storage drops the redeliveries on (pump_id, seq).

Status: the model's own retained status messages go out as they happen (online at the start,
offline/online around a telemetry silence). A shared connection cannot carry a last will per
pump; the per-pump last will is the agent's job (`pumpfleet agent`).
"""

from __future__ import annotations

import heapq
import logging
import selectors
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from pumpfleet import contract
from pumpfleet.broker import BrokerOptions
from pumpfleet.envelope import Observation, build_entry
from sim_fleet._fleet import advance_fleet
from sim_fleet._mqtt import MAX_MESSAGE_IDS, ConnectError, Connection, ConnectionLost
from sim_fleet._scenario import SimRun

__all__ = ["Published", "RunOptions", "RunProgress", "RunStats", "run_scenario", "seq_base"]

log = logging.getLogger("sim_fleet._run")


def seq_base(now: float | None = None) -> int:
    """First seq of a run: microseconds since 1970, so a pump id reused by the next run of a
    scenario keeps increasing seqs, as a real pump's do across agent restarts."""
    return int((time.time() if now is None else now) * 1_000_000)


@dataclass(frozen=True)
class RunOptions:
    pumps_per_connection: int = 500
    inflight: int = 10_000
    """Unacknowledged publishes per connection (at most 65,535, and the broker's Receive Max)."""
    seq_start: int | None = None
    """First seq of every pump; None: `seq_base()` at the start of the run."""
    max_step: timedelta = timedelta(hours=1)
    """Most simulated time advanced at once: bounds memory when running at max speed."""
    max_backlog: int = 50_000
    """Messages waiting for a window before the simulation pauses to let the broker catch up."""
    tick_s: float = 0.05
    drain_timeout_s: float = 30.0
    client_prefix: str = ""


@dataclass
class RunStats:
    observations: int = 0
    """What the pumps produced (lost ones included)."""
    published: int = 0
    """PUBLISH packets handed to the broker, duplicates and resends included."""
    acked: int = 0
    refused: int = 0
    """PUBACKs with an error reason code; the message is not sent again."""
    lost: int = 0
    """Flagged lost by the scenario: a seq spent, nothing sent."""
    duplicated: int = 0
    held_back: int = 0
    invalid: int = 0
    """Observations that broke the contract (a model bug): logged, never sent, no seq."""
    resent: int = 0
    """Publishes repeated after a connection dropped."""
    reconnects: int = 0


@dataclass
class RunProgress:
    sim_time: datetime
    fraction: float
    """Share of the simulated span done (0..1)."""
    elapsed_s: float
    stats: RunStats
    behind_s: float
    """How far the simulation trails its pace (simulated seconds); 0 when keeping up."""


class Published(NamedTuple):
    """One message as sent: what a test subscriber should receive."""

    pump_id: str
    seq: int
    topic: str
    payload: bytes
    retain: bool


@dataclass
class _Link:
    """One shared connection and what waits for room in its window."""

    conn: Connection
    backlog: deque[Published] = field(default_factory=deque)
    fd: int | None = None


class _Fleet:
    """The run's connections: routing by pump, backlogs, acknowledgements and reconnects."""

    def __init__(self, broker: BrokerOptions, links: int, options: RunOptions, stats: RunStats):
        self.stats = stats
        self.sel = selectors.DefaultSelector()
        prefix = options.client_prefix or f"sim-run-{uuid.uuid4().hex[:8]}"
        self.links = [
            _Link(
                Connection(
                    broker,
                    f"{prefix}-{i}",
                    max_inflight=min(options.inflight, MAX_MESSAGE_IDS),
                    on_ack=self._acked,
                )
            )
            for i in range(links)
        ]
        self._refusals_logged = 0

    def connect(self) -> None:
        for link in self.links:
            link.conn.connect()
            self._watch(link)

    def _watch(self, link: _Link) -> None:
        link.fd = link.conn.fileno()
        self.sel.register(link.fd, selectors.EVENT_READ, link)

    def _acked(self, token: object, reason: int, latency_s: float) -> None:
        if reason < 0x80:
            self.stats.acked += 1
            return
        self.stats.refused += 1
        if self._refusals_logged < 10 and isinstance(token, Published):
            self._refusals_logged += 1
            log.error(
                "broker refused a message",
                extra={"pump_id": token.pump_id, "seq": token.seq, "reason": hex(reason)},
            )

    def send(self, link_index: int, message: Published) -> None:
        link = self.links[link_index]
        if link.backlog or not link.conn.connected or link.conn.free <= 0:
            link.backlog.append(message)
        else:
            self._publish(link, message)

    def _publish(self, link: _Link, m: Published) -> None:
        link.conn.publish(m.topic, m.payload, retain=m.retain, token=m)
        self.stats.published += 1

    @property
    def backlog(self) -> int:
        return sum(len(link.backlog) for link in self.links)

    @property
    def inflight(self) -> int:
        return sum(link.conn.inflight for link in self.links)

    @property
    def idle(self) -> bool:
        return all(
            not link.backlog and not link.conn.inflight and not link.conn.wants_write
            for link in self.links
        )

    def poll(self, timeout_s: float) -> None:
        """Move traffic: fill windows from the backlogs, write, read PUBACKs, keep alive."""
        for link in self.links:
            self._fill(link)
            if link.conn.connected and link.conn.wants_write:
                try:
                    link.conn.write()
                except ConnectionLost as exc:
                    self._lost(link, exc)
        if any(link.conn.wants_write for link in self.links if link.conn.connected):
            timeout_s = min(timeout_s, 0.001)
        for key, _ in self.sel.select(timeout_s):
            link = key.data
            try:
                link.conn.read()
            except ConnectionLost as exc:
                self._lost(link, exc)
        now = time.monotonic()
        for link in self.links:
            if not link.conn.connected:
                self._reconnect(link)
                continue
            try:
                link.conn.tick(now)
            except ConnectionLost as exc:
                self._lost(link, exc)
            self._fill(link)

    def _fill(self, link: _Link) -> None:
        conn = link.conn
        while link.backlog and conn.connected and conn.free > 0:
            self._publish(link, link.backlog.popleft())

    def _lost(self, link: _Link, exc: Exception) -> None:
        """Put everything unacknowledged back at the front of the backlog, in send order."""
        unacked = link.conn.reset()
        self.stats.resent += len(unacked)
        link.backlog.extendleft(reversed([m for m in unacked if isinstance(m, Published)]))
        if link.fd is not None:
            self.sel.unregister(link.fd)
            link.fd = None
        log.warning(
            "connection lost; will resend what was not acknowledged",
            extra={"client_id": link.conn.client_id, "error": str(exc), "resend": len(unacked)},
        )
        self._reconnect(link)

    def _reconnect(self, link: _Link) -> None:
        try:
            link.conn.connect()
        except ConnectError as exc:
            log.debug("broker still unreachable", extra={"error": str(exc)})
            time.sleep(0.1)
            return
        self.stats.reconnects += 1
        self._watch(link)
        log.info("reconnected", extra={"client_id": link.conn.client_id})

    def close(self) -> None:
        for link in self.links:
            link.conn.close()
        self.sel.close()


class _Sequencer:
    """Observations to messages: the contract check, per-pump seqs, and the transport flags."""

    def __init__(self, run: SimRun, fleet: _Fleet, stats: RunStats, options: RunOptions) -> None:
        self.fleet = fleet
        self.stats = stats
        per = options.pumps_per_connection
        self.route = {p.pump_id: i // per for i, p in enumerate(run.pumps)}
        first = options.seq_start if options.seq_start is not None else seq_base()
        self.next_seq = dict.fromkeys(self.route, first)
        self.held: list[tuple[datetime, int, bool, Published]] = []
        self._held_n = 0

    def take(self, pid: str, obs: Observation) -> None:
        self.stats.observations += 1
        try:
            entry = build_entry(pid, obs)
        except contract.ContractError as exc:  # a model bug: never on the wire, no seq spent
            self.stats.invalid += 1
            log.error(
                "invalid observation dropped",
                extra={"pump_id": pid, "kind": obs.kind, "error": str(exc)},
            )
            return
        seq = self.next_seq[pid]
        self.next_seq[pid] = seq + 1
        if obs.lost:
            self.stats.lost += 1
            return
        message = Published(pid, seq, entry.topic, entry.payload(seq), entry.retain)
        if obs.delay_s > 0:  # simulated seconds: released by the simulated clock
            self.stats.held_back += 1
            self._held_n += 1
            due = obs.sim_time + timedelta(seconds=obs.delay_s)
            heapq.heappush(self.held, (due, self._held_n, obs.duplicate, message))
            return
        self._emit(message, obs.duplicate)

    def release(self, clock: datetime, *, everything: bool = False) -> None:
        """Send held-back messages that are due at `clock` (all of them at the end)."""
        while self.held and (everything or self.held[0][0] <= clock):
            _, _, duplicate, message = heapq.heappop(self.held)
            self._emit(message, duplicate)

    def _emit(self, message: Published, duplicate: bool) -> None:
        link = self.route[message.pump_id]
        self.fleet.send(link, message)
        if duplicate:
            self.stats.duplicated += 1
            self.fleet.send(link, message)


def run_scenario(
    run: SimRun,
    broker: BrokerOptions,
    options: RunOptions | None = None,
    *,
    progress: Callable[[RunProgress], None] | None = None,
    progress_every_s: float = 0.5,
    should_stop: Callable[[], bool] = lambda: False,
) -> RunStats:
    """Publish the run's fleet paced at `run.speed` simulated seconds per wall second (None: as
    fast as possible). To change the speed, change the scenario's before `build_run`: the start
    is placed for that speed so that device times never get ahead of the wall clock.

    Raises ConnectError (one line) if the broker cannot be reached at the start; later
    connection losses are retried until the run ends.
    """
    options = options or RunOptions()
    if options.pumps_per_connection < 1:
        raise ValueError("pumps per connection must be at least 1")
    speed = run.speed
    stats = RunStats()
    links = max(1, -(-len(run.pumps) // options.pumps_per_connection))
    fleet = _Fleet(broker, links, options, stats)
    fleet.connect()
    out = _Sequencer(run, fleet, stats, options)
    span_s = max((run.end - run.start).total_seconds(), 1e-9)

    def report(clock: datetime) -> None:
        if progress is not None:
            progress(_progress(run, clock, time.monotonic() - started, stats, speed, span_s))

    clock = run.start
    started = time.monotonic()
    shown = 0.0
    try:
        while not should_stop():
            elapsed = time.monotonic() - started
            target = run.end
            if speed is not None:
                target = min(run.end, run.start + timedelta(seconds=elapsed * speed))
            room = fleet.backlog < options.max_backlog  # else let the broker catch up first
            if clock < target and room:
                until = min(target, clock + options.max_step)
                for pid, obs in advance_fleet(run.pumps, until):
                    out.take(pid, obs)
                clock = until
            out.release(clock, everything=clock >= run.end)
            fleet.poll(0.0 if clock < target and room else options.tick_s)
            if time.monotonic() - shown >= progress_every_s:
                shown = time.monotonic()
                report(clock)
            if clock >= run.end and not out.held:
                break
        deadline = time.monotonic() + options.drain_timeout_s
        while not fleet.idle and time.monotonic() < deadline and not should_stop():
            fleet.poll(options.tick_s)
            if time.monotonic() - shown >= progress_every_s:
                shown = time.monotonic()
                report(clock)
        if not fleet.idle:
            log.warning(
                "run ended with messages not acknowledged",
                extra={"backlog": fleet.backlog, "inflight": fleet.inflight},
            )
        report(clock)
    finally:
        fleet.close()
    return stats


def _progress(
    run: SimRun,
    clock: datetime,
    elapsed: float,
    stats: RunStats,
    speed: float | None,
    span_s: float,
) -> RunProgress:
    behind = 0.0
    if speed is not None:
        paced = min(run.end, run.start + timedelta(seconds=elapsed * speed))
        behind = max(0.0, (paced - clock).total_seconds())
    done = (clock - run.start).total_seconds() / span_s
    return RunProgress(clock, min(1.0, done), elapsed, stats, behind)
