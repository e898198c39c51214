"""One implanted ITB pump as a pure state machine advanced in simulated time.

The model integrates drug flow piecewise: between two "change points" (a fault, a refill, a flex
step boundary, a bolus ending, a threshold crossing, a telemetry boundary) every rate is constant,
so volumes and battery are exact linear functions of time and no time step is needed. The pump
never integrates up to an arbitrary `until`, only to change points, so how a caller slices time
into `advance()` calls cannot change a single number it emits.

Observability (domain.md, "What a pump can actually report"; README.md): the pump sends what a
real pump of its family could know, never the truth.

- `calculated` family (SynchroMed-like, rotor counts) and `valve` family (Prometra-like, valve
  strokes): telemetry `reservoir_ml` is the pump's ESTIMATE, the volume entered at the last
  refill minus what the rotor (valve) counts say it delivered. It falls exactly as programmed
  whatever the catheter or the pump's flow bias does; the pump's own low-reservoir and empty
  alarms follow it too. A pocket fill is invisible at the refill (the pump takes the injected
  volume on trust) and the true reservoir runs dry early while the estimate keeps falling.
- `measured` family (a pump or bridge with an independent reservoir sensor): `reservoir_ml` is
  the true volume plus sensor noise and drift (re-zeroed at each refill).

On every family `delivered_ul_per_h` is the rotor (valve) count and `scheduled_ul_per_h` what the
programme asked for over the same interval; the true flow is rotor flow x (1 + flow bias).
Ground truth stays readable on `Pump` (`reservoir_ml`, `delivered_to_patient_ml`) for tests.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from device_agent import PumpDriver
from pumpfleet.contract import (
    DosingMode,
    FlexStep,
    PumpAlarm,
    PumpState,
    ReservoirSource,
    Schedule,
)
from pumpfleet.envelope import Observation, ObservationKind

RESERVOIR_SIZES_ML = (20.0, 40.0)
CONCENTRATIONS_MCG_PER_ML = (500.0, 1000.0, 2000.0)
LABELLED_FLOW_ACCURACY = 0.145
"""Labelled flow accuracy (+-14.5 %); a pump's own bias lies within it."""
EOS_AFTER_ERI_DAYS = 90.0
BATTERY_REFERENCE_FLOW_ML_PER_DAY = 0.5
"""Flow at which `battery_life_days` is quoted; more flow, shorter life (design choice)."""
MINIMUM_RATE_UL_PER_H = 0.25
"""About 0.006 mL/day: the very low rate a battery fault resets the pump to."""
MAX_ROTOR_RATE_UL_PER_H = 1000.0
"""Fastest the rotor turns (about 1 mL/h, design choice); long boluses are stretched to fit."""
VALVE_STROKE_UL = 2.0
"""Volume of one valve actuation of a `valve`-family pump: its delivery is counted in these."""
PUMP_FAMILIES = ("calculated", "measured", "valve")
"""calculated: rotor counts (SynchroMed-like); measured: an independent reservoir sensor;
valve: valve-stroke counts (Prometra-like), a calculated volume too."""

PumpFamily = Literal["calculated", "measured", "valve"]

_DAY_S = 86_400.0
_EPS_ML = 1e-9
_EPS_S = 1e-6
_ML_PER_DAY_TO_UL_PER_H = 1000.0 / 24.0


def rate_ul_per_h(dose_mcg_per_day: float, concentration_mcg_per_ml: float) -> float:
    """Flow that delivers a daily dose: dose / concentration (mL/day) in uL/h."""
    return dose_mcg_per_day / concentration_mcg_per_ml * _ML_PER_DAY_TO_UL_PER_H


def dose_mcg_per_day(rate_ul_per_h_: float, concentration_mcg_per_ml: float) -> float:
    """Daily dose that a flow delivers; the inverse of `rate_ul_per_h`."""
    return rate_ul_per_h_ / _ML_PER_DAY_TO_UL_PER_H * concentration_mcg_per_ml


def flex_daily_dose_mcg(steps: Sequence[FlexStep]) -> float:
    """Time-weighted sum of flex steps: what the schedule delivers in one day."""
    total = 0.0
    for i, step in enumerate(steps):
        end = steps[i + 1].start_minute if i + 1 < len(steps) else 24 * 60
        total += step.dose_mcg_per_day * (end - step.start_minute) / (24 * 60)
    return total


def continuous_schedule(dose_mcg_per_day_: float) -> Schedule:
    return Schedule(mode=DosingMode.CONTINUOUS, dose_mcg_per_day=float(dose_mcg_per_day_))


def flex_schedule(steps: Iterable[tuple[int, float]]) -> Schedule:
    """A flex schedule from (start_minute, dose_mcg_per_day) pairs; its daily dose is derived."""
    fs = tuple(FlexStep(start_minute=int(m), dose_mcg_per_day=float(d)) for m, d in steps)
    return Schedule(mode=DosingMode.FLEX, dose_mcg_per_day=flex_daily_dose_mcg(fs), steps=fs)


