"""Feed a simulator run straight into the engine (no MQTT), as a transport would deliver it."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from ingest.rules import PumpProfile, RuleEngine
from pumpfleet.contract import Message
from pumpfleet.findings import Finding
from sim_fleet import Pump, RaisedAlert, SimRun, advance_fleet


class Engine(Protocol):
    """RuleEngine, or a stand-in (e.g. one that only warms)."""

    def observe(self, msg: Message, received_at: datetime | None = None) -> list[Finding]: ...

    def tick(self, now: datetime) -> list[Finding]: ...


@dataclass
class Delivered:
    """What the engine said, with the simulated time each finding was made at."""

    findings: list[tuple[datetime, Finding]] = field(default_factory=list)
    messages: int = 0

    def raised(self) -> list[RaisedAlert]:
        """Starts and priority changes, as `SimRun.check` takes them."""
        return [
            RaisedAlert(f.pump_id, f.rule, f.priority, when)
            for when, f in self.findings
            if f.active
        ]

    def history(self, pump_id: str, rule: str) -> list[tuple[bool, str]]:
        return [
            (f.active, f.priority)
            for _, f in self.findings
            if (f.pump_id, f.rule) == (pump_id, rule)
        ]


def drive(
    engine: Engine,
    pumps: Iterable[Pump],
    start: datetime,
    end: datetime,
    step: timedelta = timedelta(minutes=5),
    honour_flags: bool = True,
    seqs: dict[str, int] | None = None,
    lag_s: Callable[[Message], float] | None = None,
) -> Delivered:
    """Advance the pumps to `end` in steps; deliver each observation at its simulated send time
    (+ its delay), twice if flagged duplicate, never if lost (its seq is still used); tick the
    watchdog at every delivery and at the end of each step with the simulated time.

    `seqs`: each pump's next seq, updated; pass the same dict to a later `drive()` of the same
    pumps (e.g. after a restart) so their seqs go on rising as a real pump's do. A pump whose
    seqs start again at 0 with later times looks like one that lost its seq store.

    `lag_s(msg)`: seconds more before `msg` arrives, e.g. telemetry held behind a backlog while
    the urgent lane stores a pump's events at once (a later event overtakes earlier readings)."""
    pumps = list(pumps)
    out = Delivered()
    seqs = {} if seqs is None else seqs
    queue: list[tuple[datetime, int, Message]] = []
    n = 0
    t = start
    while t < end:
        t = min(t + step, end)
        for pid, obs in advance_fleet(pumps, t):
            seq = seqs.get(pid, 0)
            seqs[pid] = seq + 1
            if honour_flags and obs.lost:
                continue
            msg = obs.to_message(pid, seq)
            arrival = obs.sim_time + timedelta(seconds=obs.delay_s if honour_flags else 0)
            if lag_s is not None:
                arrival += timedelta(seconds=lag_s(msg))
            for _ in range(2 if honour_flags and obs.duplicate else 1):
                n += 1
                heapq.heappush(queue, (arrival, n, msg))
        while queue and queue[0][0] <= t:
            arrival, _, msg = heapq.heappop(queue)
            out.findings += [(arrival, f) for f in engine.tick(arrival)]
            out.findings += [(arrival, f) for f in engine.observe(msg, received_at=arrival)]
            out.messages += 1
        out.findings += [(t, f) for f in engine.tick(t)]
    return out


def profiles(run: SimRun) -> dict[str, PumpProfile]:
    """What the clinic confirmed: a profile for every pump of the run (its high-risk status and
    reporting interval) except those the scenario sets up with `profile: false`."""
    return {
        p.pump_id: PumpProfile(
            pump_id=p.pump_id,
            high_risk=p.spec.high_risk,
            reporting_interval_s=p.spec.reporting_interval_s,
        )
        for p in run.pumps
        if run.has_profile(p.pump_id)
    }


def run_engine(run: SimRun, step: timedelta = timedelta(minutes=5)) -> tuple[Delivered, list[str]]:
    """A scenario run through a fresh engine that knows the run's profiles: what it said, and
    `SimRun.check`'s problems (empty: the scenario passed)."""
    delivered = drive(RuleEngine(profiles=profiles(run)), run.pumps, run.start, run.end, step)
    return delivered, run.check(delivered.raised())
