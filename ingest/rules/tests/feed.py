"""A hand-driven pump for unit tests: contract messages with running seq and time, a reservoir
that falls with the rotor (times a true-flow factor), and the engine's answers.

`family="measured"` (the default) reports the true volume plus `noise_ul` of sensor noise, as a
pump with a reservoir sensor would; `family="calculated"` reports what a SynchroMed-class pump
computes (the refill entry minus the rotor counts), whatever the true flow does. `v=1` sends
contract v1 payloads (no source, interval or schedule: read as calculated)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from ingest.rules import PumpProfile, RuleEngine
from pumpfleet.contract import (
    AlarmCleared,
    AlarmRaised,
    Bolus,
    DosingMode,
    MotorStall,
    MotorStallRecovery,
    MriEnd,
    MriStart,
    PumpAlarm,
    PumpState,
    Refill,
    Reprogram,
    ReservoirSource,
    Schedule,
    Status,
    Telemetry,
)
from pumpfleet.findings import Finding

T0 = datetime(2025, 1, 1, tzinfo=UTC)
EventT = TypeVar("EventT", bound=BaseModel)


def schedule(dose_mcg_per_day: float) -> dict[str, Any]:
    return Schedule(mode=DosingMode.CONTINUOUS, dose_mcg_per_day=dose_mcg_per_day).model_dump()


class Feed:
    """One pump: 500 mcg/day at 2000 mcg/mL (10.4 uL/h), 40 mL, 2 mL alarm, 30 mL left."""

    def __init__(
        self,
        engine: RuleEngine | None = None,
        pump_id: str = "P-000001",
        *,
        reservoir_ml: float = 30.0,
        dose_mcg_per_day: float = 500.0,
        concentration_mcg_per_ml: float = 2000.0,
        capacity_ml: float = 40.0,
        alarm_ml: float = 2.0,
        interval_s: float = 600.0,
        family: Literal["measured", "calculated"] = "measured",
        v: int = 2,
        noise_ul: float = 0.0,
        profile: PumpProfile | Literal["default"] | None = "default",
        seed: int = 1,
    ) -> None:
        self.engine = engine if engine is not None else RuleEngine()
        self.pump_id = pump_id
        self.family = family
        self.v = v
        self.noise_ul = noise_ul
        self.rng = random.Random(seed)
        if profile == "default":
            profile = PumpProfile(pump_id=pump_id, reporting_interval_s=interval_s)
        if profile is not None:
            self.engine.set_profile(profile)
        self.true_ml = reservoir_ml
        self.eri_since: datetime | None = None
        self.now = T0
        self.seq = 0
        self.reservoir_ml = reservoir_ml
        self.dose_mcg_per_day = dose_mcg_per_day
        self.concentration = concentration_mcg_per_ml
        self.capacity_ml = capacity_ml
        self.alarm_ml = alarm_ml
        self.interval_s = interval_s
        self.flow_factor = 1.0
        """True flow / rotor flow: 1.25 over-infuses, 0 is a complete occlusion."""
        self.state = PumpState.INFUSING
        self.alarms: tuple[PumpAlarm, ...] = ()
        self.eri = False
        self.findings: list[Finding] = []

    @property
    def rate_ul_per_h(self) -> float:
        return self.dose_mcg_per_day / self.concentration / 24 * 1000

    def _take(self, found: list[Finding]) -> list[Finding]:
        self.findings += found
        return found

    def _envelope(self, dt_s: float) -> dict[str, Any]:
        self.now += timedelta(seconds=dt_s)
        env = {"v": self.v, "pump_id": self.pump_id, "seq": self.seq, "time": self.now}
        self.seq += 1
        return env

    def telemetry_msg(self, dt_s: float | None = None, **fields: Any) -> Telemetry:
        """The next reading; the reservoir falls by what the rotor delivered x flow_factor."""
        dt_s = self.interval_s if dt_s is None else dt_s
        turning = self.state is PumpState.INFUSING
        delivered = fields.pop("delivered_ul_per_h", self.rate_ul_per_h if turning else 0.0)
        self.true_ml = max(0.0, self.true_ml - delivered * self.flow_factor * dt_s / 3.6e6)
        if self.family == "measured":
            noisy = self.true_ml + self.rng.gauss(0.0, self.noise_ul) / 1000.0
            self.reservoir_ml = min(self.capacity_ml, max(0.0, noisy))
        else:
            self.reservoir_ml = max(0.0, self.reservoir_ml - delivered * dt_s / 3.6e6)
        body: dict[str, Any] = {
            "delivered_ul_per_h": round(delivered, 3),
            "programmed_rate_ul_per_h": round(self.rate_ul_per_h, 3),
            "programmed_dose_mcg_per_day": self.dose_mcg_per_day,
            "reservoir_ml": round(self.reservoir_ml, 3),
            "reservoir_capacity_ml": self.capacity_ml,
            "low_reservoir_alarm_ml": self.alarm_ml,
            "concentration_mcg_per_ml": self.concentration,
            "battery_pct": 80.0,
            "battery_eri": self.eri,
            "pump_state": self.state,
            "alarms": self.alarms,
        }
        if self.v >= 2:
            suspended = self.state is PumpState.SUSPENDED
            body |= {
                "reservoir_source": ReservoirSource(self.family),
                "reporting_interval_s": int(self.interval_s),
                "scheduled_ul_per_h": 0.0 if suspended else round(self.rate_ul_per_h, 3),
            }
            if self.eri:
                self.eri_since = self.eri_since or self.now
                body["eri_since"] = self.eri_since
        body.update(fields)
        return Telemetry.model_validate({**self._envelope(dt_s), **body})

    def telemetry(self, dt_s: float | None = None, **fields: Any) -> list[Finding]:
        return self._take(self.engine.observe(self.telemetry_msg(dt_s, **fields)))

    def hours(self, hours: float, **fields: Any) -> list[Finding]:
        """Telemetry every interval for `hours`; all the findings on the way."""
        found: list[Finding] = []
        for _ in range(round(hours * 3600 / self.interval_s)):
            found += self.telemetry(**fields)
        return found

    def event_msg(self, cls: type[EventT], dt_s: float = 0.0, **fields: Any) -> EventT:
        if cls is Refill and self.v >= 2:
            measured = self.family == "measured"
            fields.setdefault("expected_source", ReservoirSource(self.family))
            fields.setdefault("reservoir_after_source", "measured" if measured else "entered")
        return cls.model_validate({**self._envelope(dt_s), "kind": "event", **fields})

    def event(self, cls: type[BaseModel], dt_s: float = 0.0, **fields: Any) -> list[Finding]:
        msg: Any = self.event_msg(cls, dt_s, **fields)
        return self._take(self.engine.observe(msg))

    def refill(
        self,
        expected_ml: float,
        withdrawn_ml: float,
        injected_ml: float = 40.0,
        after_ml: float | None = None,
    ) -> list[Finding]:
        after_ml = injected_ml if after_ml is None else after_ml
        self.reservoir_ml = self.true_ml = after_ml
        return self.event(
            Refill,
            event="refill",
            expected_ml=expected_ml,
            withdrawn_ml=withdrawn_ml,
            injected_ml=injected_ml,
            reservoir_after_ml=after_ml,
            concentration_mcg_per_ml=self.concentration,
        )

    def reprogram(self, new_dose: float, session: bool = True) -> list[Finding]:
        old = self.dose_mcg_per_day
        self.dose_mcg_per_day = new_dose
        return self.event(
            Reprogram,
            event="reprogram",
            old_schedule=schedule(old),
            new_schedule=schedule(new_dose),
            session=session,
        )

    def raise_alarm(self, alarm: PumpAlarm) -> list[Finding]:
        self.alarms = (*self.alarms, alarm)
        return self.event(AlarmRaised, event="alarm_raised", alarm=alarm)

    def clear_alarm(self, alarm: PumpAlarm) -> list[Finding]:
        self.alarms = tuple(a for a in self.alarms if a is not alarm)
        return self.event(AlarmCleared, event="alarm_cleared", alarm=alarm)

    def stall(self) -> list[Finding]:
        self.state = PumpState.STALLED
        return self.event(MotorStall, event="motor_stall")

    def recover(self, stalled_since: datetime | None = None) -> list[Finding]:
        self.state = PumpState.INFUSING
        return self.event(
            MotorStallRecovery,
            event="motor_stall_recovery",
            stalled_since=stalled_since or self.now,
        )

    def mri(self, scan_min: float = 45.0) -> list[Finding]:
        """Scan: suspended, then stalled after it (no recovery yet)."""
        found = self.event(MriStart, event="mri_start")
        self.state = PumpState.SUSPENDED
        found += self.event(MotorStall, event="motor_stall")
        found += self.hours(scan_min / 60)
        self.state = PumpState.STALLED
        found += self.event(MriEnd, event="mri_end")
        return found

    def bolus(self, dose_mcg: float, source: str = "patient") -> list[Finding]:
        return self.event(Bolus, event="bolus", source=source, dose_mcg=dose_mcg, duration_min=15.0)

    def status(self, online: bool) -> list[Finding]:
        msg = Status.model_validate({**self._envelope(0), "kind": "status", "online": online})
        return self._take(self.engine.observe(msg))

    def tick(self, dt_s: float) -> list[Finding]:
        """Let time pass with nothing sent, then run the watchdog."""
        self.now += timedelta(seconds=dt_s)
        return self._take(self.engine.tick(self.now))

    def skip(self, n: int = 1) -> None:
        """Use up `n` seqs for messages that never arrive (time passes with them)."""
        for _ in range(n):
            self.telemetry_msg()


def only(found: list[Finding], rule: str) -> list[tuple[bool, str]]:
    """(active, priority) of one rule's findings, in order."""
    return [(f.active, f.priority) for f in found if f.rule == rule]
