"""A realistic fleet of pump specs from a seed, and stepping many pumps together.

Distributions follow domain.md: adults about 350 mcg/day (90-800, a few above 1000), children
60-277 (mean about 150), 20 or 40 mL, and the concentration a clinician would pick so refills
fall 1-6 months apart (usually 3-4). Most pumps calculate their volume (rotor counts), a share
measure it with a sensor. Flow biases spread over the labelled +-14.5 %. Every pump starts at a
random point of its refill cycle, with the estimate drift its own flow bias has built up since
the last refill; clinics book each refill from use (`refill_margin_days`), so a healthy pump
never reaches refill-due or its low-reservoir alarm, and replace a pump 30-60 days after ERI,
so none reaches EOS.
"""

from __future__ import annotations

import dataclasses
import math
import random
import zlib
from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pumpfleet.contract import Schedule
from sim_fleet._model import (
    CONCENTRATIONS_MCG_PER_ML,
    LABELLED_FLOW_ACCURACY,
    Observation,
    Pump,
    PumpFamily,
    PumpSpec,
    booked_refill_days,
    continuous_schedule,
    flex_schedule,
    worst_case_flow_ml_per_day,
)

ROUTINE_REFILL_MARGIN_DAYS = 10.0
"""Clinics book the refill at least this long before the low-reservoir alarm (design choice).
The booking assumes the worst-case flow, (programmed + mean patient boluses) x 1.145, so even
a pump at the edge of the labelled accuracy is refilled more than 7 days before a refill-due
rule with a 14.5 % margin would call it (`refill_margin_days`)."""


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
    flow_bias_sd: float = Field(default=0.05, ge=0, le=0.145)
    flow_bias_max: float = Field(
        default=0.14,
        ge=0,
        le=0.145,
        description="Biases are clipped to +-this: within the labelled +-14.5 %. At a routine "
        "refill a pump's expected - withdrawn is its bias x the volume infused since the last "
        "refill (up to about 5 mL on a 40 mL pump), within specification.",
    )
    measured_share: float = Field(
        default=0.3, ge=0, le=1, description="Pumps (or bridges) with a reservoir sensor."
    )
    valve_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Prometra-like valve pumps (calculated volume, delivery in 2 uL strokes, so "
        "a 10-minute interval at a low rate can count no stroke at all); taken from the "
        "calculated rest.",
    )
    sensor_noise_ul: tuple[float, float] = Field(
        default=(1.0, 5.0), description="Range of the measured pumps' sensor noise SD (uL)."
    )
    refill_entry_sd_ml: float = Field(
        default=0.3, ge=0, le=5, description="SD of the clinician's withdrawn-volume reading."
    )
    refill_margin_days: float = Field(default=ROUTINE_REFILL_MARGIN_DAYS, ge=0, le=60)
    battery_replacement_after_eri_days: tuple[float, float] = Field(
        default=(30.0, 60.0), description="Range of the delay from ERI to the pump's replacement."
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
        low, high = self.sensor_noise_ul
        if not 0 <= low <= high <= 1000:
            raise ValueError("sensor_noise_ul: must be [low, high] within 0-1000 uL")
        low, high = self.battery_replacement_after_eri_days
        if not 0 <= low <= high < 90:
            raise ValueError(
                "battery_replacement_after_eri_days: must be [low, high] within 0-90 days"
            )
        if self.measured_share + self.valve_share > 1:
            raise ValueError("measured_share + valve_share: must be at most 1")
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
    bolus = rng.random() < mix.patient_bolus_share
    bolus_dose = float(max(5, round(dose * rng.uniform(0.05, 0.15)))) if bolus else 0.0
    presses = mix.patient_bolus_presses_per_day if bolus else 0.0
    # what the clinic books against: programme + the mean boluses (cf. worst_case_flow_ml_per_day)
    daily_mcg = dose + bolus_dose * min(presses, _BOLUS_MAX_PER_DAY, 24 * 60 / _BOLUS_LOCKOUT_MIN)

    def choose(capacity: float) -> tuple[float, float]:
        return _pick_concentration(
            capacity, alarm_ml, dose, target_days, daily_mcg, mix.refill_margin_days
        )

    concentration, interval = choose(capacity)
    if interval < 30 and capacity < 40:
        capacity = 40.0
        concentration, interval = choose(capacity)
    schedule = _flex(dose, rng) if rng.random() < mix.flex_share else continuous_schedule(dose)
    bias = rng.gauss(mix.flow_bias_mean, mix.flow_bias_sd)
    bias = round(max(-mix.flow_bias_max, min(mix.flow_bias_max, bias)), 4)
    flow = schedule.dose_mcg_per_day / concentration
    battery_life = rng.uniform(5 * 365.0, 7 * 365.0)
    eri_pct = 100.0 * 90.0 / battery_life
    battery = rng.uniform(eri_pct + 3.0, 100.0)  # any age: some reach ERI within a year
    clinic = f"C-{rng.randrange(mix.clinics) + 1:02d}"
    offset = rng.randrange(mix.reporting_interval_s)
    pick = rng.random()
    family: PumpFamily = "calculated"
    if pick < mix.measured_share:
        family = "measured"
    elif pick < mix.measured_share + mix.valve_share:
        family = "valve"
    noise = rng.uniform(*mix.sensor_noise_ul) if family == "measured" else 0.0
    replacement = rng.uniform(*mix.battery_replacement_after_eri_days)
    spec = PumpSpec(
        pump_id=pump_id(index),
        reservoir_capacity_ml=capacity,
        concentration_mcg_per_ml=concentration,
        schedule=schedule,
        flow_bias=bias,
        family=family,
        sensor_noise_ul=round(noise, 2),
        low_reservoir_alarm_ml=alarm_ml,
        high_risk=high_risk,
        clinic=clinic,
        reporting_interval_s=mix.reporting_interval_s,
        report_offset_s=offset,
        initial_battery_pct=battery,
        battery_life_days=battery_life,
        battery_replacement_after_eri_days=round(replacement, 2),
        refill_entry_sd_ml=mix.refill_entry_sd_ml,
        patient_bolus_dose_mcg=bolus_dose,
        patient_bolus_max_per_day=_BOLUS_MAX_PER_DAY if bolus else 0,
        patient_bolus_lockout_min=_BOLUS_LOCKOUT_MIN,
        patient_bolus_presses_per_day=presses,
        seed=rng.getrandbits(63),
    )
    # The visit the clinic booked at the last refill (to capacity): from use, at most the aim.
    worst = worst_case_flow_ml_per_day(spec)
    booked = booked_refill_days(capacity, alarm_ml, worst, mix.refill_margin_days)
    interval = max(7.0, float(math.floor(min(interval, booked))))
    days_since = rng.uniform(0.0, interval)
    return dataclasses.replace(
        spec,
        refill_interval_days=interval,
        refill_margin_days=mix.refill_margin_days,
        days_since_refill=days_since,
        initial_reservoir_ml=max(0.0, capacity - days_since * flow * (1 + bias)),
        initial_estimate_error_ml=days_since * flow * bias,
    )


_BOLUS_LOCKOUT_MIN = 180.0
_BOLUS_MAX_PER_DAY = 4


def _pick_concentration(
    capacity_ml: float,
    alarm_ml: float,
    dose: float,
    target_days: float,
    daily_mcg: float,
    margin_days: float,
) -> tuple[float, float]:
    """The concentration whose refill interval (>= 30 days) is nearest the target: the routine
    interval, or sooner if the booking from use (with boluses, at the worst-case flow) says so."""

    def interval(c: float) -> float:
        worst = daily_mcg / c * (1 + LABELLED_FLOW_ACCURACY)
        booked = booked_refill_days(capacity_ml, alarm_ml, worst, margin_days)
        return min(routine_refill_days(capacity_ml, alarm_ml, dose / c), math.floor(booked))

    options = [(c, interval(c)) for c in CONCENTRATIONS_MCG_PER_ML]
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
    merged = [(p.spec.pump_id, o) for p in pumps for o in p.advance(until)]
    # A stable sort of the concatenated streams orders ties by pump, then by stream: what a
    # k-way merge gives, at a third of heapq.merge's cost (Timsort merges the sorted runs).
    merged.sort(key=_sim_time)
    return merged


def _sim_time(item: tuple[str, Observation]) -> datetime:
    return item[1].sim_time


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
