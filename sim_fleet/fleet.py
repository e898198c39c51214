"""A realistic fleet of pump specs from a seed, and stepping many pumps together.

Distributions follow domain.md: adults about 350 mcg/day (90-800, a few above 1000), children
60-277 (mean about 150), 20 or 40 mL, and the concentration a clinician would pick so refills
fall 1-6 months apart (usually 3-4). Every pump starts at a random point of its refill cycle,
with the estimate drift its own flow bias has built up since the last refill.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
import zlib
from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pumpfleet.contract import Schedule
from sim_fleet.model import (
    CONCENTRATIONS_MCG_PER_ML,
    Observation,
    Pump,
    PumpSpec,
    continuous_schedule,
    flex_schedule,
)

ROUTINE_REFILL_MARGIN_DAYS = 10.0
"""Clinics book the refill at least this long before the low-reservoir alarm (design choice);
with the 10 % safety factor below it keeps a healthy fleet clear of the 7-day refill-due rule."""


class FleetMix(BaseModel):
    """Proportions and spreads of a fleet; the defaults describe a typical clinic population."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    child_share: float = Field(default=0.15, ge=0, le=1)
    high_dose_share: float = Field(
        default=0.03, ge=0, le=1, description="Share of adults on more than 1000 mcg/day."
    )
    flex_share: float = Field(default=0.2, ge=0, le=1)
    high_risk_share: float = Field(
        default=0.1, ge=0, le=1, description="Patients with the 4 mL low-reservoir alarm."
    )
    reservoir_40ml_share: float = Field(default=0.6, ge=0, le=1)
    patient_bolus_share: float = Field(
        default=0.05, ge=0, le=1, description="Patients with a patient bolus device."
    )
    patient_bolus_presses_per_day: float = Field(default=1.0, ge=0, le=48)
    flow_bias_mean: float = Field(default=0.01, ge=-0.145, le=0.145)
    flow_bias_sd: float = Field(default=0.015, ge=0, le=0.145)
    flow_bias_max: float = Field(
        default=0.04,
        ge=0,
        le=0.145,
        description="Biases are clipped to +-this; above about 5 % routine refills would "
        "trip the refill-discrepancy rule.",
    )
    target_refill_days: tuple[float, float] = Field(
        default=(90.0, 120.0), description="Refill interval clinics aim for (3-4 months)."
    )
    clinics: int = Field(default=10, ge=1, le=10_000)
    reporting_interval_s: int = Field(default=600, ge=1, le=86_400)

    @model_validator(mode="after")
    def _target_ordered(self) -> FleetMix:
        low, high = self.target_refill_days
        if not 30 <= low <= high <= 180:
            raise ValueError("target_refill_days: must be [low, high] within 30-180 days")
        return self


def pump_id(index: int) -> str:
    """The id of the pump at a fleet index: 0 -> P-000001."""
    return f"P-{index + 1:06d}"


def routine_refill_days(capacity_ml: float, alarm_ml: float, flow_ml_per_day: float) -> float:
    """Days between routine refills: 90 % of the time to the alarm volume, less a margin, <= 180."""
    if flow_ml_per_day <= 0:
        return 180.0
    to_alarm = (capacity_ml - alarm_ml) / flow_ml_per_day
    return float(min(180, math.floor(0.9 * to_alarm - ROUTINE_REFILL_MARGIN_DAYS)))


def make_fleet(n: int, seed: int, mix: FleetMix | None = None) -> list[PumpSpec]:
    """`n` pump specs; the same seed gives the same fleet, and pump i does not depend on n."""
    if n < 0:
        raise ValueError("n: must be >= 0")
    mix = mix or FleetMix()
    rng = random.Random(seed)
    return [_make_pump(i, rng, mix) for i in range(n)]


