"""The rule engine: every committed message in, Findings out when an alert condition changes.

One small state object per pump holds what the rules need (last reading, a few reservoir-trend
checkpoints, alarm bits, pending deadlines, one hysteresis latch per rule that is not idle), so
`observe()` is O(1) per message and a healthy pump costs about 1.4 kB. Time-based rules
(silence, post-MRI, sequence gaps, the end of a dose-change notice) sit in one heap of per-pump
wake-up times that `tick()` pops, so the watchdog does no work for pumps that are fine.

Times inside are float seconds since the epoch: device time for everything a message says,
the caller's clock for `tick()` (and for "last heard" when `received_at` is passed).
"""

from __future__ import annotations

import heapq
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ingest.findings import RULES, Finding, Priority
from ingest.rules import conditions as cond
from ingest.rules.latch import Latch
from ingest.rules.thresholds import PumpProfile, Thresholds
from pumpfleet.contract import (
    AlarmCleared,
    AlarmRaised,
    Bolus,
    Message,
    MotorStall,
    MotorStallRecovery,
    MriEnd,
    MriStart,
    PumpAlarm,
    PumpState,
    Refill,
    Reprogram,
    Status,
    Telemetry,
)

_INF = math.inf
_DAY_S = 86_400.0
_DEFAULT_INTERVAL_S = 600.0
_MAX_CHECKPOINTS = 6
_TREND_SLACK_S = 1e-3
_TREND_SLACK_UL = 1e-6
"""Trend checkpoints kept per pump; spaced >= a quarter window, so one is always >= a window old."""

_BIT: dict[PumpAlarm, int] = {alarm: 1 << i for i, alarm in enumerate(PumpAlarm)}
_STALL = _BIT[PumpAlarm.MOTOR_STALL]
"""A motor_stall event outside an MRI counts as the motor-stall alarm (same cause)."""
_RATE_RESET = 1 << len(PumpAlarm)
_LOW = _BIT[PumpAlarm.LOW_RESERVOIR]
_ERI = _BIT[PumpAlarm.ERI]
_EOS = _BIT[PumpAlarm.EOS]
_CRITICAL_MASK = (
    _BIT[PumpAlarm.EMPTY_RESERVOIR]
    | _EOS
    | _STALL
    | _BIT[PumpAlarm.CRITICAL_MEMORY_ERROR]
    | _BIT[PumpAlarm.REDUCED_BATTERY_PERFORMANCE]
)
_CAUSE_NAMES: dict[int, str] = {_BIT[a]: a.value for a in PumpAlarm} | {
    _RATE_RESET: "unexplained_rate_drop"
}

_NEW, _LATE, _SEEN = 0, 1, 2
"""What a seq means: newer than all before, a late arrival filling a gap, or already seen."""

Describe = Callable[["_Pump", bool], tuple[str, dict[str, Any]]]