def scaled_schedule(schedule: Schedule, dose_mcg_per_day_: float) -> Schedule:
    """The same shape of schedule delivering a new daily dose (flex steps scale together)."""
    if schedule.mode is DosingMode.CONTINUOUS or schedule.dose_mcg_per_day <= 0:
        return continuous_schedule(dose_mcg_per_day_)
    k = dose_mcg_per_day_ / schedule.dose_mcg_per_day
    return flex_schedule((s.start_minute, s.dose_mcg_per_day * k) for s in schedule.steps)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# The pump's identity and programming ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PumpSpec:
    """What a pump is and how it was left at the start: everything a `Pump` needs, nothing live."""

    pump_id: str
    reservoir_capacity_ml: float
    concentration_mcg_per_ml: float
    schedule: Schedule
    flow_bias: float = 0.0
    """This pump's own flow error: true flow = rotor flow x (1 + flow_bias)."""
    family: PumpFamily = "calculated"
    """How the pump knows its reservoir volume: `calculated` (refill entry minus rotor counts),
    `measured` (an independent sensor), `valve` (refill entry minus valve strokes)."""
    sensor_noise_ul: float = 2.0
    """Measured family: SD of the sensor's noise per reading (uL)."""
    sensor_drift_ul_per_day: float = 0.0
    """Measured family: the sensor's drift since it was re-zeroed at the last refill."""
    low_reservoir_alarm_ml: float = 2.0
    high_risk: bool = False
    clinic: str = "C-01"
    reporting_interval_s: int = 600
    report_offset_s: int = 0
    """Phase of telemetry inside the interval, so a fleet does not report in lockstep."""
    refill_interval_days: float | None = None
    """Routine refill visits this often (1-6 months); None: refills only from the timeline."""
    refill_margin_days: float | None = None
    """After each refill book the next visit so that, by the pump's own reading then, at least
    this many days to the alarm volume are left at the visit under a worst-case flow of
    (programmed + mean patient-bolus volume) x 1.145; never later than `refill_interval_days`.
    None: every `refill_interval_days`."""
    days_since_refill: float = 0.0
    initial_reservoir_ml: float | None = None
    """True volume at the start; None: full."""
    initial_estimate_error_ml: float = 0.0
    """Rotor-count estimate minus true volume at the start (accumulated flow bias)."""
    initial_battery_pct: float = 100.0
    battery_life_days: float = 6 * 365.0
    """Life from full to EOS at the reference flow; ERI comes 90 days before EOS."""
    battery_flow_share: float = 0.4
    """Share of battery drain that scales with rotor flow (the rest is electronics)."""
    battery_replacement_after_eri_days: float | None = 45.0
    """The pump is replaced (battery 100 %, ERI cleared) this long after its battery reaches
    ERI; None: never (it runs on to EOS). An injected `BatteryEri` is never followed by one."""
    refill_entry_sd_ml: float = 0.3
    """SD of the clinician's reading of the withdrawn volume at a refill (mL)."""
    patient_bolus_dose_mcg: float = 0.0
    """0 disables patient boluses."""
    patient_bolus_duration_min: float = 15.0
    patient_bolus_max_per_day: int = 0
    """Most patient boluses given in any rolling 24 h."""
    patient_bolus_lockout_min: float = 180.0
    patient_bolus_presses_per_day: float = 0.0
    """Mean rate of spontaneous patient presses (Poisson); timeline presses come on top."""
    utc_offset_min: int = 0
    """Local time of the flex steps = UTC + this."""
    seed: int = 0
    """Seeds this pump's own random draws (refill readings, presses, transport faults)."""

    def __post_init__(self) -> None:
        _check(
            self.reservoir_capacity_ml in RESERVOIR_SIZES_ML,
            f"reservoir_capacity_ml: {self.reservoir_capacity_ml} is not one of "
            f"{RESERVOIR_SIZES_ML}",
        )
        _check(
            self.concentration_mcg_per_ml in CONCENTRATIONS_MCG_PER_ML,
            f"concentration_mcg_per_ml: {self.concentration_mcg_per_ml} is not one of "
            f"{CONCENTRATIONS_MCG_PER_ML}",
        )
        if self.schedule.mode is DosingMode.FLEX:
            integral = flex_daily_dose_mcg(self.schedule.steps)
            _check(
                abs(integral - self.schedule.dose_mcg_per_day) <= 0.01,
                f"schedule.dose_mcg_per_day: {self.schedule.dose_mcg_per_day} differs from "
                f"its steps' daily total {integral:.2f}",
            )
        _check(-1.0 < self.flow_bias <= 1.0, "flow_bias: must be in (-1, 1]")
        _check(
            self.family in PUMP_FAMILIES,
            f"family: {self.family!r} is not one of {', '.join(PUMP_FAMILIES)}",
        )
        _check(0 <= self.sensor_noise_ul <= 1000, "sensor_noise_ul: must be in [0, 1000] (SD, uL)")
        _check(
            -1000 <= self.sensor_drift_ul_per_day <= 1000,
            "sensor_drift_ul_per_day: must be in [-1000, 1000]",
        )
        _check(0 <= self.refill_entry_sd_ml <= 5, "refill_entry_sd_ml: must be in [0, 5] (SD, mL)")
        _check(
            self.refill_margin_days is None or 0 <= self.refill_margin_days <= 180,
            "refill_margin_days: must be in [0, 180] or null",
        )
        _check(
            self.battery_replacement_after_eri_days is None
            or 0 <= self.battery_replacement_after_eri_days < EOS_AFTER_ERI_DAYS,
            "battery_replacement_after_eri_days: must be in [0, 90) (before EOS) or null",
        )
        _check(
            0 < self.low_reservoir_alarm_ml < self.reservoir_capacity_ml,
            "low_reservoir_alarm_ml: must be above 0 and below reservoir_capacity_ml",
        )
        _check(self.reporting_interval_s >= 1, "reporting_interval_s: must be at least 1")
        _check(
            0 <= self.report_offset_s < self.reporting_interval_s,
            "report_offset_s: must be in [0, reporting_interval_s)",
        )
        _check(
            self.refill_interval_days is None or self.refill_interval_days >= 1,
            "refill_interval_days: must be at least 1 day",
        )
        _check(self.days_since_refill >= 0, "days_since_refill: must be >= 0")
        if self.initial_reservoir_ml is not None:
            _check(
                0 <= self.initial_reservoir_ml <= self.reservoir_capacity_ml,
                "initial_reservoir_ml: must be in [0, reservoir_capacity_ml]",
            )
        _check(0 <= self.initial_battery_pct <= 100, "initial_battery_pct: must be in [0, 100]")
        _check(self.battery_life_days > EOS_AFTER_ERI_DAYS, "battery_life_days: must exceed 90")
        _check(0 <= self.battery_flow_share <= 1, "battery_flow_share: must be in [0, 1]")
        _check(
            0 <= self.patient_bolus_dose_mcg <= 2000, "patient_bolus_dose_mcg: must be in [0, 2000]"
        )
        _check(self.patient_bolus_duration_min > 0, "patient_bolus_duration_min: must be > 0")
        _check(self.patient_bolus_max_per_day >= 0, "patient_bolus_max_per_day: must be >= 0")
        _check(self.patient_bolus_lockout_min >= 0, "patient_bolus_lockout_min: must be >= 0")
        _check(
            self.patient_bolus_presses_per_day >= 0, "patient_bolus_presses_per_day: must be >= 0"
        )

    @property
    def rate_ul_per_h(self) -> float:
        """Mean programmed rate over a day."""
        return rate_ul_per_h(self.schedule.dose_mcg_per_day, self.concentration_mcg_per_ml)

    @property
    def flow_ml_per_day(self) -> float:
        return self.schedule.dose_mcg_per_day / self.concentration_mcg_per_ml

    @property
    def eri_battery_pct(self) -> float:
        """Battery level at which ERI trips: 90 days left at the reference flow."""
        return 100.0 * EOS_AFTER_ERI_DAYS / self.battery_life_days


# Faults and clinical actions --------------------------------------------------------------------
# Each is a small frozen dataclass with the simulated (true) time it starts at.


@dataclass(frozen=True, slots=True)
class MotorStallFault:
    """Rotor stops (wear, corrosion): stall event and alarm; optional recovery."""

    at: datetime
    recover_after_h: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.recover_after_h is None or self.recover_after_h > 0,
            "recover_after_h: must be > 0 or null (never recovers)",
        )


@dataclass(frozen=True, slots=True)
class MriScan:
    """An MRI scan: rotor stops for the scan and recovers after it, or never."""

    at: datetime
    scan_min: float = 45.0
    recover_after_h: float | None = 4.0
    """Hours after the scan ends that the rotor recovers (2-24 h); None: missing recovery."""
    recovery_logged_after_h: float = 0.0
    """The rotor turns again at recovery, but `motor_stall_recovery` is logged this much later."""

    def __post_init__(self) -> None:
        _check(self.scan_min > 0, "scan_min: must be > 0")
        _check(
            self.recover_after_h is None or self.recover_after_h >= 0,
            "recover_after_h: must be >= 0 or null (missing recovery)",
        )
        _check(
            0 <= self.recovery_logged_after_h <= 24 * 365,
            "recovery_logged_after_h: must be >= 0 (hours)",
        )


@dataclass(frozen=True, slots=True)
class OverInfusion:
    """The pump's flow bias jumps to `bias` (true flow = rotor flow x (1 + bias))."""

    at: datetime
    bias: float = 0.25

    def __post_init__(self) -> None:
        _check(0 < self.bias <= 1, "bias: over-infusion needs a bias in (0, 1]")


