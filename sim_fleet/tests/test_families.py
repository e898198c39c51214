"""What a real pump can report: calculated vs measured volumes, counts vs truth, the new faults.

Hand calculations use the 40 mL pump of test_model.spec(): 500 mcg/day at 2000 mcg/mL =
0.25 mL/day = 10.417 uL/h, full at the start.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from pumpfleet import contract
from pumpfleet.contract import PumpAlarm, PumpState, ReservoirSource
from sim_fleet import (
    VALVE_STROKE_UL,
    BatteryEri,
    CatheterOcclusion,
    ClinicianBolus,
    ClinicianSuspend,
    Fault,
    MemoryFault,
    MriScan,
    Observation,
    OverInfusion,
    PartialOcclusion,
    PatientBolusPress,
    PocketFill,
    Pump,
    PumpSpec,
    RefillVisit,
    RotorMismatch,
    SensorDrift,
    UnderInfusion,
    booked_refill_days,
    flex_schedule,
    parse_scenario,
    rate_ul_per_h,
    worst_case_flow_ml_per_day,
)
from sim_fleet.tests.test_model import FAULT_AT, START, D, H, at_time, events, spec, telemetry

RATE = rate_ul_per_h(500, 2000)  # 10.4167 uL/h
M = timedelta(minutes=1)


def interval_ul(o: Observation, prev: Observation, field: str) -> float:
    return float(o.fields[field]) * (o.sim_time - prev.sim_time).total_seconds() / 3600


def alarms_raised(obs: Sequence[Observation]) -> list[PumpAlarm]:
    return [o.fields["alarm"] for o in events(obs, "alarm_raised")]


# Calculated family: the reservoir is the pump's arithmetic ---------------------------------


TRUE_AFTER_A_DAY = [
    # fault at 6 h; then 0.1875 mL of rotor flow in the remaining 18 h
    (OverInfusion(FAULT_AT, bias=0.25), 40 - 0.0625 - 0.1875 * 1.25, 0.0625 + 0.1875 * 1.25),
    (UnderInfusion(FAULT_AT, bias=-0.30), 40 - 0.0625 - 0.1875 * 0.7, 0.0625 + 0.1875 * 0.7),
    (CatheterOcclusion(FAULT_AT, 0.0), 40 - 0.0625, 0.0625),
    (CatheterOcclusion(FAULT_AT, 1.0), 40 - 0.25, 0.0625),
    (PartialOcclusion(FAULT_AT, flow_fraction=0.5), 40 - 0.0625 - 0.09375, 0.0625 + 0.09375),
    (PartialOcclusion(FAULT_AT, flow_fraction=0.2), 40 - 0.0625 - 0.0375, 0.0625 + 0.0375),
]


@pytest.mark.parametrize(("fault", "true_ml", "patient_ml"), TRUE_AFTER_A_DAY)
def test_calculated_reservoir_falls_exactly_by_the_rotor_counts_whatever_the_truth(
    fault: Fault, true_ml: float, patient_ml: float
) -> None:
    pump = Pump(spec(), START, [fault])
    obs = telemetry(pump.advance(START + D))
    # every reading is 40 mL minus the rotor counts reported so far, to the microlitre
    counted_ul = 0.0
    for prev, o in itertools.pairwise(obs):
        counted_ul += interval_ul(o, prev, "delivered_ul_per_h")
        assert o.fields["reservoir_ml"] == pytest.approx(40 - counted_ul / 1000, abs=2e-3)
        assert o.fields["delivered_ul_per_h"] == o.fields["scheduled_ul_per_h"]
        assert o.fields["reservoir_source"] is ReservoirSource.CALCULATED
    assert obs[-1].fields["reservoir_ml"] == 39.75  # as programmed
    assert pump.estimated_reservoir_ml == pytest.approx(39.75)
    assert pump.reservoir_ml == pytest.approx(true_ml, abs=1e-9)  # the truth differs
    assert pump.delivered_to_patient_ml == pytest.approx(patient_ml, abs=1e-9)


@pytest.mark.parametrize(("fault", "true_ml", "patient_ml"), TRUE_AFTER_A_DAY)
def test_measured_reservoir_shows_the_truth(
    fault: Fault, true_ml: float, patient_ml: float
) -> None:
    pump = Pump(spec(family="measured", sensor_noise_ul=0.0), START, [fault])
    last = telemetry(pump.advance(START + D))[-1].fields
    assert last["reservoir_source"] is ReservoirSource.MEASURED
    assert last["reservoir_ml"] == pytest.approx(true_ml, abs=6e-4)  # rounded to 1 uL
    assert last["delivered_ul_per_h"] == pytest.approx(RATE, abs=1e-3)  # counts look normal


# Measured family: noise and drift of the sensor --------------------------------------------


def test_measured_noise_has_the_configured_sd_and_no_bias() -> None:
    pump = Pump(spec(family="measured", sensor_noise_ul=4.0, seed=9), START)
    obs = telemetry(pump.advance(START + 5 * D))
    residual_ul = [
        (o.fields["reservoir_ml"] - (40 - 0.25 * (o.sim_time - START) / D)) * 1000
        for o in obs
        if o.fields["reservoir_ml"] < 40  # readings at the start are clipped at capacity
    ]
    assert len(residual_ul) > 700
    assert statistics.stdev(residual_ul) == pytest.approx(4.0, rel=0.1)
    assert abs(statistics.mean(residual_ul)) < 0.6  # 4 SE
    assert max(abs(r) for r in residual_ul) > 8  # noise, not a rounding artefact


def test_sensor_drift_grows_from_the_refill_and_is_rezeroed_at_the_next() -> None:
    s = spec(family="measured", sensor_noise_ul=0.0, sensor_drift_ul_per_day=40.0)
    s = dataclasses.replace(s, days_since_refill=5.0, initial_reservoir_ml=38.75)
    pump = Pump(s, START, [RefillVisit(START + 3 * D)])
    obs = pump.advance(START + 4 * D)
    offset = [
        (o.sim_time, o.fields["reservoir_ml"] - (38.75 - 0.25 * (o.sim_time - START) / D))
        for o in telemetry(obs)
        if o.sim_time < START + 3 * D
    ]
    assert offset[0][1] == pytest.approx(0.200, abs=1e-3)  # 5 days since the refill x 40 uL
    assert offset[-1][1] == pytest.approx(0.200 + 0.040 * (3 - 1 / 144), abs=1e-3)
    (refill,) = events(obs, "refill")
    assert refill.fields["expected_ml"] == pytest.approx(38.75 - 0.75 + 0.32, abs=1e-3)
    assert refill.fields["reservoir_after_ml"] == 40.0  # re-zeroed: the truth
    assert refill.fields["expected_source"] is ReservoirSource.MEASURED
    assert refill.fields["reservoir_after_source"] == "measured"
    day_later = at_time(obs, START + 4 * D)["reservoir_ml"]
    assert day_later == pytest.approx(40 - 0.25 + 0.040, abs=1e-3)


def test_sensor_drift_fault_starts_at_its_time_and_a_calculated_pump_ignores_it() -> None:
    s = spec(family="measured", sensor_noise_ul=0.0)
    obs = Pump(s, START, [SensorDrift(START + D, drift_ul_per_day=-100.0)]).advance(START + 3 * D)
    assert at_time(obs, START + D)["reservoir_ml"] == pytest.approx(39.75, abs=1e-3)
    assert at_time(obs, START + 3 * D)["reservoir_ml"] == pytest.approx(39.25 - 0.2, abs=1e-3)
    calc = spec()
    base = Pump(calc, START).advance(START + 3 * D)
    assert Pump(calc, START, [SensorDrift(START + D, 100.0)]).advance(START + 3 * D) == base


# Rotor mismatch and partial occlusion --------------------------------------------------------


@pytest.mark.parametrize("factor", [0.01, 0.5, 1.3, 2.0])
def test_rotor_mismatch_counts_factor_times_the_programme(factor: float) -> None:
    s = spec(flow_bias=0.1, family="calculated")
    pump = Pump(s, START, [RotorMismatch(FAULT_AT, factor=factor)])
    obs = telemetry(pump.advance(START + D))
    after = [o.fields for o in obs if o.sim_time > FAULT_AT]
    for f in after:
        assert f["scheduled_ul_per_h"] == pytest.approx(RATE, abs=1e-3)
        assert f["delivered_ul_per_h"] == pytest.approx(factor * f["scheduled_ul_per_h"], abs=2e-3)
        assert f["pump_state"] is PumpState.INFUSING and f["alarms"] == ()
    rotor_ml = 0.0625 + 0.1875 * factor
    assert after[-1]["reservoir_ml"] == pytest.approx(40 - rotor_ml, abs=1e-3)  # by the counts
    assert pump.reservoir_ml == pytest.approx(40 - rotor_ml * 1.1, abs=1e-9)  # x (1 + bias)
    assert pump.delivered_to_patient_ml == pytest.approx(rotor_ml * 1.1, abs=1e-9)


def test_rotor_mismatch_scales_a_bolus_too_and_factor_one_puts_it_right() -> None:
    faults: list[Fault] = [
        RotorMismatch(START + H, factor=2.0),
        ClinicianBolus(START + 2 * H, dose_mcg=100.0, duration_min=30.0),
        RotorMismatch(START + 4 * H, factor=1.0),
    ]
    obs = Pump(spec(), START, faults).advance(START + 5 * H)
    in_bolus = at_time(obs, START + 2 * H + 20 * M)
    assert in_bolus["scheduled_ul_per_h"] == pytest.approx(RATE + 100, abs=1e-3)
    assert in_bolus["delivered_ul_per_h"] == pytest.approx(2 * (RATE + 100), abs=2e-3)
    restored = at_time(obs, START + 5 * H)
    assert restored["delivered_ul_per_h"] == restored["scheduled_ul_per_h"]


def test_partial_occlusion_reaches_the_patient_by_fraction_and_raises_nothing() -> None:
    pump = Pump(spec(), START, [PartialOcclusion(START, flow_fraction=0.25)])
    obs = pump.advance(START + 4 * D)
    assert pump.delivered_to_patient_ml == pytest.approx(0.25, abs=1e-9)  # 1 mL programmed
    assert pump.reservoir_ml == pytest.approx(39.75, abs=1e-9)
    assert at_time(obs, START + 4 * D)["reservoir_ml"] == 39.0  # the pump thinks 1 mL went
    assert alarms_raised(obs) == []


# Clinician suspend and resume ----------------------------------------------------------------


def test_suspend_stops_delivery_and_schedule_then_resume_restarts_them() -> None:
    s = spec(patient_bolus_dose_mcg=50.0, patient_bolus_max_per_day=4)
    faults: list[Fault] = [
        ClinicianBolus(START + 5 * H + 50 * M, dose_mcg=100.0, duration_min=30.0),
        ClinicianSuspend(START + 6 * H + 5 * M, duration_h=3.0),
        PatientBolusPress(START + 7 * H),
        ClinicianBolus(START + 8 * H),
    ]
    pump = Pump(s, START, faults)
    obs = pump.advance(START + 12 * H)
    assert [(e.fields["event"], e.sim_time) for e in events(obs)] == [
        ("bolus", START + 5 * H + 50 * M),
        ("suspend", START + 6 * H + 5 * M),
        ("resume", START + 9 * H + 5 * M),
    ]
    assert pump.patient_boluses_refused == 1
    # 6:00-6:05 still infusing with the bolus, then nothing for the rest of the interval
    first = at_time(obs, START + 6 * H + 10 * M)
    assert first["scheduled_ul_per_h"] == pytest.approx((RATE + 100) / 2, abs=1e-3)
    assert first["delivered_ul_per_h"] == first["scheduled_ul_per_h"]
    assert first["pump_state"] is PumpState.SUSPENDED
    during = at_time(obs, START + 8 * H)
    assert during["pump_state"] is PumpState.SUSPENDED
    assert during["delivered_ul_per_h"] == 0 and during["scheduled_ul_per_h"] == 0
    assert during["programmed_rate_ul_per_h"] == pytest.approx(RATE, abs=1e-3)
    assert during["alarms"] == ()
    after = at_time(obs, START + 10 * H)
    assert after["pump_state"] is PumpState.INFUSING
    assert after["delivered_ul_per_h"] == pytest.approx(RATE, abs=1e-3)
    # the bolus ran 15 of its 30 minutes (100 uL/h), then the suspend cut it off
    infused_h = 12 - 3
    assert pump.reservoir_ml == pytest.approx(40 - (infused_h * RATE + 25) / 1000, abs=1e-9)


def test_suspend_without_duration_stays_suspended() -> None:
    obs = Pump(spec(), START, [ClinicianSuspend(START + H, duration_h=None)]).advance(START + 3 * D)
    assert [e.fields["event"] for e in events(obs)] == ["suspend"]
    assert at_time(obs, START + 3 * D)["pump_state"] is PumpState.SUSPENDED


# MRI recovery logged late --------------------------------------------------------------------


def test_mri_rotor_recovers_on_time_but_the_recovery_is_logged_later() -> None:
    scan = MriScan(FAULT_AT, scan_min=60, recover_after_h=2.0, recovery_logged_after_h=20.0)
    obs = Pump(spec(), START, [scan]).advance(START + 2 * D)
    recovered = FAULT_AT + 3 * H
    stalled = at_time(obs, recovered - 10 * M)
    assert stalled["pump_state"] is PumpState.STALLED and stalled["delivered_ul_per_h"] == 0
    assert stalled["scheduled_ul_per_h"] == pytest.approx(RATE, abs=1e-3)  # still asked for
    assert at_time(obs, FAULT_AT + 30 * M)["scheduled_ul_per_h"] == 0  # the scan itself
    back = at_time(obs, recovered + 10 * M)
    assert back["pump_state"] is PumpState.INFUSING
    assert back["delivered_ul_per_h"] == pytest.approx(RATE, abs=1e-3)
    (log,) = events(obs, "motor_stall_recovery")
    assert log.sim_time == recovered + 20 * H
    assert log.fields["stalled_since"] == FAULT_AT


# Refill entries --------------------------------------------------------------------------------


def test_withdrawn_volume_reading_error_has_sd_0_3_ml_clipped_at_3_sd() -> None:
    visits: list[Fault] = [RefillVisit(START + k * D) for k in range(1, 401)]
    obs = Pump(spec(reporting_interval_s=86_400, seed=4), START, visits).advance(START + 401 * D)
    errors = [e.fields["withdrawn_ml"] - 39.75 for e in events(obs, "refill")]
    assert len(errors) == 400
    assert statistics.stdev(errors) == pytest.approx(0.3, rel=0.1)
    assert abs(statistics.mean(errors)) < 0.06
    assert max(abs(e) for e in errors) <= 0.9 + 0.005


def test_a_forced_reading_error_is_exact() -> None:
    pump = Pump(spec(), START, [RefillVisit(START + D, withdrawn_error_ml=-1.5)])
    (refill,) = events(pump.advance(START + D), "refill")
    assert refill.fields["withdrawn_ml"] == 38.25
    assert refill.fields["expected_ml"] == 39.75


def test_pocket_fill_is_invisible_on_a_calculated_pump_until_the_reservoir_runs_dry() -> None:
    s = spec(reservoir_capacity_ml=20.0, reporting_interval_s=3600)
    fill = PocketFill(START + H, pocket_ml=5.0, withdrawn_error_ml=0.0)
    pump = Pump(s, START, [fill, RefillVisit(START + 70 * D, withdrawn_error_ml=0.0)])
    obs = pump.advance(START + 2 * H)
    (refill,) = events(obs, "refill")
    assert refill.fields["injected_ml"] == 20 and refill.fields["reservoir_after_ml"] == 20
    assert refill.fields["reservoir_after_source"] == "entered"
    assert at_time(obs, START + 2 * H)["reservoir_ml"] == pytest.approx(20 - 0.25 / 24, abs=1e-3)
    assert pump.reservoir_ml == pytest.approx(15 - 0.25 / 24, abs=1e-9)
    # 15 mL last 60 days; the pump, counting on 20 mL, still shows 5 mL and raises nothing
    obs = pump.advance(START + 65 * D)
    assert pump.reservoir_ml == 0
    dry_at = START + H + 60 * D
    assert pump.delivered_to_patient_ml == pytest.approx(15 + 1 / 24 * 0.25, abs=1e-6)
    late = at_time(obs, START + 65 * D)
    assert late["pump_state"] is PumpState.INFUSING
    assert late["reservoir_ml"] == pytest.approx(20 - 0.25 * (65 - 1 / 24), abs=1e-3)
    assert late["delivered_ul_per_h"] == pytest.approx(RATE, abs=1e-3)
    assert alarms_raised(obs) == []
    assert at_time(obs, dry_at + 2 * H)["delivered_ul_per_h"] > 0  # counts go on regardless
    # the next refill finds nothing where the pump expected 2.5 mL
    (refill,) = events(pump.advance(START + 70 * D), "refill")
    assert refill.fields["expected_ml"] == pytest.approx(20 - 0.25 * (70 - 1 / 24), abs=1e-3)
    assert refill.fields["withdrawn_ml"] == 0


def test_pocket_fill_is_visible_on_a_measured_pump() -> None:
    s = spec(reservoir_capacity_ml=20.0, family="measured", sensor_noise_ul=3.0)
    obs = Pump(s, START, [PocketFill(FAULT_AT, pocket_ml=5.0)]).advance(FAULT_AT + H)
    (refill,) = events(obs, "refill")
    assert refill.fields["injected_ml"] == 20
    assert refill.fields["reservoir_after_ml"] == pytest.approx(15.0, abs=0.02)
    assert refill.fields["reservoir_after_source"] == "measured"
    assert at_time(obs, FAULT_AT)["reservoir_ml"] == pytest.approx(15.0, abs=0.02)


def test_over_infusion_shows_on_a_calculated_pump_only_at_the_next_refill() -> None:
    s = spec(refill_entry_sd_ml=0.0, reporting_interval_s=3600)
    pump = Pump(s, START, [OverInfusion(START, bias=0.2), RefillVisit(START + 100 * D)])
    obs = pump.advance(START + 100 * D)
    assert at_time(obs, START + 99 * D)["reservoir_ml"] == pytest.approx(15.25, abs=1e-3)
    assert at_time(obs, START + 99 * D)["delivered_ul_per_h"] == pytest.approx(RATE, abs=1e-3)
    (refill,) = events(obs, "refill")
    assert refill.fields["expected_ml"] - refill.fields["withdrawn_ml"] == pytest.approx(
        25 * 0.2, abs=0.006
    )


# scheduled_ul_per_h ------------------------------------------------------------------------


def test_scheduled_is_exact_across_a_flex_step_and_a_bolus() -> None:
    sched = flex_schedule([(0, 300.0), (7 * 60 + 5, 600.0)])
    low, high = rate_ul_per_h(300, 2000), rate_ul_per_h(600, 2000)
    bolus = ClinicianBolus(START + H + 5 * M, dose_mcg=100.0, duration_min=30.0)  # 100 uL/h
    obs = Pump(spec(schedule=sched), START, [bolus]).advance(START + 8 * H)

    def sched_at(t: datetime) -> float:
        return float(at_time(obs, t)["scheduled_ul_per_h"])

    assert sched_at(START + 7 * H) == pytest.approx(low, abs=1e-3)
    assert sched_at(START + 7 * H + 10 * M) == pytest.approx((low + high) / 2, abs=1e-3)
    assert sched_at(START + 7 * H + 20 * M) == pytest.approx(high, abs=1e-3)
    expected = {10: low + 50, 20: low + 100, 30: low + 100, 40: low + 50, 50: low}
    for minute, rate in expected.items():
        at = START + H + minute * M
        assert sched_at(at) == pytest.approx(rate, abs=1e-3)
        assert at_time(obs, at)["delivered_ul_per_h"] == pytest.approx(rate, abs=1e-3)


def test_scheduled_keeps_the_programme_while_an_alarm_stops_the_pump() -> None:
    obs = Pump(spec(), START, [MemoryFault(FAULT_AT, critical=True)]).advance(START + D)
    stopped = at_time(obs, START + D)
    assert stopped["pump_state"] is PumpState.STOPPED and stopped["delivered_ul_per_h"] == 0
    assert stopped["scheduled_ul_per_h"] == pytest.approx(RATE, abs=1e-3)


# Valve family --------------------------------------------------------------------------------


def test_valve_pump_counts_whole_strokes() -> None:
    pump = Pump(spec(family="valve"), START)
    obs = telemetry(pump.advance(START + D))
    strokes = []
    for prev, o in itertools.pairwise(obs):
        counted = interval_ul(o, prev, "delivered_ul_per_h")
        n = counted / VALVE_STROKE_UL
        assert n == pytest.approx(round(n), abs=1e-3)
        strokes.append(round(n))
        assert o.fields["scheduled_ul_per_h"] == pytest.approx(RATE, abs=1e-3)
    assert set(strokes) == {0, 1}  # 1.74 uL per 10 minutes
    assert sum(strokes) * VALVE_STROKE_UL == pytest.approx(250, abs=VALVE_STROKE_UL)
    assert obs[-1].fields["reservoir_ml"] == pytest.approx(40 - sum(strokes) * 0.002, abs=1e-6)
    assert obs[-1].fields["reservoir_source"] is ReservoirSource.CALCULATED


# Battery replacement -----------------------------------------------------------------------


def battery_spec(**over: Any) -> PumpSpec:
    s = spec(battery_life_days=1000.0, initial_battery_pct=9.5, reporting_interval_s=3600)
    return dataclasses.replace(s, **over)


def test_a_pump_at_eri_is_replaced_and_never_reaches_eos() -> None:
    pump = Pump(battery_spec(battery_replacement_after_eri_days=30.0), START)
    obs = pump.advance(START + 150 * D)
    (eri,) = events(obs, "alarm_raised")
    (cleared,) = events(obs, "alarm_cleared")
    assert eri.fields["alarm"] is cleared.fields["alarm"] is PumpAlarm.ERI
    assert cleared.sim_time - eri.sim_time == pytest.approx(30 * D, abs=timedelta(seconds=1))
    before = at_time(obs, START + 30 * D)
    assert before["battery_eri"] and before["eri_since"] == eri.time
    new = at_time(obs, START + 40 * D)
    assert not new["battery_eri"] and "eri_since" not in new and new["battery_pct"] >= 99.0
    assert new["alarms"] == () and new["pump_state"] is PumpState.INFUSING
    assert PumpAlarm.EOS not in alarms_raised(obs)


def test_injected_eri_is_not_followed_by_a_replacement() -> None:
    fault = BatteryEri(START + H, days_to_eos=10.0)
    obs = Pump(spec(reporting_interval_s=3600), START, [fault]).advance(START + 11 * D)
    assert alarms_raised(obs) == [PumpAlarm.ERI, PumpAlarm.EOS]
    assert at_time(obs, START + 2 * H)["eri_since"] == START + H - 80 * D


# Refills booked from use -------------------------------------------------------------------


def test_the_next_refill_is_booked_from_use_with_a_worst_case_flow() -> None:
    s = spec(refill_interval_days=180.0, refill_margin_days=10.0, reporting_interval_s=86_400)
    s = dataclasses.replace(s, days_since_refill=179.0, initial_reservoir_ml=10.0)
    refills = events(Pump(s, START).advance(START + 200 * D), "refill")
    # 38 mL above the alarm at 0.25 x 1.145 mL/day: 132.8 days, less the 10-day margin
    gap = (refills[1].sim_time - refills[0].sim_time) / D
    assert gap == pytest.approx(38 / (0.25 * 1.145) - 10, abs=1e-6)
    assert worst_case_flow_ml_per_day(s) == pytest.approx(0.25 * 1.145)


def test_patient_boluses_shorten_the_booking_and_the_aim_caps_it() -> None:
    s = spec(
        patient_bolus_dose_mcg=100.0,
        patient_bolus_max_per_day=4,
        patient_bolus_presses_per_day=2.0,
        patient_bolus_lockout_min=180.0,
    )
    assert worst_case_flow_ml_per_day(s) == pytest.approx((0.25 + 2 * 0.05) * 1.145)
    assert booked_refill_days(40, 2, 0.25, 10) == pytest.approx(142)
    assert booked_refill_days(3, 2, 0.25, 10) == 1.0  # never in the past
    assert math.isinf(booked_refill_days(40, 2, 0.0, 10))


# Scenario files know the new faults ----------------------------------------------------------


def test_scenario_timeline_builds_the_new_faults_and_names_bad_params() -> None:
    text = """