class _Pump:
    """Everything the rules remember about one pump; plain slots, no per-message containers."""

    # Read by every reading (`RuleEngine._steady`) first, so they share a few cache lines: with
    # thousands of pumps, the state of the pump a message is for is rarely in cache.
    __slots__ = (  # noqa: RUF023 (ordered by use, not by name)
        "latches",
        "alarm_ev",
        "stall_event",
        "rate_reset",
        "mri_deadline_s",
        "max_seq",
        "dose",
        "reported_alarm_ml",
        "due_s",
        "heap_s",
        "th",
        "reservoir_ml",
        "last_tel_s",
        "gap_s",
        "cps",
        "last_time_s",
        "last_heard_s",
        "alarms",
        "alarm_floor_seq",
        "last_tel_seq",
        "delivered",
        "programmed",
        "pump_state",
        "capacity_ml",
        "conc",
        "eri",
        "rotor_ul",
        "trend_next_s",
        "trend_next_ul",
        "win",
        "trend_cp",
        "alarm_ml",
        "low_watch_ml",
        "bolus_acc_ml",
        "due_days",
        "last_non_eri_s",
        "eri_since_s",
        # the rest
        "bolus_acc_s",
        "discrepant_refills",
        "dose_change",
        "dose_change_until_s",
        "dose_seq",
        "due_fig",
        "interval_s",
        "last_refill_after_ml",
        "loss_until_s",
        "lost",
        "lost_count",
        "lost_fig",
        "max_lost_seq",
        "missing",
        "mri_end_s",
        "mri_seq",
        "profile",
        "pump_id",
        "recovery_seq",
        "refill_fig",
        "silent_s",
        "stall_seq",
        "under_cause",
        "will_seq",
    )

    def __init__(self, pump_id: str, profile: PumpProfile | None, th: Thresholds) -> None:
        self.pump_id = pump_id
        self.profile = profile
        self.th = th
        self.interval_s = profile.reporting_interval_s if profile else _DEFAULT_INTERVAL_S
        # sequence
        self.max_seq = -1
        self.missing: dict[int, float] | None = None
        self.lost: set[int] | None = None
        self.lost_count = 0
        self.lost_fig: tuple[int, int] = (0, 0)
        self.loss_until_s = -_INF
        self.max_lost_seq = -1
        self.will_seq = -1
        # time
        self.last_heard_s = -_INF
        self.last_time_s = -_INF
        self.due_s = _INF
        self.heap_s = _INF
        # last telemetry
        self.last_tel_seq = -1
        self.last_tel_s = -_INF
        self.reservoir_ml = 0.0
        self.reported_alarm_ml: float | None = None
        self.alarm_ml: float | None = cond.effective_alarm_ml(None, profile, th)
        self.capacity_ml: float | None = None
        self.conc: float | None = None
        self.delivered = 0.0
        self.programmed = 0.0
        self.pump_state = PumpState.INFUSING
        self.eri = False
        # reservoir trend
        self.cps: list[tuple[float, float, float]] = []
        self.rotor_ul = 0.0
        self.win = -1
        self.trend_cp: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.trend_next_s = -_INF
        self.trend_next_ul = -_INF
        """Before this time, or below this rotor count, no checkpoint is due and the window
        start cannot move (see `_window`); -inf: not known, go through `_window`."""
        self.under_cause = ""
        # alarms
        self.alarms = 0
        self.alarm_floor_seq = -1
        self.alarm_ev: dict[int, int] | None = None
        # events
        self.stall_event = False
        self.stall_seq = -1
        self.rate_reset: tuple[float, float, str] | None = None
        self.mri_deadline_s = _INF
        self.mri_end_s: float | None = None
        self.mri_seq = -1
        self.recovery_seq = -1
        self.eri_since_s: float | None = None
        self.last_non_eri_s = -_INF
        self.bolus_acc_ml = 0.0
        self.bolus_acc_s = 0.0
        self.dose: float | None = None
        self.dose_seq = -1
        self.dose_change: tuple[float, float, str] = (0.0, 0.0, "")
        self.dose_change_until_s = -_INF
        self.last_refill_after_ml: float | None = None
        self.discrepant_refills = 0
        self.refill_fig: tuple[float, ...] = ()
        self.due_fig: tuple[float, float] = (_INF, 0.0)
        self.silent_s = 0.0
        self.latches: dict[str, Latch] | None = None
        self.gap_s = self.low_watch_ml = self.due_days = 0.0
        self.derive()

    def derive(self) -> None:
        """Figures the telemetry path compares against, recomputed only when the thresholds,
        the profile or the alarm volume change (they are the same sums the rules compute, so a
        comparison against them is bit-for-bit the one the rule would make)."""
        th = self.th
        self.gap_s = th.telemetry_gap_intervals * self.interval_s
        self.low_watch_ml = (
            self.alarm_ml + th.low_reservoir_clear_margin_ml if self.alarm_ml is not None else _INF
        )
        self.due_days = th.refill_due_medium_days + th.refill_due_clear_margin_days

    def priority(self, rule: str) -> Priority | None:
        latch = self.latches.get(rule) if self.latches else None
        return latch.priority if latch else None


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
        self._pumps: dict[str, _Pump] = {}
        self._heap: list[tuple[float, str]] = []
        self._masks: dict[tuple[PumpAlarm, ...], int] = {}
        self._shared: dict[tuple[tuple[str, Any], ...], Thresholds] = {}
        self._watch_since_s: float | None = None
        self._quiet = False
        for profile in (profiles or {}).values():
            self.set_profile(profile)

    # Public ------------------------------------------------------------------------------------

    def observe(self, msg: Message, received_at: datetime | None = None) -> list[Finding]:
        """Evaluate one committed message; `received_at` (the caller's clock) makes silence
        count from when messages arrive rather than from the device's clock."""
        out: list[Finding] = []
        if type(msg) is not Telemetry or not self._steady(msg, received_at, out):
            self._process(msg, received_at, out)
        return out

    def warm(self, msg: Message, received_at: datetime | None = None) -> None:
        """Update state from a message without reporting, e.g. replaying recent history after a
        restart: conditions already open come back open, so nothing is raised twice."""
        self._quiet = True
        try:
            out: list[Finding] = []
            if type(msg) is not Telemetry or not self._steady(msg, received_at, out):
                self._process(msg, received_at, out)
        finally:
            self._quiet = False

    def tick(self, now: datetime) -> list[Finding]:
        """The watchdog: telemetry silence, post-MRI deadlines, lost seqs, expiring notices.

        Silence counts from the first tick at the earliest, so a restart or a warm-up from
        history cannot page for every pump at once.
        """
        now_s = now.timestamp()
        if self._watch_since_s is None:
            self._watch_since_s = now_s
        out: list[Finding] = []
        heap = self._heap
        pumps = self._pumps
        while heap and heap[0][0] <= now_s:
            due_s, pump_id = heapq.heappop(heap)
            p = pumps.get(pump_id)
            if p is None or p.heap_s != due_s:
                continue  # superseded by an earlier wake-up
            p.heap_s = _INF
            self._silence(p, now_s, now, out)
            self._timed(p, now_s, now, None, out)
            self._schedule(p)
        return out

    def set_profile(self, profile: PumpProfile) -> None:
        """Add or replace what the clinic knows about a pump (alarm volume, interval, risk)."""
        p = self._pumps.get(profile.pump_id)
        th = self._thresholds_for(profile)
        if p is None:
            p = self._pumps[profile.pump_id] = _Pump(profile.pump_id, profile, th)
            self._schedule(p)
            return
        p.profile = profile
        p.th = th
        p.interval_s = profile.reporting_interval_s
        p.alarm_ml = cond.effective_alarm_ml(p.reported_alarm_ml, profile, th)
        p.derive()
        p.heap_s = _INF  # the silence deadline may have moved: the old heap entry goes stale
        self._schedule(p)

    def restore(
        self, pump_id: str, rule: str, priority: Priority, since: datetime | None = None
    ) -> None:
        """Mark an alert the lifecycle still holds open (after `warm()`), so the engine reports
        its end when the condition is seen gone, even if history no longer shows its cause."""
        if rule not in RULES:
            raise ValueError(f"rule {rule!r} is not one of {', '.join(RULES)}")
        p = self._pump(pump_id)
        th = p.th
        latches = p.latches if p.latches is not None else {}
        p.latches = latches
        latch = latches.get(rule) or Latch()
        latches[rule] = latch
        if latch.priority is not None:
            return
        latch.priority = priority
        since_s = since.timestamp() if since else max(p.last_time_s, 0.0)
        if rule == "refill_discrepancy":
            repeated = priority == th.refill_discrepancy_repeated_priority
            p.discrepant_refills = max(p.discrepant_refills, 2 if repeated else 1)
        elif rule == "large_dose_change":
            p.dose_change_until_s = since_s + th.large_dose_change_active_s
            self._wake(p, p.dose_change_until_s)
        elif rule == "post_mri" and p.mri_deadline_s == _INF:
            p.mri_deadline_s = since_s
            self._wake(p, since_s)
        elif rule == "sequence_gap":
            p.lost_count = max(p.lost_count, 1)
            p.loss_until_s = since_s + th.sequence_gap_active_s
            self._wake(p, p.loss_until_s)

    def active(self, pump_id: str) -> dict[str, Priority]:
        """The alerts the engine holds open for a pump, by rule."""
        p = self._pumps.get(pump_id)
        if p is None or not p.latches:
            return {}
        return {rule: lt.priority for rule, lt in p.latches.items() if lt.priority is not None}

    def __len__(self) -> int:
        return len(self._pumps)

    def state_size(self, pump_id: str | None = None) -> int:
        """Bytes of per-pump state (one pump, or all), shared thresholds and profiles excluded."""
        pumps: Iterable[_Pump] = self._pumps.values() if pump_id is None else [self._pumps[pump_id]]
        total = 0
        for p in pumps:
            total += sys.getsizeof(p)
            for name in _Pump.__slots__:
                value = getattr(p, name)
                if isinstance(value, float) and value not in (_INF, -_INF, 0.0):
                    total += sys.getsizeof(value)
            total += sys.getsizeof(p.cps) + sum(sys.getsizeof(cp) for cp in p.cps)
            for box in (p.missing, p.lost, p.alarm_ev):
                if box is not None:
                    total += sys.getsizeof(box)
            if p.latches is not None:
                total += sys.getsizeof(p.latches) + sum(
                    sys.getsizeof(lt) for lt in p.latches.values()
                )
        return total

    # Dispatch ----------------------------------------------------------------------------------

    def _pump(self, pump_id: str) -> _Pump:
        p = self._pumps.get(pump_id)
        if p is None:
            p = self._pumps[pump_id] = _Pump(pump_id, None, self.thresholds)
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
        p = self._pumps.get(msg.pump_id) or self._pump(msg.pump_id)
        at = msg.time
        t = at.timestamp()
        seq = msg.seq
        if seq == p.max_seq + 1 and p.max_seq >= 0:
            p.max_seq = seq  # in order: the common case
        elif self._accept(p, seq, t) == _SEEN:
            return
        if t > p.last_time_s:
            p.last_time_s = t
        if not (type(msg) is Status and not msg.online):  # the will says nothing of the pump
            heard = received_at.timestamp() if received_at is not None else t
            if heard > p.last_heard_s:
                p.last_heard_s = heard
            latches = p.latches
            if latches and "telemetry_silence" in latches:
                self._update(p, "telemetry_silence", None, t, 0, 0, at, seq, out, _d_silence)
        if type(msg) is Telemetry:
            if seq > p.last_tel_seq:
                self._telemetry(p, msg, t, out)
        else:
            handler = self._handlers.get(type(msg))
            if handler is not None:
                handler(self, p, msg, t, out)
        if t >= p.due_s:
            self._timed(p, t, at, seq, out)
        if p.due_s < p.heap_s or p.heap_s == _INF:
            self._schedule(p)

    def _steady(self, m: Telemetry, received_at: datetime | None, out: list[Finding]) -> bool:
        """The fast path for the common reading: `_process` + `_telemetry` for a pump with
        nothing going on, doing only the work that can matter. Returns False, having changed
        nothing, when the reading is not such a case; `_process` then takes it.

        Safe because every skipped step is a no-op under the checks made first:
        - no latch at all: no rule is pending or open, so nothing needs re-judging to end, and
          `telemetry_silence` has no latch to feed;
        - the next seq, and before the pump's next deadline: no gap to track, no `_timed` work;
        - no alarms in the reading and no alarm event pending (so the mask is 0), no stall
          event, no rate reset, no MRI watch: `critical_pump_alarm`, the "delivery resumed"
          check and post-MRI have nothing to do;
        - the same dose and alarm volume as the last reading: no dose change, the same
          alarm volume (so `low_watch_ml` holds);
        - no ERI: the battery rule only resets its ERI bookkeeping;
        - the trend continues (a checkpoint exists, the reading is in time and the reservoir
          did not rise): no restart.
        The rules that can still start (a flow verdict, a stalled rotor, a low reservoir, a
        refill coming due) go through the same methods as on the full path.
        """
        p = self._pumps.get(m.pump_id)
        if (
            p is None
            or p.latches is not None
            or p.alarm_ev is not None
            or p.stall_event
            or p.rate_reset is not None
            or p.mri_deadline_s != _INF
        ):
            return False
        seq = m.seq
        max_seq = p.max_seq
        if seq != max_seq + 1 or max_seq < 0:
            return False
        if m.alarms or m.battery_eri:
            return False
        dose = m.programmed_dose_mcg_per_day
        if dose != p.dose or m.low_reservoir_alarm_ml != p.reported_alarm_ml:
            return False
        at = m.time
        t = at.timestamp()
        if t >= p.due_s:
            return False
        th = p.th
        res = m.reservoir_ml
        prev_res = p.reservoir_ml
        dt = t - p.last_tel_s
        if (
            dt <= 0
            or dt > p.gap_s
            or (res - prev_res) * 1000.0 > th.reservoir_resolution_ul
            or not p.cps
        ):
            return False

        # From here on the reading is taken: the same updates as `_process` and `_telemetry`.
        p.max_seq = seq
        if t > p.last_time_s:
            p.last_time_s = t
        heard = received_at.timestamp() if received_at is not None else t
        if heard > p.last_heard_s:
            p.last_heard_s = heard
        p.alarms = 0
        p.alarm_floor_seq = seq
        p.last_tel_seq = seq
        p.last_tel_s = t
        p.reservoir_ml = res
        delivered = p.delivered = m.delivered_ul_per_h
        p.programmed = m.programmed_rate_ul_per_h
        p.pump_state = m.pump_state
        p.capacity_ml = m.reservoir_capacity_ml
        conc = p.conc = m.concentration_mcg_per_ml
        p.eri = False

        rotor = p.rotor_ul = p.rotor_ul + delivered * dt / 3600.0
        if t >= p.trend_next_s and rotor >= p.trend_next_ul:
            verdict = self._window(p, t, res, rotor)
        elif p.win >= 0:  # the same window as the last reading's (see `_window`)
            cp = p.trend_cp
            verdict = cond.trend_verdict(
                (cp[1] - res) * 1000.0, rotor - cp[2], th.flow_accuracy, th.reservoir_resolution_ul
            )
        else:
            verdict = None
        if delivered <= 0.0 or (verdict is not None and verdict != "ok"):
            self._flow(p, verdict, t, at, seq, out)

        # Only below these can low_reservoir or refill_due hold (no latch is open to end).
        alarm_ml = p.alarm_ml
        if alarm_ml is not None:
            if res <= p.low_watch_ml:
                self._low_reservoir(p, t, at, seq, out)
            daily_ml = dose / conc
            if p.bolus_acc_ml > 0:
                daily_ml += _bolus_ml_per_day(p, t)
            if daily_ml > 0:
                days = (res - alarm_ml) / daily_ml
                if days <= p.due_days:
                    self._refill_due(p, days, daily_ml, t, at, seq, out)

        p.last_non_eri_s = t
        p.eri_since_s = None
        if p.due_s < p.heap_s or p.heap_s == _INF:
            self._schedule(p)
        return True

    # Sequence numbers ----------------------------------------------------------------------------

    def _accept(self, p: _Pump, seq: int, t: float) -> int:
        """Track seqs: open a gap when some are skipped, fill it when they arrive late, and drop
        what was already seen (redeliveries never count twice)."""
        if seq > p.max_seq:
            if p.max_seq >= 0 and seq > p.max_seq + 1:
                self._open_gap(p, p.max_seq + 1, seq, t)
            p.max_seq = seq
            return _NEW
        missing = p.missing
        if missing and seq in missing:
            del missing[seq]
            return _LATE
        lost = p.lost
        if lost and seq in lost:
            lost.discard(seq)
            p.lost_count -= 1
            p.due_s = -_INF  # re-judge the gap now: it may be whole again
            return _LATE
        if t > p.last_time_s:
            # An old seq with a newer time than anything seen: the agent lost its seq store
            # and started again. Everything ordered by seq starts again with it.
            self._reset_seq(p, seq)
            return _NEW
        return _SEEN

    def _reset_seq(self, p: _Pump, seq: int) -> None:
        p.max_seq = seq
        p.missing = None
        p.lost = None
        p.max_lost_seq = -1
        p.will_seq = -1
        p.last_tel_seq = -1
        p.alarm_floor_seq = -1
        p.alarm_ev = None
        p.dose_seq = -1
        p.mri_seq = -1
        p.recovery_seq = -1
        p.stall_seq = -1
        _restart_trend(p, [])

    def _open_gap(self, p: _Pump, first: int, end: int, t: float) -> None:
        th = p.th
        missing = p.missing if p.missing is not None else {}
        p.missing = missing
        if end - first > th.sequence_gap_max_tracked - len(missing):
            # More than we can remember: lost at once (a late arrival is then ignored).
            if p.lost_count:
                p.lost_fig = (min(p.lost_fig[0], first), max(p.lost_fig[1], end - 1))
            else:
                p.lost_fig = (first, end - 1)
            p.lost_count += end - first
            p.max_lost_seq = max(p.max_lost_seq, end - 1)
            p.loss_until_s = t + th.sequence_gap_active_s
            p.due_s = -_INF
        else:
            for s in range(first, end):
                if s != p.will_seq:
                    missing[s] = t
        if missing:
            p.due_s = min(p.due_s, t + th.sequence_gap_grace_s)
        else:
            p.missing = None

    def _declare_lost(self, p: _Pump, seqs: list[int], now_s: float) -> None:
        th = p.th
        lost = p.lost if p.lost is not None else set()
        p.lost = lost
        for s in seqs:
            if len(lost) < th.sequence_gap_max_tracked:
                lost.add(s)
        if p.lost_count == 0:
            p.lost_fig = (seqs[0], seqs[-1])
        else:
            p.lost_fig = (min(p.lost_fig[0], seqs[0]), max(p.lost_fig[1], seqs[-1]))
        p.lost_count += len(seqs)
        p.max_lost_seq = max(p.max_lost_seq, seqs[-1])
        p.loss_until_s = now_s + th.sequence_gap_active_s

    # Telemetry ------------------------------------------------------------------------------

    def _telemetry(self, p: _Pump, m: Telemetry, t: float, out: list[Finding]) -> None:
        th = p.th
        seq = m.seq
        at = m.time
        alarms = m.alarms
        mask = (self._masks.get(alarms) or self._mask_of(alarms)) if alarms else 0
        if seq > p.alarm_floor_seq:
            ev = p.alarm_ev
            if ev:  # alarm events newer than this snapshot win for their alarm
                for bit, ev_seq in list(ev.items()):
                    if ev_seq > seq:
                        mask = (mask | bit) if p.alarms & bit else (mask & ~bit)
                    else:
                        del ev[bit]
                if not ev:
                    p.alarm_ev = None
            p.alarms = mask
            p.alarm_floor_seq = seq
        mask = p.alarms

        prev_s = p.last_tel_s
        prev_res = p.reservoir_ml
        res = m.reservoir_ml
        delivered = m.delivered_ul_per_h
        p.last_tel_seq = seq
        p.last_tel_s = t
        p.reservoir_ml = res
        p.delivered = delivered
        p.programmed = m.programmed_rate_ul_per_h
        p.pump_state = m.pump_state
        p.capacity_ml = m.reservoir_capacity_ml
        p.conc = m.concentration_mcg_per_ml
        p.eri = m.battery_eri
        if m.low_reservoir_alarm_ml != p.reported_alarm_ml:
            p.reported_alarm_ml = m.low_reservoir_alarm_ml
            p.alarm_ml = cond.effective_alarm_ml(m.low_reservoir_alarm_ml, p.profile, th)
            p.derive()
        latches = p.latches

        # Delivery resumed: a lost recovery event, or the normal end of an MRI stall.
        if delivered > 0 and m.pump_state is PumpState.INFUSING:
            if p.mri_deadline_s != _INF and seq > p.mri_seq:
                self._mri_recovered(p, t, at, seq, out)
            if p.stall_event and seq > p.stall_seq:
                p.stall_event = False

        # Programmed daily dose (flex: the day's total; boluses excluded).
        dose = m.programmed_dose_mcg_per_day
        if dose != p.dose:
            if p.dose is None:
                p.dose = dose
                p.dose_seq = seq
            elif seq > p.dose_seq:
                self._dose_from_telemetry(p, dose, t, at, seq, out)

        if (
            mask & _CRITICAL_MASK
            or p.stall_event
            or p.rate_reset is not None
            or (latches and "critical_pump_alarm" in latches)
        ):
            self._critical(p, t, at, seq, out)
        self._flow(p, self._trend(p, t, prev_s, prev_res), t, at, seq, out)

        latches = p.latches  # the calls above may have made or dropped it
        alarm_ml = p.alarm_ml
        if alarm_ml is not None:
            if res <= p.low_watch_ml or mask & _LOW or (latches and "low_reservoir" in latches):
                self._low_reservoir(p, t, at, seq, out)
            conc = m.concentration_mcg_per_ml
            daily_ml = dose / conc
            if p.bolus_acc_ml > 0:
                daily_ml += _bolus_ml_per_day(p, t)
            if daily_ml > 0:
                days = (res - alarm_ml) / daily_ml
                if days <= p.due_days or (latches and "refill_due" in latches):
                    self._refill_due(p, days, daily_ml, t, at, seq, out)
            elif latches and "refill_due" in latches:
                self._refill_due(p, None, daily_ml, t, at, seq, out)

        if m.battery_eri or mask & (_ERI | _EOS) or (latches and "battery" in latches):
            self._battery(p, t, at, seq, out)
        else:
            p.last_non_eri_s = t
            p.eri_since_s = None

    def _mask_of(self, alarms: tuple[PumpAlarm, ...]) -> int:
        mask = 0
        for alarm in alarms:
            mask |= _BIT[alarm]
        if len(self._masks) < 1024:
            self._masks[alarms] = mask
        return mask

    def _trend(self, p: _Pump, t: float, prev_s: float, prev_res: float) -> str | None:
        """Over/under verdict on the newest window of at least `trend_window_s` and
        `trend_min_rotor_ul`; None while there is none (just started, refill, lost reading)."""
        th = p.th
        res = p.reservoir_ml
        dt = t - prev_s
        if (
            not p.cps
            or dt <= 0
            or dt > p.gap_s
            or (res - prev_res) * 1000.0 > th.reservoir_resolution_ul
        ):
            p.rotor_ul = 0.0
            _restart_trend(p, [(t, res, 0.0)])
            return None
        rotor = p.rotor_ul = p.rotor_ul + p.delivered * dt / 3600.0
        return self._window(p, t, res, rotor)

    @staticmethod
    def _window(p: _Pump, t: float, res: float, rotor: float) -> str | None:
        """Add a checkpoint when one is due, move the window start on, and judge the window."""
        th = p.th
        cps = p.cps
        window_s = th.trend_window_s
        min_ul = th.trend_min_rotor_ul
        last = cps[-1]
        win = p.win
        if t - last[0] >= 0.25 * window_s and rotor - last[2] >= 0.25 * min_ul:
            cps.append((t, res, rotor))
            if len(cps) > _MAX_CHECKPOINTS:
                del cps[0]
                win = max(win - 1, -1)
        # Checkpoints old enough to start a window form a prefix of `cps`; the window starts at
        # the newest of them, which only ever moves forward.
        n = len(cps)
        while win + 1 < n:
            cp = cps[win + 1]
            if t - cp[0] < window_s or rotor - cp[2] < min_ul:
                break
            win += 1
        p.win = win
        # Both steps above need a time and a rotor count: a quarter window and a quarter of the
        # minimum since `cps[-1]` for a new checkpoint, a window and the minimum since
        # `cps[win + 1]` to move the start. Before the earlier time, or below the smaller count,
        # neither can happen, so `_steady` judges the same window without coming here. The slack
        # is far above float rounding (epoch seconds, uL), so this never skips a step.
        last = cps[-1]
        next_s = last[0] + 0.25 * window_s
        next_ul = last[2] + 0.25 * min_ul
        if win + 1 < n:
            cp = cps[win + 1]
            next_s = min(next_s, cp[0] + window_s)
            next_ul = min(next_ul, cp[2] + min_ul)
        p.trend_next_s = next_s - _TREND_SLACK_S
        p.trend_next_ul = next_ul - _TREND_SLACK_UL
        if win < 0:
            return None
        cp = p.trend_cp = cps[win]
        return cond.trend_verdict(
            (cp[1] - res) * 1000.0, rotor - cp[2], th.flow_accuracy, th.reservoir_resolution_ul
        )

    def _flow(
        self,
        p: _Pump,
        verdict: str | None,
        t: float,
        at: datetime,
        seq: int,
        out: list[Finding],
    ) -> None:
        """over_infusion and under_infusion: the reservoir trend's verdict, and a rotor standing
        still."""
        th = p.th
        latches = p.latches
        if verdict is not None and (verdict == "over" or (latches and "over_infusion" in latches)):
            raw = th.over_infusion_priority if verdict == "over" else None
            self._update(
                p, "over_infusion", raw, t, th.trend_on_s, th.trend_off_s, at, seq, out, _d_over
            )
        stalled = (
            p.delivered <= 0.0
            and cond.no_delivery(p.delivered, p.programmed, p.pump_state)
            and p.mri_deadline_s == _INF  # an MRI stall is expected: post_mri watches it
        )
        under_open = bool(latches and "under_infusion" in latches)
        if stalled:
            p.under_cause = "no_delivery"
            self._update(
                p,
                "under_infusion",
                th.under_infusion_priority,
                t,
                th.no_delivery_on_s,
                th.trend_off_s,
                at,
                seq,
                out,
                _d_under,
            )
        elif verdict == "under":
            p.under_cause = "trend"
            self._update(
                p,
                "under_infusion",
                th.under_infusion_priority,
                t,
                th.trend_on_s,
                th.trend_off_s,
                at,
                seq,
                out,
                _d_under,
            )
        elif under_open and (verdict is not None or p.under_cause == "no_delivery"):
            self._update(p, "under_infusion", None, t, 0, th.trend_off_s, at, seq, out, _d_under)

    def _low_reservoir(
        self, p: _Pump, t: float, at: datetime, seq: int | None, out: list[Finding]
    ) -> None:
        th = p.th
        alarm_ml = p.alarm_ml
        active = p.priority("low_reservoir") is not None
        low = bool(p.alarms & _LOW) or (
            alarm_ml is not None
            and p.last_tel_seq >= 0
            and cond.low_reservoir(p.reservoir_ml, alarm_ml, active, th)
        )
        raw = th.low_reservoir_priority if low else None
        self._update(
            p,
            "low_reservoir",
            raw,
            t,
            th.low_reservoir_on_s,
            th.low_reservoir_off_s,
            at,
            seq,
            out,
            _d_low,
        )

    def _refill_due(
        self,
        p: _Pump,
        days: float | None,
        daily_ml: float,
        t: float,
        at: datetime,
        seq: int,
        out: list[Finding],
    ) -> None:
        th = p.th
        raw = cond.refill_due_priority(days, p.priority("refill_due"), th)
        p.due_fig = (days if days is not None else _INF, daily_ml)
        self._update(
            p,
            "refill_due",
            raw,
            t,
            th.refill_due_on_s,
            th.refill_due_off_s,
            at,
            seq,
            out,
            _d_refill_due,
        )

    def _battery(
        self, p: _Pump, t: float, at: datetime, seq: int | None, out: list[Finding]
    ) -> None:
        th = p.th
        eri = p.eri or bool(p.alarms & _ERI)
        if eri:
            if p.eri_since_s is None and p.last_non_eri_s > -_INF:
                # Began between the last reading without ERI and this one: assume the earlier,
                # so EOS is never predicted late.
                p.eri_since_s = p.last_non_eri_s
        else:
            p.last_non_eri_s = t
            p.eri_since_s = None
        days_left = cond.days_to_eos(p.eri_since_s, t, th) if eri else None
        raw = cond.battery_priority(eri, bool(p.alarms & _EOS), days_left, th)
        self._update(
            p, "battery", raw, t, th.battery_on_s, th.battery_off_s, at, seq, out, _d_battery
        )

    def _critical(
        self, p: _Pump, t: float, at: datetime, seq: int | None, out: list[Finding]
    ) -> None:
        causes = p.alarms & _CRITICAL_MASK
        if p.stall_event:
            causes |= _STALL
        if p.rate_reset is not None:
            causes |= _RATE_RESET
        if not causes and not (p.latches and "critical_pump_alarm" in p.latches):
            return
        th = p.th
        raw = th.critical_priority if causes else None
        self._update(
            p,
            "critical_pump_alarm",
            raw,
            t,
            0.0,
            th.critical_off_s,
            at,
            seq,
            out,
            _d_critical,
            key=causes or None,
        )

    def _dose_from_telemetry(
        self, p: _Pump, dose: float, t: float, at: datetime, seq: int, out: list[Finding]
    ) -> None:
        """A programmed dose that changed with no reprogram event before it: a large change is
        reported; a drop with every earlier seq received is a reset without a session."""
        old = p.dose if p.dose is not None else dose
        complete = not p.missing and p.max_lost_seq < p.dose_seq
        p.dose = dose
        p.dose_seq = seq
        self._dose_changed(p, old, dose, "telemetry", t, at, seq, out)
        drop = cond.dose_change_fraction(old, dose) if dose < old else 0.0
        if complete and drop > p.th.unexplained_drop_fraction and p.rate_reset is None:
            p.rate_reset = (old, dose, "telemetry")

    def _dose_changed(
        self,
        p: _Pump,
        old: float,
        new: float,
        source: str,
        t: float,
        at: datetime,
        seq: int,
        out: list[Finding],
    ) -> None:
        th = p.th
        if cond.dose_change_fraction(old, new) <= th.large_dose_change_fraction:
            return
        p.dose_change = (old, new, source)
        p.dose_change_until_s = t + th.large_dose_change_active_s
        self._wake(p, p.dose_change_until_s)
        self._update(
            p,
            "large_dose_change",
            th.large_dose_change_priority,
            t,
            0.0,
            0.0,
            at,
            seq,
            out,
            _d_dose,
            key=seq,
        )

    # Events -----------------------------------------------------------------------------------

    def _on_refill(self, p: _Pump, m: Refill, t: float, out: list[Finding]) -> None:
        th = p.th
        seq = m.seq
        profile = p.profile
        capacity = (
            profile.reservoir_capacity_ml
            if profile and profile.reservoir_capacity_ml
            else p.capacity_ml
        )
        limit_ml = cond.pocket_fill_limit_ml(capacity, m.injected_ml, th)
        pocket = cond.pocket_fill(m.injected_ml, m.reservoir_after_ml, limit_ml)
        infused = (
            p.last_refill_after_ml - m.expected_ml if p.last_refill_after_ml is not None else None
        )
        discrepant = cond.refill_discrepant(m.expected_ml, m.withdrawn_ml, infused, th)
        p.discrepant_refills = p.discrepant_refills + 1 if discrepant else 0
        p.last_refill_after_ml = m.reservoir_after_ml
        p.conc = m.concentration_mcg_per_ml
        p.refill_fig = (
            m.expected_ml,
            m.withdrawn_ml,
            m.injected_ml,
            m.reservoir_after_ml,
            limit_ml,
            infused if infused is not None else -1.0,
            float(p.discrepant_refills),
        )
        if seq > p.last_tel_seq:
            _restart_trend(p, [])  # the reservoir trend starts again from the next reading
        self._update(
            p,
            "pocket_fill",
            th.pocket_fill_priority if pocket else None,
            t,
            0.0,
            0.0,
            m.time,
            seq,
            out,
            _d_pocket,
        )
        n = p.discrepant_refills
        raw: Priority | None = None
        if n >= 2:
            raw = th.refill_discrepancy_repeated_priority
        elif n == 1:
            raw = th.refill_discrepancy_priority
        self._update(p, "refill_discrepancy", raw, t, 0.0, 0.0, m.time, seq, out, _d_discrepancy)

    def _on_reprogram(self, p: _Pump, m: Reprogram, t: float, out: list[Finding]) -> None:
        old = m.old_schedule.dose_mcg_per_day
        new = m.new_schedule.dose_mcg_per_day
        seq = m.seq
        if not m.session:
            p.rate_reset = (old, new, "reprogram without a programming session")
        elif p.rate_reset is not None and seq > p.dose_seq:
            p.rate_reset = None  # a clinician has programmed the pump since
        if seq > p.dose_seq:
            p.dose = new
            p.dose_seq = seq
            self._dose_changed(p, old, new, "reprogram", t, m.time, seq, out)
        self._critical(p, t, m.time, seq, out)

    def _on_bolus(self, p: _Pump, m: Bolus, t: float, out: list[Finding]) -> None:
        """Patient boluses feed the average that refill_due adds to the programmed flow."""
        if m.source != "patient" or not p.conc:
            return
        p.bolus_acc_ml = _bolus_ml(p, t) + m.dose_mcg / p.conc
        p.bolus_acc_s = t

    def _on_mri_start(self, p: _Pump, m: MriStart, t: float, out: list[Finding]) -> None:
        th = p.th
        p.mri_seq = max(p.mri_seq, m.seq)
        p.mri_end_s = None
        if p.mri_deadline_s == _INF:
            p.mri_deadline_s = t + th.mri_max_scan_s + th.mri_recovery_s
            self._wake(p, p.mri_deadline_s)

    def _on_mri_end(self, p: _Pump, m: MriEnd, t: float, out: list[Finding]) -> None:
        if m.seq < p.recovery_seq:
            return  # the rotor already recovered after this scan
        p.mri_seq = max(p.mri_seq, m.seq)
        p.mri_end_s = t
        p.mri_deadline_s = t + p.th.mri_recovery_s
        self._wake(p, p.mri_deadline_s)

    def _on_stall(self, p: _Pump, m: MotorStall, t: float, out: list[Finding]) -> None:
        if p.mri_deadline_s != _INF:
            return  # expected during and after an MRI scan
        p.stall_event = True
        p.stall_seq = max(p.stall_seq, m.seq)
        self._critical(p, t, m.time, m.seq, out)

    def _on_recovery(self, p: _Pump, m: MotorStallRecovery, t: float, out: list[Finding]) -> None:
        p.recovery_seq = max(p.recovery_seq, m.seq)
        if m.seq > p.stall_seq:
            p.stall_event = False
        if p.mri_deadline_s != _INF and m.seq > p.mri_seq:
            self._mri_recovered(p, t, m.time, m.seq, out)
        self._critical(p, t, m.time, m.seq, out)

    def _mri_recovered(
        self, p: _Pump, t: float, at: datetime, seq: int | None, out: list[Finding]
    ) -> None:
        p.mri_deadline_s = _INF
        if p.latches and "post_mri" in p.latches:
            self._update(p, "post_mri", None, t, 0.0, 0.0, at, seq, out, _d_mri)

    def _on_alarm(
        self, p: _Pump, m: AlarmRaised | AlarmCleared, t: float, out: list[Finding]
    ) -> None:
        bit = _BIT[m.alarm]
        seq = m.seq
        if seq <= p.alarm_floor_seq:
            return  # a newer telemetry snapshot already says
        ev = p.alarm_ev
        if ev is not None and ev.get(bit, -1) > seq:
            return
        if ev is None:
            ev = p.alarm_ev = {}
        ev[bit] = seq
        raised = type(m) is AlarmRaised
        mask = p.alarms | bit if raised else p.alarms & ~bit
        if mask == p.alarms:
            return
        p.alarms = mask
        at = m.time
        self._critical(p, t, at, seq, out)
        if bit == _LOW or (p.latches and "low_reservoir" in p.latches):
            self._low_reservoir(p, t, at, seq, out)
        if bit in (_ERI, _EOS):
            self._battery(p, t, at, seq, out)

    def _on_status(self, p: _Pump, m: Status, t: float, out: list[Finding]) -> None:
        """An agent's online status at seq N reserves N+1 for its last will, which is published
        only when the connection ends: that seq is not missing."""
        if m.online:
            p.will_seq = m.seq + 1
            if p.missing and p.will_seq in p.missing:
                del p.missing[p.will_seq]

    _handlers: dict[type, Callable[[RuleEngine, _Pump, Any, float, list[Finding]], None]] = {
        Refill: _on_refill,
        Reprogram: _on_reprogram,
        Bolus: _on_bolus,
        MriStart: _on_mri_start,
        MriEnd: _on_mri_end,
        MotorStall: _on_stall,
        MotorStallRecovery: _on_recovery,
        AlarmRaised: _on_alarm,
        AlarmCleared: _on_alarm,
        Status: _on_status,
    }

    # Time ---------------------------------------------------------------------------------------

    def _silent_since(self, p: _Pump, open_: bool) -> float:
        """Last heard; not before the watchdog started unless the alert is already open (then
        it was restored after a restart and keeps counting towards its escalation)."""
        if open_ or self._watch_since_s is None:
            return p.last_heard_s
        return max(p.last_heard_s, self._watch_since_s)

    def _silence(self, p: _Pump, now_s: float, at: datetime, out: list[Finding]) -> None:
        open_ = p.priority("telemetry_silence") is not None
        p.silent_s = now_s - self._silent_since(p, open_)
        raw = cond.silence_priority(p.silent_s, p.interval_s, p.th)
        self._update(p, "telemetry_silence", raw, now_s, 0.0, 0.0, at, None, out, _d_silence)

    def _timed(
        self, p: _Pump, now_s: float, at: datetime, seq: int | None, out: list[Finding]
    ) -> None:
        """Deadlines: lost seqs, post-MRI, the end of a sequence-gap or dose-change alert."""
        th = p.th
        due = _INF
        missing = p.missing
        if missing:
            cutoff = now_s - th.sequence_gap_grace_s
            expired = []
            for s, seen_s in missing.items():
                if seen_s > cutoff:
                    due = seen_s + th.sequence_gap_grace_s
                    break
                expired.append(s)
            if expired:
                for s in expired:
                    del missing[s]
                self._declare_lost(p, sorted(expired), now_s)
            if not missing:
                p.missing = None
        if p.lost_count > 0 or (p.latches and "sequence_gap" in p.latches):
            gap = p.lost_count > 0 and now_s < p.loss_until_s
            raw = th.sequence_gap_priority if gap else None
            self._update(p, "sequence_gap", raw, now_s, 0.0, 0.0, at, seq, out, _d_gap)
            if gap:
                due = min(due, p.loss_until_s)
            else:
                p.lost_count = 0
                p.lost = None
        if p.mri_deadline_s != _INF:
            if now_s >= p.mri_deadline_s:
                self._update(
                    p, "post_mri", th.post_mri_priority, now_s, 0.0, 0.0, at, seq, out, _d_mri
                )
            else:
                due = min(due, p.mri_deadline_s)
        if p.dose_change_until_s != -_INF:
            if now_s >= p.dose_change_until_s:
                p.dose_change_until_s = -_INF
                self._update(p, "large_dose_change", None, now_s, 0.0, 0.0, at, seq, out, _d_dose)
            else:
                due = min(due, p.dose_change_until_s)
        p.due_s = due

    def _wake(self, p: _Pump, at_s: float) -> None:
        if at_s < p.due_s:
            p.due_s = at_s

    def _schedule(self, p: _Pump) -> None:
        """Keep one heap entry per pump at its earliest deadline (silence included)."""
        th = p.th
        silence = p.priority("telemetry_silence")
        since_s = self._silent_since(p, silence is not None)
        if silence is None:
            nxt = since_s + th.silence_low_intervals * p.interval_s + th.silence_slack_s
        elif silence != th.silence_medium_priority:
            nxt = since_s + th.silence_medium_s
        else:
            nxt = _INF
        if p.due_s < nxt:
            nxt = p.due_s
        if nxt < p.heap_s:
            p.heap_s = nxt
            heapq.heappush(self._heap, (nxt, p.pump_id))

    # Reporting ----------------------------------------------------------------------------------

    def _update(
        self,
        p: _Pump,
        rule: str,
        raw: Priority | None,
        t: float,
        on_s: float,
        off_s: float,
        at: datetime,
        seq: int | None,
        out: list[Finding],
        describe: Describe,
        key: object = None,
    ) -> None:
        """Feed a raw condition through the rule's latch; report starts, ends, priority changes
        and (while open) a change of what it is about."""
        latches = p.latches
        latch = latches.get(rule) if latches is not None else None
        if latch is None:
            if raw is None:
                return
            latch = Latch()
            if latches is None:
                latches = p.latches = {}
            latches[rule] = latch
        before = latch.priority
        changed = latch.update(raw, t, on_s, off_s)
        if changed:
            latch.key = key if latch.priority is not None else None
        elif raw is not None and latch.priority is not None and key != latch.key:
            latch.key = key
            changed = True
        if latch.idle and latches is not None:
            del latches[rule]
            if not latches:
                p.latches = None
        if not changed or self._quiet:
            return
        active = latch.priority is not None
        summary, details = describe(p, active)
        priority = latch.priority or before or raw or "info"
        out.append(Finding(p.pump_id, rule, active, priority, at, summary, details, seq))