@dataclass(frozen=True, slots=True)
class UnderInfusion:
    """The pump's flow bias drops to `bias` (e.g. -0.30)."""

    at: datetime
    bias: float = -0.30

    def __post_init__(self) -> None:
        _check(-1 < self.bias < 0, "bias: under-infusion needs a bias in (-1, 0)")


@dataclass(frozen=True, slots=True)
class CatheterOcclusion:
    """Drug stops reaching the patient; the pump raises no alarm and reports normal delivery.

    `reservoir_outflow_fraction` is the share of the rotor's flow that still leaves the
    reservoir: 0 for a complete occlusion (the reservoir stops falling: visible), 1 for a
    disconnection or leak into the tissue (the reservoir falls as usual: invisible).
    """

    at: datetime
    reservoir_outflow_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check(
            0 <= self.reservoir_outflow_fraction <= 1,
            "reservoir_outflow_fraction: must be in [0, 1]",
        )


@dataclass(frozen=True, slots=True)
class RotorMismatch:
    """From `at` the rotor turns at `factor` x the programmed rate, and counts what it turns.

    `delivered_ul_per_h` (rotor counts) = factor x `scheduled_ul_per_h`; a calculated reservoir
    falls by the counts; true flow = rotor flow x (1 + bias). 1 puts it right again.
    """

    at: datetime
    factor: float = 0.5

    def __post_init__(self) -> None:
        _check(0 < self.factor <= 3, "factor: must be in (0, 3]")


@dataclass(frozen=True, slots=True)
class PartialOcclusion:
    """A partial kink: the rotor counts as programmed but only `flow_fraction` of its flow leaves
    the reservoir and reaches the patient (1 clears it). No pump alarm."""

    at: datetime
    flow_fraction: float = 0.5

    def __post_init__(self) -> None:
        _check(0 <= self.flow_fraction <= 1, "flow_fraction: must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class ClinicianSuspend:
    """A clinician stops therapy in a session (`suspend` event): state suspended, no delivery,
    nothing scheduled, no boluses; `resume` after `duration_h` (None: stays suspended)."""

    at: datetime
    duration_h: float | None = 24.0

    def __post_init__(self) -> None:
        _check(
            self.duration_h is None or self.duration_h > 0,
            "duration_h: must be > 0 or null (stays suspended)",
        )


@dataclass(frozen=True, slots=True)
class SensorDrift:
    """A measured-family pump's reservoir sensor drifts at this rate from `at` (re-zeroed at
    each refill, the drift rate stays). No effect on a calculated pump."""

    at: datetime
    drift_ul_per_day: float

    def __post_init__(self) -> None:
        _check(
            -1000 <= self.drift_ul_per_day <= 1000,
            "drift_ul_per_day: must be in [-1000, 1000]",
        )


def _check_withdrawn_error(value: float | None) -> None:
    _check(
        value is None or -40 <= value <= 40,
        "withdrawn_error_ml: must be in [-40, 40] or null (drawn from refill_entry_sd_ml)",
    )


@dataclass(frozen=True, slots=True)
class RefillVisit:
    """A clinic refill: withdraw what is left, inject new drug (default: fill to capacity).

    `withdrawn_error_ml` forces the clinician's reading error of the withdrawn volume (default:
    drawn from the pump's `refill_entry_sd_ml`).
    """

    at: datetime
    injected_ml: float | None = None
    concentration_mcg_per_ml: float | None = None
    withdrawn_error_ml: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.injected_ml is None or 0 < self.injected_ml <= 40,
            "injected_ml: must be in (0, 40]",
        )
        _check_withdrawn_error(self.withdrawn_error_ml)
        _check(
            self.concentration_mcg_per_ml is None
            or self.concentration_mcg_per_ml in CONCENTRATIONS_MCG_PER_ML,
            f"concentration_mcg_per_ml: must be one of {CONCENTRATIONS_MCG_PER_ML}",
        )


@dataclass(frozen=True, slots=True)
class PocketFill:
    """A refill where `pocket_ml` of the injection goes beside the pump, not into it."""

    at: datetime
    pocket_ml: float = 8.0
    injected_ml: float | None = None
    withdrawn_error_ml: float | None = None

    def __post_init__(self) -> None:
        _check(self.pocket_ml > 0, "pocket_ml: must be > 0")
        _check(
            self.injected_ml is None or self.pocket_ml <= self.injected_ml <= 40,
            "injected_ml: must be in [pocket_ml, 40]",
        )
        _check_withdrawn_error(self.withdrawn_error_ml)


@dataclass(frozen=True, slots=True)
class BatteryFault:
    """Reduced battery performance: alarm, and the rate resets low with no programming session."""

    at: datetime
    reset_rate_ul_per_h: float = MINIMUM_RATE_UL_PER_H

    def __post_init__(self) -> None:
        _check(self.reset_rate_ul_per_h >= 0, "reset_rate_ul_per_h: must be >= 0")


@dataclass(frozen=True, slots=True)
class BatteryEri:
    """The battery reaches ERI now (or was there already): EOS follows in `days_to_eos`.

    Injected ERI is never followed by the clinic's pump replacement (the spec's
    `battery_replacement_after_eri_days` applies to ERI reached by the battery's own drain)."""

    at: datetime
    days_to_eos: float = EOS_AFTER_ERI_DAYS

    def __post_init__(self) -> None:
        _check(0 <= self.days_to_eos <= EOS_AFTER_ERI_DAYS, "days_to_eos: must be in [0, 90]")


@dataclass(frozen=True, slots=True)
class MemoryFault:
    """Memory corruption: critical stops therapy, non-critical keeps infusing."""

    at: datetime
    critical: bool = True
    clear_after_h: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.clear_after_h is None or self.clear_after_h > 0,
            "clear_after_h: must be > 0 or null (never cleared)",
        )


@dataclass(frozen=True, slots=True)
class TelemetrySilence:
    """The pump's link is down: nothing is sent for `duration_h`; the pump keeps working."""

    at: datetime
    duration_h: float = 6.0

    def __post_init__(self) -> None:
        _check(self.duration_h > 0, "duration_h: must be > 0")


@dataclass(frozen=True, slots=True)
class ClockSkew:
    """From `at` on, the device clock reads true time + `offset_s` (0 puts it right again)."""

    at: datetime
    offset_s: float = 240.0


