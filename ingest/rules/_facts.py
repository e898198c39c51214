"""What the engine knows about one pump, and what a rule is.

The engine (engine.py) keeps the facts every rule reads (the last reading, the active pump
alarms in seq order, the reporting interval, the alarm volume); each rule keeps its own state in
`Pump.state[name]` and answers one question at a time: `judge()` says whether its condition
holds right now, as a `Verdict`. The engine feeds verdicts through a hysteresis latch per
(pump, rule) and reports the transitions. Rules are pure: no I/O, no clock of their own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from ingest.rules._thresholds import PumpProfile, Thresholds
from pumpfleet.contract import Message, PumpAlarm, PumpState, ReservoirSource, Telemetry
from pumpfleet.findings import Priority

if TYPE_CHECKING:
    from ingest.rules._latch import Latch

INF = math.inf
DAY_S = 86_400.0
H_S = 3600.0


class Verdict(NamedTuple):
    """A rule's raw condition now: a priority (None: it does not hold), how long it must hold
    before an alert starts (`on_s`) and be gone before it ends (`off_s`), and what it is about
    (`key`: a change of key while open is reported again)."""

    priority: Priority | None
    on_s: float = 0.0
    off_s: float = 0.0
    key: object = None


ABSENT = Verdict(None)


class Pump:
    """Facts about one pump that several rules read; maintained by the engine."""

    __slots__ = (
        "alarm_ev",
        "alarm_floor_seq",
        "alarm_from",
        "alarm_ml",
        "alarms",
        "capacity_ml",
        "conc",
        "dose",
        "dose_seq",
        "heap_s",
        "interval_from",
        "interval_s",
        "last_heard_s",
        "last_time_s",
        "latches",
        "max_seq",
        "mri_active",
        "new_tel",
        "prev_tel_s",
        "profile",
        "pump_id",
        "rate_reset",
        "recovery_seq",
        "reported_interval_s",
        "stall_event",
        "stall_seq",
        "state",
        "suspended",
        "tel",
        "tel_s",
        "tel_seq",
        "th",
    )

    def __init__(self, pump_id: str, profile: PumpProfile | None, th: Thresholds) -> None:
        self.pump_id = pump_id
        self.profile = profile
        self.th = th
        self.max_seq = -1
        self.last_heard_s = -INF
        self.last_time_s = -INF
        self.heap_s = INF
        self.tel: Telemetry | None = None
        self.tel_s = -INF
        self.tel_seq = -1
        self.prev_tel_s = -INF
        self.new_tel = False
        self.reported_interval_s: float | None = None
        self.interval_s = th.default_reporting_interval_s
        self.interval_from = "default"
        self.alarm_ml: float | None = None
        self.alarm_from = "none"
        self.capacity_ml: float | None = None
        self.conc: float | None = None
        self.alarms: frozenset[PumpAlarm] = frozenset()
        self.alarm_floor_seq = -1
        self.alarm_ev: dict[PumpAlarm, tuple[int, bool]] = {}
        self.dose: float | None = None
        self.dose_seq = -1
        self.rate_reset: tuple[float, float, str] | None = None
        self.mri_active = False
        self.suspended = False
        self.stall_event = False
        self.stall_seq = -1
        self.recovery_seq = -1
        self.latches: dict[str, Latch] = {}
        self.state: dict[str, Any] = {}
        self.derive()

    def derive(self) -> None:
        """Interval and alarm volume from what the pump reports and what the clinic says."""
        th = self.th
        profile = self.profile
        if self.reported_interval_s is not None:
            self.interval_s, self.interval_from = self.reported_interval_s, "pump"
        elif profile is not None and profile.reporting_interval_s is not None:
            self.interval_s, self.interval_from = profile.reporting_interval_s, "clinic"
        else:
            self.interval_s, self.interval_from = th.default_reporting_interval_s, "default"
        reported = self.tel.low_reservoir_alarm_ml if self.tel is not None else None
        self.alarm_ml, self.alarm_from = effective_alarm_ml(reported, profile, th)

    # What several rules ask -----------------------------------------------------------------

    @property
    def source(self) -> ReservoirSource | None:
        return self.tel.source if self.tel is not None else None

    @property
    def delivering(self) -> bool:
        tel = self.tel
        return (
            tel is not None and tel.delivered_ul_per_h > 0 and tel.pump_state is PumpState.INFUSING
        )

    @property
    def scheduled_ul_per_h(self) -> float:
        """What the programme asks for now (v1: the programmed rate)."""
        tel = self.tel
        if tel is None:
            return 0.0
        if tel.scheduled_ul_per_h is not None:
            return tel.scheduled_ul_per_h
        return tel.programmed_rate_ul_per_h

    def explained_stop(self) -> frozenset[PumpAlarm]:
        """Active pump alarms that explain 'no delivery' (one cause, one page)."""
        explains = self.th.critical_explains_no_delivery
        causes = {a for a in self.alarms if a.value in explains}
        if self.stall_event and "motor_stall" in explains:
            causes.add(PumpAlarm.MOTOR_STALL)
        return frozenset(causes)

    def confirmed_profile(self) -> bool:
        return self.profile is not None and self.profile.confirmed

    def priority(self, rule: str) -> Priority | None:
        latch = self.latches.get(rule)
        return latch.priority if latch is not None else None


def effective_alarm_ml(
    reported_ml: float | None, profile: PumpProfile | None, th: Thresholds
) -> tuple[float | None, str]:
    """The volume the low-reservoir and refill-due rules use, and where it came from: the
    clinic's, else the thresholds', never below the pump's own programmed alarm (a registry
    default of 2 mL must not hide a pump set to 4 mL); at least 4 mL for a high-risk patient."""
    configured = th.low_reservoir_alarm_ml
    source = "thresholds"
    if profile is not None and profile.low_reservoir_alarm_ml is not None:
        configured = profile.low_reservoir_alarm_ml
        source = "clinic"
    if configured is None:
        alarm_ml, source = reported_ml, "pump"
    elif reported_ml is None:
        alarm_ml = configured
    elif reported_ml >= configured:
        alarm_ml, source = reported_ml, "pump"
    else:
        alarm_ml = configured
    high_risk = profile is not None and profile.high_risk
    if high_risk and (alarm_ml is None or alarm_ml < th.high_risk_low_reservoir_ml):
        alarm_ml, source = th.high_risk_low_reservoir_ml, "high-risk"
    return alarm_ml, source if alarm_ml is not None else "none"


class Rule:
    """One alert rule. Subclasses keep their per-pump state in `p.state[self.name]`."""

    name: str = ""
    timed: bool = False
    """Judged by the watchdog too (`tick`), at its `due()` time, even if nothing arrives."""

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        """Update this rule's own state from a new message (device time `t`)."""

    def judge(self, p: Pump, t: float) -> Verdict:
        raise NotImplementedError

    def due(self, p: Pump, after_s: float) -> float:
        """The next moment after `after_s` at which the watchdog must judge this rule without a
        message (timed rules); the engine ignores anything not later than `after_s`."""
        return INF

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    off_attr: str | None = None
    """The threshold that holds this rule's alert open once its condition is gone."""

    def off_s(self, th: Thresholds) -> float:
        return float(getattr(th, self.off_attr)) if self.off_attr else 0.0

    def restore(self, p: Pump, priority: Priority, since_s: float) -> None:
        """An alert the lifecycle still holds open after a restart: rebuild what ends it."""

    def reset(self, p: Pump) -> None:
        """The agent lost its seq store: forget what was ordered by seq."""
        p.state.pop(self.name, None)