# Helpers ------------------------------------------------------------------------------------------


def _restart_trend(p: _Pump, cps: list[tuple[float, float, float]]) -> None:
    p.cps = cps
    p.win = -1
    p.trend_next_s = p.trend_next_ul = -_INF


def _bolus_ml(p: _Pump, t: float) -> float:
    """The decayed sum of patient-bolus volume; divided by the time constant it is a rate."""
    if p.bolus_acc_ml <= 0:
        return 0.0
    return p.bolus_acc_ml * math.exp(-max(0.0, t - p.bolus_acc_s) / p.th.bolus_average_s)


def _bolus_ml_per_day(p: _Pump, t: float) -> float:
    return _bolus_ml(p, t) / p.th.bolus_average_s * _DAY_S


def _pct(x: float) -> str:
    return f"{x * 100:+.0f} %"


# What each finding says: a human summary and the figures. Read from the pump's state, built only
# when a finding is reported.


def _d_critical(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    causes = p.alarms & _CRITICAL_MASK
    if p.stall_event:
        causes |= _STALL
    if p.rate_reset is not None:
        causes |= _RATE_RESET
    names = [name for bit, name in _CAUSE_NAMES.items() if causes & bit]
    details: dict[str, Any] = {"causes": names, "pump_state": p.pump_state.value}
    if not active:
        return "Critical pump alarm cleared", details
    parts = [n.replace("_", " ") for n in names if n != "unexplained_rate_drop"]
    if p.rate_reset is not None:
        old, new, source = p.rate_reset
        details |= {"old_dose_mcg_per_day": old, "new_dose_mcg_per_day": new, "source": source}
        parts.append(
            f"programmed dose {old:g} -> {new:g} mcg/day with no programming session "
            "(battery fault?)"
        )
    return "Critical pump alarm: " + "; ".join(parts), details


def _d_over(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    return _flow_text(p, active, "Over-infusion")


def _d_under(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    if p.under_cause == "no_delivery" and active:
        details = {
            "cause": "no_delivery",
            "delivered_ul_per_h": p.delivered,
            "programmed_rate_ul_per_h": p.programmed,
            "pump_state": p.pump_state.value,
        }
        return (
            f"No delivery while programmed {p.programmed:.2f} uL/h (pump {p.pump_state.value})",
            details,
        )
    return _flow_text(p, active, "Under-infusion")


def _flow_text(p: _Pump, active: bool, what: str) -> tuple[str, dict[str, Any]]:
    cp_s, cp_res, cp_rotor = p.trend_cp
    drop_ul = (cp_res - p.reservoir_ml) * 1000.0
    rotor_ul = p.rotor_ul - cp_rotor
    window_s = p.last_tel_s - cp_s
    ratio = drop_ul / rotor_ul - 1.0 if rotor_ul > 0 else 0.0
    details = {
        "cause": "trend",
        "reservoir_drop_ul": round(drop_ul, 1),
        "rotor_ul": round(rotor_ul, 1),
        "window_h": round(window_s / 3600.0, 2),
        "deviation_pct": round(ratio * 100, 1),
        "limit_pct": p.th.flow_accuracy * 100,
    }
    text = (
        f"reservoir fell {drop_ul:.1f} uL in {window_s / 3600:.1f} h while the rotor counted "
        f"{rotor_ul:.1f} uL ({_pct(ratio)}, limit +-{p.th.flow_accuracy * 100:.1f} %)"
    )
    return (f"{what}: {text}" if active else f"{what} ended: {text}"), details


def _d_pocket(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    _expected, _withdrawn, injected, after, limit, _infused, _n = p.refill_fig
    details = {
        "injected_ml": injected,
        "reservoir_after_ml": after,
        "gap_ml": round(injected - after, 2),
        "limit_ml": limit,
    }
    if not active:
        return "Refill without pocket fill: the previous one is resolved", details
    return (
        f"Suspected pocket fill: {injected:.1f} mL injected but the reservoir holds {after:.1f} "
        f"mL ({injected - after:.1f} mL unaccounted, limit {limit:.1f} mL)",
        details,
    )


def _d_discrepancy(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    expected, withdrawn, _injected, _after, _limit, infused, n = p.refill_fig
    details: dict[str, Any] = {
        "expected_ml": expected,
        "withdrawn_ml": withdrawn,
        "discrepancy_ml": round(expected - withdrawn, 2),
        "limit_ml": p.th.refill_discrepancy_ml,
        "consecutive_refills": int(n),
    }
    if infused >= 0:
        details["infused_since_last_refill_ml"] = round(infused, 2)
    if not active:
        return "Refill matched the expected volume", details
    text = (
        f"Refill discrepancy: expected {expected:.2f} mL, withdrew {withdrawn:.2f} mL "
        f"({expected - withdrawn:+.2f} mL, limit {p.th.refill_discrepancy_ml:g} mL or "
        f"{p.th.refill_discrepancy_fraction * 100:.1f} %)"
    )
    if n >= 2:
        text += f"; {int(n)} refills in a row"
    return text, details


def _d_mri(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    details: dict[str, Any] = {"recovery_limit_h": p.th.mri_recovery_s / 3600}
    if p.mri_end_s is not None:
        details["mri_end"] = datetime.fromtimestamp(p.mri_end_s, UTC).isoformat()
    if not active:
        return "Motor recovered after the MRI scan", details
    return (
        f"No motor stall recovery within {p.th.mri_recovery_s / 3600:g} h of an MRI scan",
        details,
    )


def _d_low(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    alarm_ml = p.alarm_ml or 0.0
    details: dict[str, Any] = {
        "reservoir_ml": p.reservoir_ml,
        "alarm_ml": alarm_ml,
        "pump_alarm": bool(p.alarms & _LOW),
    }
    if p.last_tel_seq < 0:
        details["reservoir_ml"] = None
        if active:
            return "Pump raised its low-reservoir alarm (no reading yet)", details
        return "Pump cleared its low-reservoir alarm", details
    if not active:
        return f"Reservoir {p.reservoir_ml:.1f} mL, above alarm volume {alarm_ml:.1f} mL", details
    return (
        f"Reservoir {p.reservoir_ml:.1f} mL at or below alarm volume {alarm_ml:.1f} mL",
        details,
    )


def _d_refill_due(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    days, daily_ml = p.due_fig
    alarm_ml = p.alarm_ml or 0.0
    details: dict[str, Any] = {
        "reservoir_ml": p.reservoir_ml,
        "alarm_ml": alarm_ml,
        "daily_ml": round(daily_ml, 4),
        "days_to_alarm": round(days, 2) if days != _INF else None,
    }
    if not active:
        return "Refill no longer due within the week", details
    return (
        f"Refill due: reservoir reaches alarm volume {alarm_ml:.1f} mL in {max(days, 0.0):.1f} "
        f"days ({p.reservoir_ml:.2f} mL at {daily_ml:.3f} mL/day)",
        details,
    )


def _d_battery(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    th = p.th
    days_left = cond.days_to_eos(p.eri_since_s, p.last_time_s, th)
    details: dict[str, Any] = {
        "eri": p.eri or bool(p.alarms & _ERI),
        "eos": bool(p.alarms & _EOS),
        "days_to_eos": round(days_left, 1) if days_left is not None else None,
    }
    if not active:
        return "Battery ERI no longer reported", details
    if p.alarms & _EOS:
        return "Battery EOS: the pump has stopped", details
    if days_left is None:
        return (
            f"Battery ERI, active since before monitoring began: EOS is {th.eos_after_eri_days:g} "
            "days after ERI, date unknown",
            details,
        )
    return f"Battery ERI: EOS in about {max(days_left, 0.0):.0f} days", details


def _d_dose(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    old, new, source = p.dose_change
    change = (new - old) / old if old > 0 else math.inf
    details = {
        "old_dose_mcg_per_day": old,
        "new_dose_mcg_per_day": new,
        "change_pct": round(change * 100, 1) if old > 0 else None,
        "source": source,
    }
    text = f"Programmed dose changed {old:g} -> {new:g} mcg/day"
    if old > 0:
        text += f" ({_pct(change)}, limit {p.th.large_dose_change_fraction * 100:.0f} %)"
    return (text if active else text + ": notice over"), details


def _d_silence(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    minutes = p.silent_s / 60
    details = {
        "silent_min": round(minutes, 1),
        "reporting_interval_s": p.interval_s,
        "intervals": round(p.silent_s / p.interval_s, 1),
    }
    if not active:
        return "Messages arrive again", details
    return (
        f"No message for {minutes:.0f} min ({p.silent_s / p.interval_s:.1f}x the "
        f"{p.interval_s / 60:g}-min reporting interval)",
        details,
    )


def _d_gap(p: _Pump, active: bool) -> tuple[str, dict[str, Any]]:
    first, last = p.lost_fig
    details = {"lost_messages": p.lost_count, "first_seq": first, "last_seq": last}
    if not active:
        return "No messages lost recently", details
    return f"{p.lost_count} message(s) lost on the way (seq {first}-{last})", details
