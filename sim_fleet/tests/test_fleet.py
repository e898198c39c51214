"""Fleet generation: realistic distributions, determinism, a healthy starting point, low cost."""

from __future__ import annotations

import statistics
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest

from pumpfleet.contract import DosingMode
from sim_fleet import (
    FleetMix,
    Pump,
    PumpSpec,
    advance_fleet,
    flex_daily_dose_mcg,
    make_fleet,
    routine_refill_days,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
FLEET = make_fleet(5000, 11)


def doses(specs: list[PumpSpec]) -> list[float]:
    return [s.schedule.dose_mcg_per_day for s in specs]


def test_adult_doses_centre_near_350_within_90_to_800() -> None:
    adults = doses(make_fleet(3000, 2, FleetMix(child_share=0.0, high_dose_share=0.0)))
    assert 320 <= statistics.mean(adults) <= 380
    assert min(adults) >= 89 and max(adults) <= 801


def test_child_doses_are_60_to_277_mean_near_150() -> None:
    children = doses(make_fleet(3000, 2, FleetMix(child_share=1.0)))
    assert min(children) >= 59 and max(children) <= 278
    assert 140 <= statistics.mean(children) <= 160


def test_some_adults_exceed_1000_mcg_per_day_on_40_ml_pumps() -> None:
    high = [s for s in FLEET if s.schedule.dose_mcg_per_day > 1000]
    assert 0.01 * len(FLEET) <= len(high) <= 0.05 * len(FLEET)
    assert {s.reservoir_capacity_ml for s in high} == {40.0}


def test_reservoirs_concentrations_and_refill_intervals() -> None:
    assert {s.reservoir_capacity_ml for s in FLEET} == {20.0, 40.0}
    assert {s.concentration_mcg_per_ml for s in FLEET} == {500.0, 1000.0, 2000.0}
    intervals = [s.refill_interval_days or 0 for s in FLEET]
    assert min(intervals) >= 30 and max(intervals) <= 180  # 1 to 6 months
    usual = sum(60 <= d <= 150 for d in intervals) / len(intervals)
    assert usual > 0.7, f"only {usual:.0%} of refills 2-5 months apart"


def test_about_a_fifth_flex_with_steps_that_total_the_daily_dose() -> None:
    flex = [s for s in FLEET if s.schedule.mode is DosingMode.FLEX]
    assert 0.17 <= len(flex) / len(FLEET) <= 0.23
    for s in flex:
        assert 2 <= len(s.schedule.steps) <= 13
        assert flex_daily_dose_mcg(s.schedule.steps) == pytest.approx(s.schedule.dose_mcg_per_day)


def test_high_risk_patients_have_the_4_ml_alarm() -> None:
    assert all((s.low_reservoir_alarm_ml == 4.0) == s.high_risk for s in FLEET)
    assert 0.07 <= sum(s.high_risk for s in FLEET) / len(FLEET) <= 0.13


def test_flow_bias_spreads_over_the_labelled_range() -> None:
    """Each pump keeps its own bias: normal, mean +1 % (the field), SD 5 %, clipped at +-14 %
    so every pump stays within the labelled +-14.5 %; a fleet holds pumps near both edges."""
    biases = [s.flow_bias for s in FLEET]
    assert max(abs(b) for b in biases) <= 0.14
    assert 0.005 <= statistics.mean(biases) <= 0.015
    assert 0.045 <= statistics.pstdev(biases) <= 0.055
    beyond = sum(abs(b) > 0.08 for b in biases) / len(biases)
    assert 0.08 <= beyond <= 0.16, f"{beyond:.1%} of pumps beyond +-8 %"  # normal: about 12 %
    assert any(b > 0.08 for b in biases) and any(b < -0.08 for b in biases)
    clipped = sum(abs(b) == 0.14 for b in biases)
    assert 0 < clipped <= 0.02 * len(biases)  # normal: about 0.6 % reach the clip


def test_every_pump_starts_healthy_and_its_routine_refill_comes_before_refill_due() -> None:
    for s in FLEET:
        assert s.initial_reservoir_ml is not None
        interval = s.refill_interval_days or 0
        flow = s.flow_ml_per_day
        true_flow = flow * (1 + s.flow_bias)
        left_at_refill = s.initial_reservoir_ml - (interval - s.days_since_refill) * true_flow
        # projected from the programmed schedule, the alarm volume is still more than 7 days off
        assert (left_at_refill - s.low_reservoir_alarm_ml) / flow > 7, s.pump_id
        assert s.initial_battery_pct > s.eri_battery_pct + 2.9


def test_routine_refill_interval_keeps_a_margin() -> None:
    # 40 mL, 2 mL alarm, 0.25 mL/day: 152 days to the alarm -> 0.9 x 152 - 10 = 126
    assert routine_refill_days(40, 2, 0.25) == 126
    assert routine_refill_days(40, 2, 0.1) == 180  # capped at six months


def test_ids_and_determinism() -> None:
    assert [s.pump_id for s in FLEET[:3]] == ["P-000001", "P-000002", "P-000003"]
    assert make_fleet(50, 11) == FLEET[:50]  # pump i does not depend on n
    assert make_fleet(50, 12) != FLEET[:50]
    assert len({s.seed for s in FLEET}) == len(FLEET)


def test_clinics_and_report_offsets_spread_the_load() -> None:
    assert len({s.clinic for s in FLEET}) == 10
    offsets = [s.report_offset_s for s in FLEET]
    assert min(offsets) >= 0 and max(offsets) < 600 and len(set(offsets)) > 500


def test_advance_fleet_merges_pumps_in_simulated_time_order() -> None:
    pumps = [Pump(s, START) for s in make_fleet(30, 4)]
    merged = advance_fleet(pumps, START + timedelta(hours=3))
    times = [o.sim_time for _, o in merged]
    assert times == sorted(times)
    assert {pid for pid, _ in merged} == {p.spec.pump_id for p in pumps}
    assert len(merged) >= 30 * 18


def test_a_pump_costs_little_memory() -> None:
    specs = make_fleet(2000, 5)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    pumps = [Pump(s, START) for s in specs]
    for p in pumps:
        p.advance(START + timedelta(hours=1))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_pump = sum(d.size_diff for d in after.compare_to(before, "filename")) / len(pumps)
    print(f"\nabout {per_pump:.0f} bytes per pump")
    assert per_pump < 4000  # a random.Random alone is 2.5 kB: made only when a pump needs one
