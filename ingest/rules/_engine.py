"""The rule engine: every committed message in, Findings out when an alert condition changes.

The engine keeps the facts every rule reads (`_facts.Pump`: the last reading by seq, the pump's
alarms ordered by seq, its interval and alarm volume), dispatches each message to the rules
(one module per rule family: _alarms, _flow, _reservoir, _refill, _battery, _mri, _dose,
_silence, _gap, _notices), asks each rule's verdict, and feeds it through one hysteresis latch per
(pump, rule). Time-based rules also sit in one heap of per-pump wake-up times that `tick()` pops,
so the watchdog does no work for pumps that are fine.

Times inside are float seconds since the epoch: device time for everything a message says,
the caller's clock for `tick()` (and for "last heard" when `received_at` is passed).
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from ingest.rules import _gap
from ingest.rules._alarms import CriticalPumpAlarm, NoncriticalPumpAlarm
from ingest.rules._battery import Battery
from ingest.rules._dose import LargeDoseChange
from ingest.rules._facts import INF, Pump, Rule
from ingest.rules._flow import OverInfusion, UnderInfusion
from ingest.rules._gap import SequenceGap
from ingest.rules._latch import Latch
from ingest.rules._mri import PostMri
from ingest.rules._notices import ClinicDataMissing, FlowNotObservable
from ingest.rules._refill import PocketFill, RefillDiscrepancy, history
from ingest.rules._reservoir import LowReservoir, RefillDue
from ingest.rules._silence import TelemetrySilence
from ingest.rules._thresholds import PumpProfile, Thresholds
from pumpfleet.contract import (
    AlarmCleared,
    AlarmRaised,
    Message,
    MotorStall,
    MotorStallRecovery,
    PumpState,
    Resume,
    Status,
    Suspend,
    Telemetry,
)
from pumpfleet.findings import RULES, Finding, Priority


class RuleEngine:
    """Evaluates domain.md's alert rules per pump; pure logic, no I/O, not thread-safe.

    Feed every committed message once, in per-pump order, to `observe()` (or `warm()` when
    rebuilding state after a restart), and call `tick(now)` every few seconds for the watchdog.
    Each returns the Findings whose active state or priority changed for a (pump, rule).
    """

    def __init__(
        self,
        thresholds: Thresholds | None = None,
        profiles: Mapping[str, PumpProfile] | None = None,
    ) -> None:
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self._pumps: dict[str, Pump] = {}
        self._heap: list[tuple[float, str]] = []
        self._shared: dict[tuple[tuple[str, Any], ...], Thresholds] = {}
        self._watch_since_s: float | None = None
        self._quiet = False
        self.rules: tuple[Rule, ...] = (
            # Order matters only for `observe`: facts a later rule reads come first.
            PostMri(),
            LargeDoseChange(_gap.complete_since),
            CriticalPumpAlarm(),
            NoncriticalPumpAlarm(),
            OverInfusion(),
            UnderInfusion(),
            RefillDiscrepancy(),
            PocketFill(),
            LowReservoir(),
            RefillDue(history),
            Battery(),
            TelemetrySilence(lambda: self._watch_since_s),
            SequenceGap(),
            FlowNotObservable(),
            ClinicDataMissing(),
        )
        self._by_name = {r.name: r for r in self.rules}
        self._observers: tuple[Rule, ...] = tuple(
            r for r in self.rules if type(r).observe is not Rule.observe
        )
        """Rules with state of their own to update: the others only judge the facts."""
        self._silence = self._by_name["telemetry_silence"]
        self._timed = tuple(r for r in self.rules if r.timed)
        missing = set(RULES) - set(self._by_name)
        if missing:
            raise RuntimeError(f"rules without an implementation: {sorted(missing)}")
        for profile in (profiles or {}).values():
            self.set_profile(profile)

    # Public ------------------------------------------------------------------------------------

    def observe(self, msg: Message, received_at: datetime | None = None) -> list[Finding]:
        """Evaluate one committed message; `received_at` (the caller's clock) makes silence
        count from when messages arrive rather than from the device's clock."""
        out: list[Finding] = []
        self._process(msg, received_at, out)
        return out

    def warm(self, msg: Message, received_at: datetime | None = None) -> None:
        """Update state from a message without reporting, e.g. replaying recent history after a
        restart: conditions already open come back open, so nothing is raised twice."""
        self._quiet = True
        try:
            self._process(msg, received_at, [])
        finally:
            self._quiet = False

    def warm_done(self) -> None:
        """History replayed: seqs missing from it are not losses. Stored history keeps only
        each pump's latest status, so the statuses between readings are always missing from
        it; a loss before the restart was reported then, and its open alert is restored."""
        for p in self._pumps.values():
            g = p.state.get("gaps")
            if g is not None:
                g.missing.clear()
                g.lost.clear()
                g.lost_count = 0
                g.span = None

    def tick(self, now: datetime) -> list[Finding]:
        """The watchdog: silence, post-MRI deadlines, lost seqs, expiring notices, EOS dates.

        Silence counts from the first tick at the earliest, so a restart or a warm-up from
        history cannot page for every pump at once.
        """
        now_s = now.timestamp()
        if self._watch_since_s is None:
            self._watch_since_s = now_s
            for p in self._pumps.values():
                self._schedule(p, p.last_time_s)
        out: list[Finding] = []
        heap = self._heap
        while heap and heap[0][0] <= now_s:
            due_s, pump_id = heapq.heappop(heap)
            due = self._pumps.get(pump_id)
            if due is None or due.heap_s != due_s:
                continue  # superseded by an earlier wake-up
            due.heap_s = INF
            for rule in self._timed:
                self._judge(due, rule, now_s, now, None, out)
            self._schedule(due, now_s)
        return out

    def set_profile(self, profile: PumpProfile) -> None:
        """Add or replace what the clinic knows about a pump (alarm volume, interval, risk)."""
        p = self._pumps.get(profile.pump_id)
        th = self._thresholds_for(profile)
        if p is None:
            p = self._pumps[profile.pump_id] = Pump(profile.pump_id, profile, th)
        else:
            p.profile = profile
            p.th = th
            p.derive()
        p.heap_s = INF  # deadlines may have moved: the old heap entry goes stale
        self._schedule(p, p.last_time_s)

    def restore(
        self, pump_id: str, rule: str, priority: Priority, since: datetime | None = None
    ) -> None:
        """Mark an alert the lifecycle still holds open (after `warm()`), so the engine reports
        its end when the condition is seen gone, even if history no longer shows its cause."""
        impl = self._by_name.get(rule)
        if impl is None:
            raise ValueError(f"rule {rule!r} is not one of {', '.join(RULES)}")
        p = self._pump(pump_id)
        latch = p.latches.get(rule)
        if latch is None:
            latch = p.latches[rule] = Latch()
        if latch.priority is not None:
            return
        latch.priority = priority
        latch.off_s = impl.off_s(p.th)
        since_s = since.timestamp() if since else max(p.last_time_s, 0.0)
        impl.restore(p, priority, since_s)
        p.heap_s = INF
        self._schedule(p, p.last_time_s)

    def active(self, pump_id: str) -> dict[str, Priority]:
        """The alerts the engine holds open for a pump, by rule."""
        p = self._pumps.get(pump_id)
        if p is None:
            return {}
        return {rule: lt.priority for rule, lt in p.latches.items() if lt.priority is not None}

    def __len__(self) -> int:
        return len(self._pumps)

    def state_size(self, pump_id: str | None = None) -> int:
        """Approximate bytes of per-pump state (one pump, or all), thresholds excluded."""
        pumps: Iterable[Pump] = self._pumps.values() if pump_id is None else [self._pumps[pump_id]]
        seen: set[int] = set()
        return sum(_deep_size(p, seen) for p in pumps)

    # Processing ----------------------------------------------------------------------------------

    def _pump(self, pump_id: str) -> Pump:
        p = self._pumps.get(pump_id)
        if p is None:
            p = self._pumps[pump_id] = Pump(pump_id, None, self.thresholds)
        return p

    def _thresholds_for(self, profile: PumpProfile) -> Thresholds:
        """Pumps with the same overrides share one Thresholds object."""
        if not profile.overrides:
            return self.thresholds
        try:
            key = tuple(sorted(profile.overrides.items()))
            hash(key)
        except TypeError:
            return profile.thresholds(self.thresholds)
        th = self._shared.get(key)
        if th is None:
            th = self._shared[key] = profile.thresholds(self.thresholds)
        return th

    def _process(self, msg: Message, received_at: datetime | None, out: list[Finding]) -> None:
        p = self._pump(msg.pump_id)
        at = msg.time
        t = at.timestamp()
        seq = msg.seq
        verdict = _gap.accept(p, seq, t, event=msg.kind == "event")
        if verdict == _gap.SEEN:
            return
        if verdict < 0:
            self._reset_seq(p, seq)
        if t > p.last_time_s:
            p.last_time_s = t
        heard_s: float | None = None
        if not (isinstance(msg, Status) and not msg.online):  # the will says nothing of the pump
            heard_s = received_at.timestamp() if received_at is not None else t
            if heard_s > p.last_heard_s:
                p.last_heard_s = heard_s
        self._facts(p, msg, t)
        for rule in self._observers:
            rule.observe(p, msg, t)
        silence = self._silence
        for rule in self.rules:
            if rule is silence:
                if heard_s is not None:  # heard now: silence is judged on the same clock
                    self._judge(p, rule, max(heard_s, p.last_heard_s), at, seq, out)
                continue
            self._judge(p, rule, t, at, seq, out)
        p.heap_s = INF
        self._schedule(p, t)

    def _facts(self, p: Pump, msg: Message, t: float) -> None:
        """The facts several rules read, each ordered by seq."""
        p.new_tel = False
        seq = msg.seq
        if isinstance(msg, Telemetry):
            if seq <= p.tel_seq:
                return  # older than the reading already used
            p.new_tel = True
            p.prev_tel_s = p.tel_s
            p.tel, p.tel_s, p.tel_seq = msg, t, seq
            p.capacity_ml = msg.reservoir_capacity_ml
            p.conc = msg.concentration_mcg_per_ml
            if msg.reporting_interval_s is not None:
                p.reported_interval_s = float(msg.reporting_interval_s)
            p.derive()
            if seq > p.alarm_floor_seq:
                alarms = set(msg.alarms)
                for alarm, (ev_seq, raised) in list(p.alarm_ev.items()):
                    if ev_seq > seq:  # an alarm event newer than this snapshot wins
                        if raised:
                            alarms.add(alarm)
                        else:
                            alarms.discard(alarm)
                    else:
                        del p.alarm_ev[alarm]
                p.alarms = frozenset(alarms)
                p.alarm_floor_seq = seq
            if msg.pump_state is PumpState.SUSPENDED and not p.mri_active:
                p.suspended = True
            elif msg.pump_state is PumpState.INFUSING and msg.delivered_ul_per_h > 0:
                p.suspended = False
                if p.stall_event and seq > p.stall_seq:
                    p.stall_event = False  # a lost recovery event: the rotor turns
        elif isinstance(msg, (AlarmRaised, AlarmCleared)):
            if seq <= p.alarm_floor_seq:
                return  # a newer telemetry snapshot already says
            alarm = msg.alarm
            prev = p.alarm_ev.get(alarm)
            if prev is not None and prev[0] > seq:
                return
            raised = isinstance(msg, AlarmRaised)
            p.alarm_ev[alarm] = (seq, raised)
            p.alarms = p.alarms | {alarm} if raised else p.alarms - {alarm}
        elif isinstance(msg, MotorStall):
            if not p.mri_active:  # expected during and after an MRI scan
                p.stall_event = True
                p.stall_seq = max(p.stall_seq, seq)
        elif isinstance(msg, MotorStallRecovery):
            p.recovery_seq = max(p.recovery_seq, seq)
            if seq > p.stall_seq:
                p.stall_event = False
        elif isinstance(msg, Suspend):
            p.suspended = True
        elif isinstance(msg, Resume):
            p.suspended = False

    def _reset_seq(self, p: Pump, seq: int) -> None:
        """An old seq with a newer time than anything seen: the agent lost its seq store and
        started again. Everything ordered by seq starts again with it."""
        p.max_seq = seq
        p.tel_seq = -1
        p.alarm_floor_seq = -1
        p.alarm_ev = {}
        p.dose_seq = -1
        p.stall_seq = -1
        p.recovery_seq = -1
        for rule in self.rules:
            rule.reset(p)

    def _judge(
        self, p: Pump, rule: Rule, t: float, at: datetime, seq: int | None, out: list[Finding]
    ) -> None:
        """Feed a rule's verdict through its latch; report starts, ends, priority changes and
        (while open) a change of what it is about."""
        raw, on_s, off_s, key = rule.judge(p, t)
        name = rule.name
        latches = p.latches
        latch = latches.get(name)
        if latch is None:
            if raw is None:
                return
            latch = latches[name] = Latch()
        before = latch.priority
        if raw is not None:
            latch.off_s = off_s
        else:
            off_s = latch.off_s
        changed = latch.update(raw, t, on_s, off_s)
        if changed:
            latch.key = key if latch.priority is not None else None
        elif raw is not None and latch.priority is not None and key != latch.key:
            latch.key = key
            changed = True
        if latch.idle:
            del latches[name]
        if not changed or self._quiet:
            return
        active = latch.priority is not None
        summary, details = rule.describe(p, active)
        priority = latch.priority or before or raw or "info"
        out.append(Finding(p.pump_id, name, active, priority, at, summary, details, seq))

    def _schedule(self, p: Pump, after_s: float) -> None:
        """Keep one heap entry per pump at its earliest deadline after `after_s`."""
        nxt = INF
        for rule in self._timed:
            due = rule.due(p, after_s)
            if after_s < due < nxt:
                nxt = due
        if nxt < p.heap_s:
            p.heap_s = nxt
            heapq.heappush(self._heap, (nxt, p.pump_id))


def _deep_size(obj: Any, seen: set[int]) -> int:
    if id(obj) in seen or isinstance(obj, (Thresholds, PumpProfile, type)):
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_deep_size(k, seen) + _deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        size += sum(_deep_size(v, seen) for v in obj)
    elif hasattr(obj, "__slots__"):
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(obj, name):
                    size += _deep_size(getattr(obj, name), seen)
    return size