def _make_pump(index: int, rng: random.Random, mix: FleetMix) -> PumpSpec:
    child = rng.random() < mix.child_share
    if child:
        dose = min(277.0, max(60.0, rng.gauss(150.0, 45.0)))
    elif rng.random() < mix.high_dose_share:
        dose = rng.uniform(1000.0, 1500.0)
    else:
        dose = min(800.0, max(90.0, rng.lognormvariate(math.log(330.0), 0.4)))
    dose = max(60.0, 5.0 * round(dose / 5.0))
    high_risk = rng.random() < mix.high_risk_share
    alarm_ml = 4.0 if high_risk else 2.0
    share_40 = mix.reservoir_40ml_share * (0.5 if child else 1.0)
    capacity = 40.0 if dose > 1000 or rng.random() < share_40 else 20.0
    target_days = rng.uniform(*mix.target_refill_days)
    concentration, interval = _pick_concentration(capacity, alarm_ml, dose, target_days)
    if interval < 30 and capacity < 40:
        capacity = 40.0
        concentration, interval = _pick_concentration(capacity, alarm_ml, dose, target_days)
    interval = max(7.0, interval)
    schedule = _flex(dose, rng) if rng.random() < mix.flex_share else continuous_schedule(dose)
    bias = rng.gauss(mix.flow_bias_mean, mix.flow_bias_sd)
    bias = max(-mix.flow_bias_max, min(mix.flow_bias_max, bias))
    flow = schedule.dose_mcg_per_day / concentration
    days_since = rng.uniform(0.0, interval)
    reservoir = max(0.0, capacity - days_since * flow * (1 + bias))
    battery_life = rng.uniform(5 * 365.0, 7 * 365.0)
    eri_pct = 100.0 * 90.0 / battery_life
    battery = rng.uniform(eri_pct + 3.0, 100.0)
    bolus = rng.random() < mix.patient_bolus_share
    bolus_dose = float(max(5, round(dose * rng.uniform(0.05, 0.15)))) if bolus else 0.0
    clinic = f"C-{rng.randrange(mix.clinics) + 1:02d}"
    offset = rng.randrange(mix.reporting_interval_s)
    return PumpSpec(
        pump_id=pump_id(index),
        reservoir_capacity_ml=capacity,
        concentration_mcg_per_ml=concentration,
        schedule=schedule,
        flow_bias=round(bias, 4),
        low_reservoir_alarm_ml=alarm_ml,
        high_risk=high_risk,
        clinic=clinic,
        reporting_interval_s=mix.reporting_interval_s,
        report_offset_s=offset,
        refill_interval_days=interval,
        days_since_refill=days_since,
        initial_reservoir_ml=reservoir,
        initial_estimate_error_ml=days_since * flow * bias,
        initial_battery_pct=battery,
        battery_life_days=battery_life,
        patient_bolus_dose_mcg=bolus_dose,
        patient_bolus_max_per_day=4 if bolus else 0,
        patient_bolus_lockout_min=180.0,
        patient_bolus_presses_per_day=mix.patient_bolus_presses_per_day if bolus else 0.0,
        seed=rng.getrandbits(63),
    )


def _pick_concentration(
    capacity_ml: float, alarm_ml: float, dose: float, target_days: float
) -> tuple[float, float]:
    """The concentration whose routine refill interval (>= 30 days) is nearest the target."""
    options = [
        (c, routine_refill_days(capacity_ml, alarm_ml, dose / c)) for c in CONCENTRATIONS_MCG_PER_ML
    ]
    usable = [o for o in options if o[1] >= 30]
    if not usable:
        return max(options, key=lambda o: o[1])
    return min(usable, key=lambda o: (abs(o[1] - target_days), o[0]))


def _flex(dose: float, rng: random.Random) -> Schedule:
    """2-4 steps a day with relative rates 0.7-1.5, scaled so the day totals about `dose`."""
    k = rng.choice((2, 3, 4))
    starts = [0, *sorted(rng.sample(range(1, 24), k - 1))]
    weights = [rng.uniform(0.7, 1.5) for _ in starts]
    ends = [*starts[1:], 24]
    mean = sum(w * (e - s) for w, s, e in zip(weights, starts, ends, strict=True)) / 24
    return flex_schedule(
        (s * 60, round(dose * w / mean, 1)) for s, w in zip(starts, weights, strict=True)
    )


def advance_fleet(pumps: Iterable[Pump], until: datetime) -> list[tuple[str, Observation]]:
    """Advance every pump to `until`; (pump_id, observation) pairs in simulated-time order."""
    streams = [[(o.sim_time, p.spec.pump_id, o) for o in p.advance(until)] for p in pumps]
    return [(pid, obs) for _, pid, obs in heapq.merge(*streams, key=lambda x: x[0])]


def agent_driver(pump_id: str, *, start: datetime, reporting_interval_s: float = 600.0) -> Pump:
    """A realistic pump for the device agent: `pumpfleet agent --driver sim_fleet:agent_driver`.

    Drawn from the default fleet mix with a seed taken from the pump id, so the same id always
    gets the same pump.
    """
    spec = make_fleet(1, zlib.crc32(pump_id.encode()))[0]
    interval = max(1, round(reporting_interval_s))
    spec = dataclasses.replace(
        spec, pump_id=pump_id, reporting_interval_s=interval, report_offset_s=0
    )
    return Pump(spec, start)
