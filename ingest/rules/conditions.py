"""The rules' verdicts as pure functions of plain figures: what each rule decides, alone.

The engine (engine.py) keeps per-pump state and hysteresis and calls these; tests call them
directly. A verdict is the raw condition at one moment: a priority, or None when it does not hold.
"""

from __future__ import annotations

import math
from typing import Literal

from ingest.findings import Priority
from ingest.rules.thresholds import PumpProfile, Thresholds
from pumpfleet.contract import PumpState

Trend = Literal["over", "under", "ok"]


def trend_verdict(drop_ul: float, rotor_ul: float, accuracy: float, resolution_ul: float) -> Trend:
    """Reservoir drop against the rotor's own count over one window.

    The rotor count already holds boluses and flex steps, so outside the labelled accuracy (plus
    one reading's resolution at each end) the drug went somewhere the rotor did not send it, or
    the rotor turned and the drug did not leave: over- or under-infusion.
    """
    if drop_ul > rotor_ul * (1.0 + accuracy) + resolution_ul:
        return "over"
    if drop_ul < rotor_ul * (1.0 - accuracy) - resolution_ul:
        return "under"
    return "ok"


def no_delivery(
    delivered_ul_per_h: float, programmed_rate_ul_per_h: float, pump_state: PumpState
) -> bool:
    """The rotor did not turn although the schedule says it should (a suspension is on purpose)."""
    return (
        delivered_ul_per_h <= 0.0
        and programmed_rate_ul_per_h > 0.0
        and pump_state is not PumpState.SUSPENDED
    )


def pocket_fill_limit_ml(capacity_ml: float | None, injected_ml: float, th: Thresholds) -> float:
    """1 mL for a 20 mL pump, 2 mL for a 40 mL one; an unknown size is guessed from the
    injection (more than fits a small pump means a large one), else the stricter limit."""
    if capacity_ml is None:
        capacity_ml = math.inf if injected_ml > th.small_reservoir_max_ml else 0.0
    return (
        th.pocket_fill_small_ml
        if capacity_ml <= th.small_reservoir_max_ml
        else (th.pocket_fill_large_ml)
    )


def pocket_fill(injected_ml: float, reservoir_after_ml: float, limit_ml: float) -> bool:
    """Drug injected that the reservoir does not hold went beside the pump."""
    return injected_ml - reservoir_after_ml > limit_ml


def refill_discrepant(
    expected_ml: float, withdrawn_ml: float, infused_ml: float | None, th: Thresholds
) -> bool:
    """Expected minus withdrawn beyond 2 mL, or beyond 14.5 % of what was infused since the
    previous refill (known only if that refill was seen), with a floor for reading noise."""
    gap_ml = abs(expected_ml - withdrawn_ml)
    if gap_ml > th.refill_discrepancy_ml:
        return True
    if infused_ml is None or infused_ml <= 0:
        return False
    return gap_ml > max(th.refill_discrepancy_floor_ml, th.refill_discrepancy_fraction * infused_ml)


def days_to_alarm(reservoir_ml: float, alarm_ml: float, daily_ml: float) -> float | None:
    """Days until the reservoir reaches the alarm volume at `daily_ml`; None if it never does."""
    if daily_ml <= 0:
        return None
    return (reservoir_ml - alarm_ml) / daily_ml


def refill_due_priority(
    days: float | None, current: Priority | None, th: Thresholds
) -> Priority | None:
    """High within 3 days, medium within 7; an open alert keeps its level for a margin beyond
    the limit so a projection wobbling around it does not flap."""
    if days is None:
        return None
    margin = th.refill_due_clear_margin_days
    high = th.refill_due_high_priority
    medium = th.refill_due_medium_priority
    if days <= th.refill_due_high_days or (
        current == high and days <= th.refill_due_high_days + margin
    ):
        return high
    if days <= th.refill_due_medium_days or (
        current is not None and days <= th.refill_due_medium_days + margin
    ):
        return medium
    return None


def days_to_eos(eri_since_s: float | None, now_s: float, th: Thresholds) -> float | None:
    """Days left before EOS, if ERI was seen to begin (None: it began before monitoring)."""
    if eri_since_s is None:
        return None
    return th.eos_after_eri_days - (now_s - eri_since_s) / 86_400.0


def battery_priority(
    eri: bool, eos: bool, days_left: float | None, th: Thresholds
) -> Priority | None:
    """ERI medium; 14 days or less to EOS, or EOS reached, high."""
    if eos or (eri and days_left is not None and days_left <= th.battery_high_days_to_eos):
        return th.battery_eos_priority
    if eri:
        return th.battery_eri_priority
    return None


def dose_change_fraction(old_mcg_per_day: float, new_mcg_per_day: float) -> float:
    """Relative change of the programmed daily dose; from 0 to anything is infinite."""
    if old_mcg_per_day <= 0:
        return 0.0 if new_mcg_per_day <= 0 else math.inf
    return abs(new_mcg_per_day - old_mcg_per_day) / old_mcg_per_day


def silence_priority(silent_s: float, interval_s: float, th: Thresholds) -> Priority | None:
    """Low after 3 reporting intervals (plus transport slack) without a message, medium after
    24 h."""
    if silent_s >= th.silence_medium_s:
        return th.silence_medium_priority
    if silent_s >= th.silence_low_intervals * interval_s + th.silence_slack_s:
        return th.silence_low_priority
    return None


def effective_alarm_ml(
    reported_ml: float | None, profile: PumpProfile | None, th: Thresholds
) -> float | None:
    """The volume the low-reservoir and refill-due rules use: the profile's, else the
    thresholds', but never below the pump's own programmed alarm (a registry default of 2 mL must
    not hide a pump set to 4 mL); at least 4 mL for a high-risk patient."""
    configured = th.low_reservoir_alarm_ml
    if profile is not None and profile.low_reservoir_alarm_ml is not None:
        configured = profile.low_reservoir_alarm_ml
    if configured is None:
        alarm_ml = reported_ml
    elif reported_ml is None:
        alarm_ml = configured
    else:
        alarm_ml = max(configured, reported_ml)
    if profile is not None and profile.high_risk:
        alarm_ml = max(alarm_ml or 0.0, th.high_risk_low_reservoir_ml)
    return alarm_ml


def low_reservoir(reservoir_ml: float, alarm_ml: float, active: bool, th: Thresholds) -> bool:
    """At or below the alarm volume; an open alert ends only above it plus a margin."""
    limit_ml = alarm_ml + (th.low_reservoir_clear_margin_ml if active else 0.0)
    return reservoir_ml <= limit_ml + 1e-9