name: new-faults
duration: 2d
fleet: {n: 4}
pumps:
  - {pump: 3, set: {family: measured, sensor_noise_ul: 1.5}}
timeline:
  - {pump: 0, at: 1h, type: rotor_mismatch, params: {factor: 1.3}}
  - {pump: 1, at: 1h, type: partial_occlusion, params: {flow_fraction: 0.4}}
  - {pump: 2, at: 1h, type: clinician_suspend, params: {duration_h: null}}
  - {pump: 3, at: 1h, type: sensor_drift, params: {drift_ul_per_day: 25}}
  - {pump: 0, at: 2h, type: mri, params: {recover_after_h: 3, recovery_logged_after_h: 30}}
  - {pump: 1, at: 3h, type: refill, params: {withdrawn_error_ml: -0.5}}
  - {pump: 2, at: 3h, type: pocket_fill, params: {pocket_ml: 2, withdrawn_error_ml: 0.2}}
"""
    scenario = parse_scenario(text)
    at = START
    built = [item.fault(at) for item in scenario.timeline]
    assert built[:4] == [
        RotorMismatch(at, 1.3),
        PartialOcclusion(at, 0.4),
        ClinicianSuspend(at, None),
        SensorDrift(at, 25.0),
    ]
    assert built[4] == MriScan(at, recover_after_h=3.0, recovery_logged_after_h=30.0)
    assert built[5] == RefillVisit(at, withdrawn_error_ml=-0.5)
    assert built[6] == PocketFill(at, pocket_ml=2.0, withdrawn_error_ml=0.2)
    with pytest.raises(ValueError, match=r"timeline\.0\.params\.factor: must be in \(0, 3\]"):
        parse_scenario(text.replace("factor: 1.3", "factor: 4"))
    with pytest.raises(ValueError, match=r"params\.drift_ul_per_day"):
        parse_scenario(text.replace("params: {drift_ul_per_day: 25}", "params: {}"))
    with pytest.raises(ValueError, match=r"pumps\.0\.set\.family"):
        parse_scenario(text.replace("family: measured", "family: psychic"))


def test_every_new_fault_on_every_family_validates_as_v2() -> None:
    faults: list[Fault] = [
        RotorMismatch(START + H, 2.0),
        PartialOcclusion(START + 2 * H, 0.3),
        SensorDrift(START + 3 * H, 80.0),
        ClinicianSuspend(START + 4 * H, 1.0),
        MriScan(START + 6 * H, recover_after_h=1.0, recovery_logged_after_h=2.0),
        PocketFill(START + 12 * H, pocket_ml=3.0),
        BatteryEri(START + 13 * H, days_to_eos=0.2),
    ]
    for family in ("calculated", "measured", "valve"):
        obs = Pump(spec(family=family), START, faults).advance(START + D)
        for seq, o in enumerate(obs):
            msg = o.to_message("P-000001", seq)
            assert msg.v == 2
            assert contract.decode(contract.topic("P-000001", o.kind), contract.encode(msg)) == msg
