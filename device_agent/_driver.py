"""What the agent needs from a pump: a driver that says what the pump produced up to a moment.

The agent owns the envelope (`v`, `pump_id`, `seq`, `kind`) and delivery; a driver only models the
pump. `Observation` is the one type every pump model hands to a transport (this agent, and
`pumpfleet sim run`); sim_fleet's `Pump` is a `PumpDriver`, and `ConstantPump` is a tiny stand-in
for the CLI and tests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from pumpfleet.contract import PumpAlarm, PumpState, ReservoirSource
from pumpfleet.envelope import Observation


@runtime_checkable
class PumpDriver(Protocol):
    """A pump as the agent sees it; the agent calls `advance` with a non-decreasing `until`.

    Read-only properties, so a model that computes them (sim_fleet's `Pump`) fits as well as one
    that stores them (`ConstantPump`).
    """

    @property
    def pump_id(self) -> str: ...

    @property
    def reporting_interval_s(self) -> float: ...

    def advance(self, until: datetime) -> list[Observation]:
        """Everything the pump produced after the previous call, up to and including `until`,
        oldest first."""
        ...


class ConstantPump:
    """A pump on a steady continuous schedule: the reservoir falls by dose / concentration.

    Reports telemetry (contract v2) at `start` and every `reporting_interval_s` after it, and
    raises the low-reservoir and empty-reservoir alarms (as events, then in telemetry) when it
    crosses them. Its volume is a calculated one, as on every pump on the market; telemetry
    says `reporting_interval_s` in whole seconds (at least 1, as the contract requires).
    Fields are contract enums and tuples, so an observation validates both through
    `Observation.to_message` and as JSON (`device_agent.build_entry`).
    """

    def __init__(
        self,
        pump_id: str,
        *,
        start: datetime,
        reporting_interval_s: float = 600.0,
        dose_mcg_per_day: float = 500.0,
        concentration_mcg_per_ml: float = 2000.0,
        reservoir_capacity_ml: float = 20.0,
        reservoir_ml: float | None = None,
        low_reservoir_alarm_ml: float = 2.0,
        battery_pct: float = 90.0,
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware (UTC)")
        if reporting_interval_s <= 0:
            raise ValueError("reporting_interval_s must be > 0")
        self.pump_id = pump_id
        self.reporting_interval_s = reporting_interval_s
        self.start = start.astimezone(UTC)
        self.dose_mcg_per_day = dose_mcg_per_day
        self.concentration_mcg_per_ml = concentration_mcg_per_ml
        self.reservoir_capacity_ml = reservoir_capacity_ml
        self.initial_reservoir_ml = reservoir_capacity_ml if reservoir_ml is None else reservoir_ml
        self.low_reservoir_alarm_ml = low_reservoir_alarm_ml
        self.battery_pct = battery_pct
        self._next_report = 0
        self._alarms: list[PumpAlarm] = []

    @property
    def flow_ml_per_day(self) -> float:
        return self.dose_mcg_per_day / self.concentration_mcg_per_ml

    @property
    def rate_ul_per_h(self) -> float:
        return self.flow_ml_per_day * 1000.0 / 24.0

    def reservoir_at(self, when: datetime) -> float:
        days = (when - self.start).total_seconds() / 86_400
        return max(0.0, self.initial_reservoir_ml - self.flow_ml_per_day * days)

    def advance(self, until: datetime) -> list[Observation]:
        out: list[Observation] = []
        while True:
            when = self.start + timedelta(seconds=self._next_report * self.reporting_interval_s)
            if when > until:
                return out
            self._next_report += 1
            out.extend(self._report(when))

    def _report(self, when: datetime) -> list[Observation]:
        reservoir_ml = self.reservoir_at(when)
        events = []
        for alarm, active in (
            (PumpAlarm.LOW_RESERVOIR, reservoir_ml <= self.low_reservoir_alarm_ml),
            (PumpAlarm.EMPTY_RESERVOIR, reservoir_ml <= 0.0),
        ):
            if active and alarm not in self._alarms:
                self._alarms.append(alarm)
                events.append(Observation("event", when, {"event": "alarm_raised", "alarm": alarm}))
        empty = PumpAlarm.EMPTY_RESERVOIR in self._alarms
        rate = round(self.rate_ul_per_h, 4)
        telemetry = Observation(
            "telemetry",
            when,
            {
                "delivered_ul_per_h": 0.0 if empty else rate,
                "programmed_rate_ul_per_h": rate,
                "programmed_dose_mcg_per_day": self.dose_mcg_per_day,
                "reservoir_ml": round(reservoir_ml, 4),
                "reservoir_capacity_ml": self.reservoir_capacity_ml,
                "low_reservoir_alarm_ml": self.low_reservoir_alarm_ml,
                "concentration_mcg_per_ml": self.concentration_mcg_per_ml,
                "battery_pct": self.battery_pct,
                "battery_eri": False,
                "pump_state": PumpState.STOPPED if empty else PumpState.INFUSING,
                "alarms": tuple(self._alarms),
                "reservoir_source": ReservoirSource.CALCULATED,
                "reporting_interval_s": max(1, round(self.reporting_interval_s)),
                "scheduled_ul_per_h": rate,  # an empty pump still asks for its programme
            },
        )
        return [*events, telemetry]