@dataclass(frozen=True, slots=True)
class DuplicateDelivery:
    """For `duration_h`, a `share` of messages is flagged to be delivered twice."""

    at: datetime
    duration_h: float = 1.0
    share: float = 1.0

    def __post_init__(self) -> None:
        _check(self.duration_h > 0, "duration_h: must be > 0")
        _check(0 < self.share <= 1, "share: must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class OutOfOrderDelivery:
    """For `duration_h`, a `share` of messages is flagged to be held `delay_s` (simulated)."""

    at: datetime
    duration_h: float = 1.0
    delay_s: float = 1200.0
    share: float = 0.3

    def __post_init__(self) -> None:
        _check(self.duration_h > 0, "duration_h: must be > 0")
        _check(self.delay_s > 0, "delay_s: must be > 0")
        _check(0 < self.share <= 1, "share: must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class MessageLoss:
    """For `duration_h`, a `share` of messages is flagged lost after getting a seq (a gap)."""

    at: datetime
    duration_h: float = 1.0
    share: float = 0.5

    def __post_init__(self) -> None:
        _check(self.duration_h > 0, "duration_h: must be > 0")
        _check(0 < self.share <= 1, "share: must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class ClinicianReprogram:
    """A programming session: a new daily dose (same shape) or a whole new schedule."""

    at: datetime
    dose_mcg_per_day: float | None = None
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        _check(
            (self.dose_mcg_per_day is None) != (self.schedule is None),
            "dose_mcg_per_day / schedule: give exactly one",
        )
        _check(
            self.dose_mcg_per_day is None or 0 <= self.dose_mcg_per_day <= 10_000,
            "dose_mcg_per_day: must be in [0, 10000]",
        )


@dataclass(frozen=True, slots=True)
class ClinicianBolus:
    at: datetime
    dose_mcg: float = 50.0
    duration_min: float = 30.0

    def __post_init__(self) -> None:
        _check(0 < self.dose_mcg <= 2000, "dose_mcg: must be in (0, 2000]")
        _check(self.duration_min > 0, "duration_min: must be > 0")


@dataclass(frozen=True, slots=True)
class PatientBolusPress:
    """The patient presses the bolus button; the pump refuses inside lockout or past the max."""

    at: datetime


Fault = (
    MotorStallFault
    | MriScan
    | OverInfusion
    | UnderInfusion
    | CatheterOcclusion
    | RotorMismatch
    | PartialOcclusion
    | ClinicianSuspend
    | SensorDrift
    | RefillVisit
    | PocketFill
    | BatteryFault
    | BatteryEri
    | MemoryFault
    | TelemetrySilence
    | ClockSkew
    | DuplicateDelivery
    | OutOfOrderDelivery
    | MessageLoss
    | ClinicianReprogram
    | ClinicianBolus
    | PatientBolusPress
)
"""Anything a timeline can do to a pump: faults and the clinic's actions."""


# What the pump sends ----------------------------------------------------------------------------
# `Observation` is the device agent's (the one type every transport takes) and is re-exported
# here and from sim_fleet.


# The pump ---------------------------------------------------------------------------------------


def _to_s(t: datetime) -> float:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{t!r} must carry a UTC offset")
    return t.timestamp()


def _to_dt(s: float) -> datetime:
    return datetime.fromtimestamp(s, UTC)


_Later = Callable[[list[Observation]], None]
_Window = tuple[float, str, float, float]  # (end_s, kind, share, delay_s)


def mean_patient_boluses_per_day(spec: PumpSpec) -> float:
    """Patient boluses a day the pump gives on average at most: presses, capped by the daily
    maximum and the lockout."""
    if spec.patient_bolus_dose_mcg <= 0:
        return 0.0
    lockout_cap = (
        24 * 60 / spec.patient_bolus_lockout_min if spec.patient_bolus_lockout_min else 1e9
    )
    return min(spec.patient_bolus_presses_per_day, spec.patient_bolus_max_per_day, lockout_cap)


def worst_case_flow_ml_per_day(
    spec: PumpSpec,
    dose_mcg_per_day_: float | None = None,
    concentration_mcg_per_ml: float | None = None,
) -> float:
    """(programmed daily volume + mean patient-bolus volume per day) x (1 + 14.5 %): the flow a
    clinic books the next refill against (default: the spec's dose and concentration)."""
    dose = spec.schedule.dose_mcg_per_day if dose_mcg_per_day_ is None else dose_mcg_per_day_
    conc = concentration_mcg_per_ml or spec.concentration_mcg_per_ml
    bolus_mcg = spec.patient_bolus_dose_mcg * mean_patient_boluses_per_day(spec)
    return (dose + bolus_mcg) / conc * (1 + LABELLED_FLOW_ACCURACY)


def booked_refill_days(
    volume_ml: float, alarm_ml: float, worst_flow_ml_per_day: float, margin_days: float
) -> float:
    """Days until a refill visit that leaves `margin_days` to the alarm volume at the visit under
    the worst-case flow (at least 1 day; infinite with no flow)."""
    if worst_flow_ml_per_day <= 0:
        return math.inf
    return max(1.0, (volume_ml - alarm_ml) / worst_flow_ml_per_day - margin_days)


class Pump:
    """A pump's live state. Advance it with `advance(until)`; read what it sent from the result.

    State is a few dozen floats plus a heap of pending faults, so a process can hold thousands.
    """

    __slots__ = (
        "_alarms",
        "_battery_pct",
        "_bias",
        "_boluses",
        "_clock_s",
        "_conc",
        "_drain_pct_per_s",
        "_drift_base_ul",
        "_drift_since_s",
        "_drift_ul_per_day",
        "_dry",
        "_eos",
        "_eri_at_s",
        "_eri_since",
        "_eri_token",
        "_estimate_ml",
        "_heap",
        "_heap_n",
        "_last_report_s",
        "_measured",
        "_mem_critical",
        "_next_change_s",
        "_next_press_s",
        "_next_refill_s",
        "_next_report_s",
        "_now_s",
        "_occluded",
        "_out_ml_per_s",
        "_outflow",
        "_partial",
        "_patient_given_s",
        "_patient_ml",
        "_patient_ml_per_s",
        "_programmed_ul_per_h",
        "_report_base_s",
        "_report_k",
        "_reservoir_ml",
        "_rng",
        "_rotor_factor",
        "_rotor_ul",
        "_rotor_ul_per_h",
        "_scanning",
        "_sched_ul",
        "_sched_ul_per_h",
        "_schedule",
        "_silent_until_s",
        "_skew_s",
        "_source",
        "_stall_alarm",
        "_stalled_since",
        "_started",
        "_state_now",
        "_steps",
        "_suspend_token",
        "_suspended",
        "_valve",
        "_valve_carry_ul",
        "_windows",
        "patient_boluses_refused",
        "spec",
    )

    def __init__(self, spec: PumpSpec, start: datetime, faults: Iterable[Fault] = ()) -> None:
        start_s = _to_s(start)
        self.spec = spec
        self.patient_boluses_refused = 0
        self._now_s = start_s
        self._clock_s = start_s
        self._started = False
        self._rng: random.Random | None = None
        self._measured = spec.family == "measured"
        self._valve = spec.family == "valve"
        self._source = ReservoirSource.MEASURED if self._measured else ReservoirSource.CALCULATED
        self._state_now = PumpState.INFUSING
        self._conc = spec.concentration_mcg_per_ml
        self._schedule = spec.schedule
        self._steps = self._step_table()
        self._bias = spec.flow_bias
        self._outflow = 1.0
        self._occluded = False
        self._partial = 1.0
        self._rotor_factor = 1.0
        cap = spec.reservoir_capacity_ml
        res = cap if spec.initial_reservoir_ml is None else spec.initial_reservoir_ml
        self._reservoir_ml = res
        self._dry = False
        self._estimate_ml = res + spec.initial_estimate_error_ml
        self._patient_ml = 0.0
        self._rotor_ul = 0.0
        self._sched_ul = 0.0
        self._valve_carry_ul = 0.0
        self._drift_ul_per_day = spec.sensor_drift_ul_per_day
        self._drift_base_ul = spec.sensor_drift_ul_per_day * spec.days_since_refill
        self._drift_since_s = start_s
        self._battery_pct = spec.initial_battery_pct
        self._eri_at_s: float | None = None
        self._eri_since: datetime | None = None
        self._eri_token = 0
        self._eos = False
        self._alarms: list[PumpAlarm] = []
        self._stalled_since: datetime | None = None
        self._stall_alarm = False
        self._scanning = False
        self._suspended = False
        self._suspend_token = 0
        self._mem_critical = False
        self._boluses: list[tuple[float, float]] = []
        self._patient_given_s: list[float] = []
        self._skew_s = 0.0
        self._silent_until_s = -math.inf
        self._windows: list[_Window] = []
        self._heap: list[tuple[float, int, Fault | _Later]] = []
        self._heap_n = 0
        for fault in faults:
            self.inject(fault)
        if spec.initial_battery_pct <= spec.eri_battery_pct:
            used = 1.0 - spec.initial_battery_pct / spec.eri_battery_pct
            self._set_eri(start_s - used * EOS_AFTER_ERI_DAYS * _DAY_S, replace=True)
        self._report_base_s = start_s + spec.report_offset_s
        self._report_k = 0
        self._next_report_s = self._report_base_s
        self._last_report_s = start_s
        self._next_refill_s = math.inf
        if spec.refill_interval_days is not None:
            due_days = max(0.0, spec.refill_interval_days - spec.days_since_refill)
            self._next_refill_s = start_s + due_days * _DAY_S
        self._next_press_s = math.inf
        if spec.patient_bolus_presses_per_day > 0:
            self._next_press_s = start_s + self._press_gap_s()
        self._rotor_ul_per_h = 0.0
        self._sched_ul_per_h = 0.0
        self._programmed_ul_per_h = 0.0
        self._out_ml_per_s = 0.0
        self._patient_ml_per_s = 0.0
        self._drain_pct_per_s = 0.0
        self._next_change_s = start_s

    # Public ---------------------------------------------------------------------------------

    def advance(self, until: datetime) -> list[Observation]:
        """Run the pump up to `until` (simulated true time, inclusive); return what it sent."""
        until_s = _to_s(until)
        if until_s < self._clock_s:
            raise ValueError(f"until {until.isoformat()} is before the pump's time {self.now}")
        out: list[Observation] = []
        if not self._started:
            self._start(out)
        while True:
            t = min(self._next_change_s, self._next_report_s)
            if t > until_s:
                break
            self._integrate(t)
            if self._next_change_s <= t:
                self._happen(out)
            if self._next_report_s <= t:
                self._report(out)
        self._clock_s = until_s
        return out

    def inject(self, fault: Fault) -> None:
        """Schedule a fault or clinical action at its `at` (not before the pump's time)."""
        at_s = _to_s(fault.at)
        if at_s < self._clock_s:
            raise ValueError(
                f"{type(fault).__name__} at {fault.at.isoformat()} is before the pump's time "
                f"{self.now.isoformat()}"
            )
        self._push(at_s, fault)
        if self._started:
            self._next_change_s = min(self._next_change_s, at_s)

    @property
    def pump_id(self) -> str:
        return self.spec.pump_id

    @property
    def reporting_interval_s(self) -> float:
        return float(self.spec.reporting_interval_s)

    @property
    def now(self) -> datetime:
        """Simulated true time the pump has been advanced to."""
        return _to_dt(self._clock_s)

    @property
    def reservoir_ml(self) -> float:
        """Ground truth: drug volume in the reservoir now."""
        dt = self._clock_s - self._now_s
        return max(0.0, self._reservoir_ml - self._out_ml_per_s * dt)

    @property
    def estimated_reservoir_ml(self) -> float:
        """Volume entered at the last refill minus rotor counts: what a calculated pump reports
        (drifts from the truth by the flow bias, a pocket fill, an occlusion or a leak)."""
        return self._estimate_ml - self._rotor_ul_per_h / 3.6e6 * (self._clock_s - self._now_s)

    @property
    def delivered_to_patient_ml(self) -> float:
        """Ground truth: drug that reached the spinal fluid since the start."""
        return self._patient_ml + self._patient_ml_per_s * (self._clock_s - self._now_s)

    @property
    def battery_pct(self) -> float:
        return self._battery_at(self._clock_s)

    @property
    def state(self) -> PumpState:
        return self._state()

    @property
    def alarms(self) -> tuple[PumpAlarm, ...]:
        return tuple(self._alarms)

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def concentration_mcg_per_ml(self) -> float:
        return self._conc

    # Time stepping --------------------------------------------------------------------------

    def _start(self, out: list[Observation]) -> None:
        self._started = True
        self._emit(out, "status", {"online": True, "reason": "pump started"})
        self._check_levels(out)
        self._recompute()
        self._next_change_s = min(self._next_change_s, self._now_s)

    def _integrate(self, t: float) -> None:
        """Move the state linearly to `t`; no change point lies in between."""
        dt = t - self._now_s
        if dt <= 0:
            return
        if self._rotor_ul_per_h > 0:
            rotor_ml = self._rotor_ul_per_h * dt / 3.6e6
            self._rotor_ul += rotor_ml * 1000.0
            self._estimate_ml -= rotor_ml
        if self._out_ml_per_s > 0:
            self._reservoir_ml = max(0.0, self._reservoir_ml - self._out_ml_per_s * dt)
        if self._patient_ml_per_s > 0:
            self._patient_ml += self._patient_ml_per_s * dt
        if self._sched_ul_per_h > 0:
            self._sched_ul += self._sched_ul_per_h * dt / 3600.0
        if self._eri_at_s is None:
            self._battery_pct = max(0.0, self._battery_pct - self._drain_pct_per_s * dt)
        self._now_s = t

    def _happen(self, out: list[Observation]) -> None:
        """Apply everything due now, then refresh rates and the next change point."""
        now = self._now_s
        while self._heap and self._heap[0][0] <= now + _EPS_S:
            _, _, item = heapq.heappop(self._heap)
            if callable(item):
                item(out)
            else:
                self._apply(item, out)
        if self._next_refill_s <= now + _EPS_S:
            self._next_refill_s = math.inf
            self._refill(out, None, None, 0.0, None)  # books the next visit
        if self._next_press_s <= now + _EPS_S:
            self._patient_press(out)
            self._next_press_s = now + self._press_gap_s()
        self._check_levels(out)
        self._recompute()

    def _recompute(self) -> None:
        now = self._now_s
        self._boluses = [b for b in self._boluses if b[0] > now + _EPS_S]
        sod, step_i = self._step_now()
        programmed = self._steps[step_i][1]
        self._programmed_ul_per_h = round(programmed, 3)
        asked = programmed
        for _, bolus_rate in self._boluses:
            asked += bolus_rate
        self._sched_ul_per_h = 0.0 if self._suspended or self._scanning else asked
        self._state_now = state = self._state()
        rotor = asked * self._rotor_factor if state is PumpState.INFUSING else 0.0
        self._rotor_ul_per_h = rotor
        moved = 0.0 if self._dry else rotor / 3.6e6 * (1 + self._bias) * self._partial
        self._out_ml_per_s = moved * self._outflow
        self._patient_ml_per_s = 0.0 if self._occluded else moved
        spec = self.spec
        flow_factor = rotor * 24 / 1000.0 / BATTERY_REFERENCE_FLOW_ML_PER_DAY
        share = spec.battery_flow_share
        per_s = 100.0 / (spec.battery_life_days * _DAY_S)
        self._drain_pct_per_s = 0.0 if self._eos else per_s * ((1 - share) + share * flow_factor)

        nxt = min(self._next_refill_s, self._next_press_s)
        if self._heap:
            nxt = min(nxt, self._heap[0][0])
        for end_s, _ in self._boluses:
            nxt = min(nxt, end_s)
        if len(self._steps) > 1:
            later = [s for s, _ in self._steps if s > sod + _EPS_S]
            nxt = min(nxt, now + ((later[0] if later else _DAY_S) - sod))
        # the pump's own alarms follow what it knows: its sensor, or its counts
        if self._measured:
            view, view_rate = self._reservoir_ml, self._out_ml_per_s
        else:
            view, view_rate = self._estimate_ml, rotor / 3.6e6
            if self._out_ml_per_s > 0:  # the true reservoir runs dry unnoticed
                nxt = min(nxt, now + self._reservoir_ml / self._out_ml_per_s)
        if view_rate > 0:
            if PumpAlarm.LOW_RESERVOIR not in self._alarms:
                nxt = min(nxt, now + (view - spec.low_reservoir_alarm_ml) / view_rate)
            if PumpAlarm.EMPTY_RESERVOIR not in self._alarms:
                nxt = min(nxt, now + view / view_rate)
        if self._eri_at_s is None:
            if self._drain_pct_per_s > 0:
                gap = (self._battery_pct - spec.eri_battery_pct) / self._drain_pct_per_s
                nxt = min(nxt, now + gap)
        elif not self._eos:
            nxt = min(nxt, self._eri_at_s + EOS_AFTER_ERI_DAYS * _DAY_S)
        self._next_change_s = max(nxt, now + _EPS_S) if nxt < math.inf else math.inf

    def _check_levels(self, out: list[Observation]) -> None:
        """Raise or clear the alarms that follow from volume and battery."""
        spec = self.spec
        if self._reservoir_ml <= _EPS_ML:
            self._reservoir_ml = 0.0
            self._dry = True
        else:
            self._dry = False
        if self._measured:
            view = self._reservoir_ml
        else:
            if self._estimate_ml <= _EPS_ML:
                self._estimate_ml = 0.0
            view = self._estimate_ml
        if view <= spec.low_reservoir_alarm_ml + _EPS_ML:
            self._raise(PumpAlarm.LOW_RESERVOIR, out)
        else:
            self._clear(PumpAlarm.LOW_RESERVOIR, out)
        if view <= _EPS_ML:
            self._raise(PumpAlarm.EMPTY_RESERVOIR, out)
        else:
            self._clear(PumpAlarm.EMPTY_RESERVOIR, out)
        if self._eri_at_s is None and self._battery_pct <= spec.eri_battery_pct + 1e-9:
            self._set_eri(self._now_s, replace=True)
        if self._eri_at_s is not None:
            self._raise(PumpAlarm.ERI, out)
            eos_s = self._eri_at_s + EOS_AFTER_ERI_DAYS * _DAY_S
            if not self._eos and self._now_s >= eos_s - _EPS_S:
                self._eos = True
                self._raise(PumpAlarm.EOS, out)

    def _state(self) -> PumpState:
        if self._eos or self._mem_critical or PumpAlarm.EMPTY_RESERVOIR in self._alarms:
            return PumpState.STOPPED
        if self._scanning or self._suspended:
            return PumpState.SUSPENDED
        if self._stalled_since is not None:
            return PumpState.STALLED
        return PumpState.INFUSING

    # What the pump knows ----------------------------------------------------------------------

    def _calculated_ml(self) -> float:
        """Entered volume minus counts; a valve pump counts whole strokes only."""
        if not self._valve:
            return self._estimate_ml
        pending = self._valve_carry_ul + self._rotor_ul
        uncounted = pending - math.floor(pending / VALVE_STROKE_UL + 1e-9) * VALVE_STROKE_UL
        return self._estimate_ml + uncounted / 1000.0

    def _drift_ul(self) -> float:
        days = (self._now_s - self._drift_since_s) / _DAY_S
        return self._drift_base_ul + self._drift_ul_per_day * days

    def _sensor_ml(self, true_ml: float) -> float:
        """One reading of the reservoir sensor: truth + noise + drift since it was zeroed."""
        sd = self.spec.sensor_noise_ul
        noise_ul = self._random().gauss(0.0, sd) if sd > 0 else 0.0
        return true_ml + (noise_ul + self._drift_ul()) / 1000.0

    def _reading_ml(self) -> float:
        """Telemetry's reservoir_ml: the sensor (measured) or the calculation, in [0, capacity]."""
        v = self._sensor_ml(self._reservoir_ml) if self._measured else self._calculated_ml()
        return round(min(self.spec.reservoir_capacity_ml, max(0.0, v)), 3)

    # Telemetry ------------------------------------------------------------------------------

    def _report(self, out: list[Observation]) -> None:
        t = self._next_report_s
        elapsed_h = (t - self._last_report_s) / 3600.0
        counted_ul = self._rotor_ul
        if self._valve:
            pending = self._valve_carry_ul + counted_ul
            counted_ul = math.floor(pending / VALVE_STROKE_UL + 1e-9) * VALVE_STROKE_UL
            self._valve_carry_ul = pending - counted_ul
        if elapsed_h > 0:
            delivered = counted_ul / elapsed_h
            scheduled = self._sched_ul / elapsed_h
        else:
            delivered, scheduled = self._rotor_ul_per_h, self._sched_ul_per_h
        self._rotor_ul = 0.0
        self._sched_ul = 0.0
        self._last_report_s = t
        self._report_k += 1
        self._next_report_s = self._report_base_s + self._report_k * self.spec.reporting_interval_s
        spec = self.spec
        cap = spec.reservoir_capacity_ml
        if self._measured or self._valve:
            volume = self._reading_ml()
        else:  # the common case inline: a calculated volume
            volume = self._estimate_ml
            volume = 0.0 if volume <= 0 else cap if volume >= cap else round(volume, 3)
        fields: dict[str, Any] = {
            "delivered_ul_per_h": round(delivered, 3),
            "programmed_rate_ul_per_h": self._programmed_ul_per_h,
            "programmed_dose_mcg_per_day": self._schedule.dose_mcg_per_day,
            "reservoir_ml": volume,
            "reservoir_capacity_ml": cap,
            "low_reservoir_alarm_ml": spec.low_reservoir_alarm_ml,
            "concentration_mcg_per_ml": self._conc,
            "battery_pct": round(self._battery_at(t), 1),
            "battery_eri": self._eri_at_s is not None,
            "pump_state": self._state_now,
            "alarms": tuple(self._alarms),
            "reservoir_source": self._source,
            "reporting_interval_s": spec.reporting_interval_s,
            "scheduled_ul_per_h": round(scheduled, 3),
        }
        if self._eri_since is not None:
            fields["eri_since"] = self._eri_since
        self._emit(out, "telemetry", fields)

    def _emit(self, out: list[Observation], kind: ObservationKind, fields: dict[str, Any]) -> None:
        now = self._now_s
        if now < self._silent_until_s:
            return
        duplicate, delay_s, lost = False, 0.0, False
        for _end, what, share, delay in self._windows:
            if self._random().random() < share:
                if what == "duplicate":
                    duplicate = True
                elif what == "out_of_order":
                    delay_s = delay
                else:
                    lost = True
        sim_time = _to_dt(now)
        device_time = _to_dt(now + self._skew_s) if self._skew_s else sim_time
        out.append(
            Observation(
                kind,
                device_time,
                fields,
                duplicate=duplicate,
                delay_s=delay_s,
                sim_time=sim_time,
                lost=lost,
            )
        )

    def _event(self, out: list[Observation], event: str, **fields: Any) -> None:
        fields["event"] = event
        self._emit(out, "event", fields)

    def _raise(self, alarm: PumpAlarm, out: list[Observation]) -> None:
        if alarm not in self._alarms:
            self._alarms.append(alarm)
            self._event(out, "alarm_raised", alarm=alarm)

    def _clear(self, alarm: PumpAlarm, out: list[Observation]) -> None:
        if alarm in self._alarms:
            self._alarms.remove(alarm)
            self._event(out, "alarm_cleared", alarm=alarm)

    # Faults and actions ---------------------------------------------------------------------

    def _push(self, at_s: float, item: Fault | _Later) -> None:
        self._heap_n += 1
        heapq.heappush(self._heap, (at_s, self._heap_n, item))

    def _later(self, hours: float, item: _Later) -> None:
        self._push(self._now_s + hours * 3600.0, item)

    def _apply(self, f: Fault, out: list[Observation]) -> None:
        match f:
            case MotorStallFault():
                self._stall(out)
                self._stall_alarm = True
                self._raise(PumpAlarm.MOTOR_STALL, out)
                if f.recover_after_h is not None:
                    self._later(f.recover_after_h, self._recover)
            case MriScan():
                self._event(out, "mri_start")
                self._scanning = True
                self._stall(out)
                recover_h, logged_h = f.recover_after_h, f.recovery_logged_after_h
                self._later(f.scan_min / 60.0, lambda o: self._mri_end(o, recover_h, logged_h))
            case OverInfusion() | UnderInfusion():
                self._bias = f.bias
            case CatheterOcclusion():
                self._occluded = True
                self._outflow = f.reservoir_outflow_fraction
            case RotorMismatch():
                self._rotor_factor = f.factor
            case PartialOcclusion():
                self._partial = f.flow_fraction
            case ClinicianSuspend():
                self._suspend(out, f.duration_h)
            case SensorDrift():
                self._drift_base_ul = self._drift_ul()
                self._drift_since_s = self._now_s
                self._drift_ul_per_day = f.drift_ul_per_day
            case RefillVisit():
                self._refill(
                    out, f.injected_ml, f.concentration_mcg_per_ml, 0.0, f.withdrawn_error_ml
                )
            case PocketFill():
                self._refill(out, f.injected_ml, None, f.pocket_ml, f.withdrawn_error_ml)
            case BatteryFault():
                dose = dose_mcg_per_day(f.reset_rate_ul_per_h, self._conc)
                self._reprogram(out, continuous_schedule(min(dose, 10_000.0)), session=False)
                self._raise(PumpAlarm.REDUCED_BATTERY_PERFORMANCE, out)
            case BatteryEri():
                if not self._eos:
                    days_used = EOS_AFTER_ERI_DAYS - f.days_to_eos
                    self._set_eri(self._now_s - days_used * _DAY_S, replace=False)
            case MemoryFault():
                alarm = (
                    PumpAlarm.CRITICAL_MEMORY_ERROR
                    if f.critical
                    else PumpAlarm.NONCRITICAL_MEMORY_ERROR
                )
                self._mem_critical = self._mem_critical or f.critical
                self._raise(alarm, out)
                if f.clear_after_h is not None:
                    self._later(f.clear_after_h, lambda o: self._memory_cleared(o, alarm))
            case TelemetrySilence():
                self._emit(out, "status", {"online": False, "reason": "telemetry silence"})
                end_s = self._now_s + f.duration_h * 3600.0
                self._silent_until_s = max(self._silent_until_s, end_s)
                self._later(f.duration_h, self._link_back)
            case ClockSkew():
                self._skew_s = f.offset_s
            case DuplicateDelivery():
                self._window(f.duration_h, "duplicate", f.share, 0.0)
            case OutOfOrderDelivery():
                self._window(f.duration_h, "out_of_order", f.share, f.delay_s)
            case MessageLoss():
                self._window(f.duration_h, "lost", f.share, 0.0)
            case ClinicianReprogram():
                new = f.schedule or scaled_schedule(self._schedule, f.dose_mcg_per_day or 0.0)
                self._reprogram(out, new, session=True)
            case ClinicianBolus():
                if self._state() is PumpState.INFUSING:
                    self._bolus(out, "clinician", f.dose_mcg, f.duration_min)
            case PatientBolusPress():
                self._patient_press(out)

    def _stall(self, out: list[Observation]) -> None:
        if self._stalled_since is None:
            self._stalled_since = _to_dt(self._now_s + self._skew_s)
            self._event(out, "motor_stall")

    def _recover(self, out: list[Observation], logged_after_h: float = 0.0) -> None:
        """The rotor turns again; the recovery is logged now or `logged_after_h` later."""
        since = self._stalled_since
        if since is not None:
            self._stalled_since = None
            if logged_after_h > 0:
                self._later(
                    logged_after_h,
                    lambda o: self._event(o, "motor_stall_recovery", stalled_since=since),
                )
            else:
                self._event(out, "motor_stall_recovery", stalled_since=since)
        if self._stall_alarm:
            self._stall_alarm = False
            self._clear(PumpAlarm.MOTOR_STALL, out)

    def _mri_end(
        self, out: list[Observation], recover_after_h: float | None, logged_after_h: float
    ) -> None:
        self._scanning = False
        self._event(out, "mri_end")
        if recover_after_h is not None:
            self._later(recover_after_h, lambda o: self._recover(o, logged_after_h))

    def _suspend(self, out: list[Observation], duration_h: float | None) -> None:
        self._suspend_token += 1
        if not self._suspended:
            self._suspended = True
            self._boluses = []  # a running bolus stops with the therapy
            self._event(out, "suspend")
        if duration_h is not None:
            token = self._suspend_token
            self._later(duration_h, lambda o: self._resume(o, token))

    def _resume(self, out: list[Observation], token: int) -> None:
        if self._suspended and token == self._suspend_token:  # not overtaken by a later suspend
            self._suspended = False
            self._event(out, "resume")

    def _set_eri(self, at_s: float, *, replace: bool) -> None:
        """ERI began at `at_s`; book the pump's replacement if the clinic replaces it."""
        self._eri_at_s = at_s
        self._eri_since = _to_dt(at_s + self._skew_s)
        self._eri_token += 1
        days = self.spec.battery_replacement_after_eri_days
        if replace and days is not None:
            token = self._eri_token
            due_s = max(self._now_s, at_s + days * _DAY_S)
            self._push(due_s, lambda o: self._replace_battery(o, token))

    def _replace_battery(self, out: list[Observation], token: int) -> None:
        """A new pump (same id and programme): full battery, ERI cleared."""
        if token != self._eri_token or self._eri_at_s is None or self._eos:
            return
        self._eri_at_s = None
        self._eri_since = None
        self._eri_token += 1
        self._battery_pct = 100.0
        self._clear(PumpAlarm.ERI, out)

    def _memory_cleared(self, out: list[Observation], alarm: PumpAlarm) -> None:
        if alarm is PumpAlarm.CRITICAL_MEMORY_ERROR:
            self._mem_critical = False
        self._clear(alarm, out)

    def _link_back(self, out: list[Observation]) -> None:
        if self._now_s < self._silent_until_s - _EPS_S:
            return  # a later, overlapping silence is still running
        self._silent_until_s = -math.inf
        self._emit(out, "status", {"online": True, "reason": "telemetry restored"})

    def _window(self, duration_h: float, what: str, share: float, delay_s: float) -> None:
        window = (self._now_s + duration_h * 3600.0, what, share, delay_s)
        self._windows.append(window)
        self._later(duration_h, lambda _o: self._windows.remove(window))

    def _reprogram(self, out: list[Observation], new: Schedule, *, session: bool) -> None:
        old = self._schedule
        self._schedule = new
        self._steps = self._step_table()
        self._event(
            out,
            "reprogram",
            old_schedule=old.model_dump(),
            new_schedule=new.model_dump(),
            session=session,
        )

    def _refill(
        self,
        out: list[Observation],
        injected_ml: float | None,
        concentration: float | None,
        pocket_ml: float,
        withdrawn_error_ml: float | None,
    ) -> None:
        """Withdraw the rest, inject new drug, book the next visit.

        The clinician's withdrawn reading carries `refill_entry_sd_ml` of error (clipped to
        +-3 SD). A calculated pump expects its estimate and takes the injected volume on trust
        (a pocket fill stays invisible until the reservoir runs dry early); a measured pump
        reports its sensor's readings before and after.
        """
        spec = self.spec
        cap = spec.reservoir_capacity_ml
        before = self._reservoir_ml
        expected = self._sensor_ml(before) if self._measured else self._calculated_ml()
        if before <= 0 and withdrawn_error_ml is None:
            withdrawn = 0.0  # nothing comes back up the needle
        else:
            error = withdrawn_error_ml
            if error is None:
                sd = spec.refill_entry_sd_ml
                error = max(-3 * sd, min(3 * sd, self._random().gauss(0.0, sd))) if sd else 0.0
            withdrawn = min(100.0, max(0.0, before + error))
        injected = min(cap, cap if injected_ml is None else injected_ml)
        if concentration is not None and concentration != self._conc:
            self._conc = concentration
            self._steps = self._step_table()
        self._reservoir_ml = max(0.0, injected - pocket_ml)
        self._dry = self._reservoir_ml <= _EPS_ML
        self._estimate_ml = injected
        self._drift_base_ul = 0.0  # the sensor is re-zeroed at the refill
        self._drift_since_s = self._now_s
        if self._measured:
            after = round(min(cap, max(0.0, self._sensor_ml(self._reservoir_ml))), 3)
            source, after_source = ReservoirSource.MEASURED, "measured"
        else:
            after = round(injected, 2)
            source, after_source = ReservoirSource.CALCULATED, "entered"
        self._event(
            out,
            "refill",
            expected_ml=round(min(100.0, max(0.0, expected)), 3),
            withdrawn_ml=round(withdrawn, 2),
            injected_ml=round(injected, 2),
            reservoir_after_ml=after,
            concentration_mcg_per_ml=self._conc,
            expected_source=source,
            reservoir_after_source=after_source,
        )
        self._book_refill(after)

    def _book_refill(self, reading_ml: float) -> None:
        """The clinic books the next routine visit from what the pump shows after the refill."""
        spec = self.spec
        if spec.refill_interval_days is None:
            return
        days = spec.refill_interval_days
        if spec.refill_margin_days is not None:
            worst = worst_case_flow_ml_per_day(spec, self._schedule.dose_mcg_per_day, self._conc)
            booked = booked_refill_days(
                reading_ml, spec.low_reservoir_alarm_ml, worst, spec.refill_margin_days
            )
            days = min(days, booked)
        self._next_refill_s = self._now_s + days * _DAY_S

    def _bolus(
        self, out: list[Observation], source: str, dose_mcg: float, duration_min: float
    ) -> None:
        volume_ul = dose_mcg / self._conc * 1000.0
        duration_min = max(duration_min, volume_ul / MAX_ROTOR_RATE_UL_PER_H * 60.0)
        self._boluses.append((self._now_s + duration_min * 60.0, volume_ul / (duration_min / 60)))
        self._event(out, "bolus", source=source, dose_mcg=dose_mcg, duration_min=duration_min)

    def _patient_press(self, out: list[Observation]) -> None:
        """Give a patient bolus unless disabled, not infusing, in lockout or past the daily max."""
        spec, now = self.spec, self._now_s
        given = [t for t in self._patient_given_s if t > now - _DAY_S]
        self._patient_given_s = given
        refused = (
            spec.patient_bolus_dose_mcg <= 0
            or self._state() is not PumpState.INFUSING
            or len(given) >= spec.patient_bolus_max_per_day
            or (bool(given) and now - given[-1] < spec.patient_bolus_lockout_min * 60.0)
        )
        if refused:
            self.patient_boluses_refused += 1
            return
        given.append(now)
        self._bolus(out, "patient", spec.patient_bolus_dose_mcg, spec.patient_bolus_duration_min)

    # Helpers --------------------------------------------------------------------------------

    def _random(self) -> random.Random:
        """This pump's generator, made on first use: most pumps never need one."""
        if self._rng is None:
            self._rng = random.Random(self.spec.seed)
        return self._rng

    def _press_gap_s(self) -> float:
        rate = self.spec.patient_bolus_presses_per_day
        return self._random().expovariate(rate) * _DAY_S if rate > 0 else math.inf

    def _step_table(self) -> tuple[tuple[float, float], ...]:
        """(start second of the local day, rate_ul_per_h) for each step of the schedule."""
        sched = self._schedule
        if sched.mode is DosingMode.CONTINUOUS:
            return ((0.0, rate_ul_per_h(sched.dose_mcg_per_day, self._conc)),)
        return tuple(
            (s.start_minute * 60.0, rate_ul_per_h(s.dose_mcg_per_day, self._conc))
            for s in sched.steps
        )

    def _step_now(self) -> tuple[float, int]:
        """Second of the local day and the index of the step running now."""
        sod = (self._now_s + self.spec.utc_offset_min * 60.0) % _DAY_S
        index = 0
        for i, (start, _) in enumerate(self._steps):
            if start <= sod + _EPS_S:
                index = i
        return sod, index

    def _battery_at(self, t: float) -> float:
        if self._eri_at_s is None:
            return max(0.0, self._battery_pct - self._drain_pct_per_s * (t - self._now_s))
        left = 1.0 - (t - self._eri_at_s) / (EOS_AFTER_ERI_DAYS * _DAY_S)
        return max(0.0, min(100.0, self.spec.eri_battery_pct * left))


if TYPE_CHECKING:  # mypy proves that the agent can drive a simulated pump

    def _pump_is_a_driver(pump: Pump) -> PumpDriver:
        return pump
