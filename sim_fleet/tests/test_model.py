"""The pump model against hand calculations from domain.md, fault by fault."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import pytest

from pumpfleet import contract
from sim_fleet import (
    BatteryEri,
    BatteryFault,
    CatheterOcclusion,
    ClinicianBolus,
    ClinicianReprogram,
    ClinicianSuspend,
    ClockSkew,
    DuplicateDelivery,
    Fault,
    MemoryFault,
    MessageLoss,
    MotorStallFault,
    MriScan,
    Observation,
    OutOfOrderDelivery,
    OverInfusion,
    PartialOcclusion,
    PatientBolusPress,
    PocketFill,
    Pump,
    PumpSpec,
    RefillVisit,
    RotorMismatch,
    SensorDrift,
    TelemetrySilence,
    UnderInfusion,
    continuous_schedule,
    flex_schedule,
    make_fleet,
    rate_ul_per_h,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)


def spec(**over: Any) -> PumpSpec:
    """40 mL, 500 mcg/day at 2000 mcg/mL (0.25 mL/day = 10.4 uL/h), no bias, full."""
    base = PumpSpec(
        pump_id="P-000001",
        reservoir_capacity_ml=40.0,
        concentration_mcg_per_ml=2000.0,
        schedule=continuous_schedule(500.0),
        battery_life_days=2000.0,
        seed=1,
    )
    return dataclasses.replace(base, **over)


def telemetry(obs: Sequence[Observation]) -> list[Observation]:
    return [o for o in obs if o.kind == "telemetry"]


def events(obs: Sequence[Observation], name: str | None = None) -> list[Observation]:
    return [o for o in obs if o.kind == "event" and name in (None, o.fields["event"])]


def at_time(obs: Sequence[Observation], t: datetime) -> dict[str, Any]:
    """Fields of the telemetry sent at simulated time `t`."""
    return dict(next(o for o in telemetry(obs) if o.sim_time == t).fields)


# Flow ---------------------------------------------------------------------------------------


def test_rate_from_dose_and_concentration() -> None:
    # domain.md: 500 mcg/day at 2000 mcg/mL = 0.25 mL/day = 10.4 uL/h
    assert rate_ul_per_h(500, 2000) == pytest.approx(10.4167, abs=1e-4)


def test_one_day_at_500_mcg_per_day_and_2000_mcg_per_ml_uses_a_quarter_ml() -> None:
    pump = Pump(spec(), START)
    obs = pump.advance(START + D)
    assert pump.reservoir_ml == pytest.approx(39.75, abs=1e-9)
    last = at_time(obs, START + D)
    assert last["reservoir_ml"] == 39.75
    assert last["delivered_ul_per_h"] == pytest.approx(10.417)
    assert last["programmed_rate_ul_per_h"] == pytest.approx(10.417)
    assert len(telemetry(obs)) == 24 * 6 + 1  # every 10 min, both ends included


def test_flow_bias_changes_the_true_volume_not_what_the_rotor_reports() -> None:
    pump = Pump(spec(flow_bias=0.10), START)
    obs = pump.advance(START + D)
    assert pump.reservoir_ml == pytest.approx(40 - 0.275)
    assert pump.estimated_reservoir_ml == pytest.approx(40 - 0.25)
    assert at_time(obs, START + D)["delivered_ul_per_h"] == pytest.approx(10.417)


def test_40_ml_at_a_quarter_ml_per_day_reaches_the_2_ml_alarm_on_day_152_then_empties() -> None:
    pump = Pump(spec(reporting_interval_s=3600), START)
    obs = pump.advance(START + 161 * D)
    low = events(obs, "alarm_raised")
    assert [o.fields["alarm"] for o in low] == [
        contract.PumpAlarm.LOW_RESERVOIR,
        contract.PumpAlarm.EMPTY_RESERVOIR,
    ]
    assert abs((low[0].sim_time - (START + 152 * D)).total_seconds()) < 1
    assert abs((low[1].sim_time - (START + 160 * D)).total_seconds()) < 1
    after = at_time(obs, START + 161 * D)
    assert after["pump_state"] is contract.PumpState.STOPPED
    assert after["delivered_ul_per_h"] == 0 and after["reservoir_ml"] == 0
    assert after["programmed_rate_ul_per_h"] > 0


def test_high_risk_alarm_at_4_ml() -> None:
    pump = Pump(spec(low_reservoir_alarm_ml=4.0, high_risk=True, reporting_interval_s=3600), START)
    obs = pump.advance(START + 150 * D)
    (low,) = events(obs, "alarm_raised")
    assert abs((low.sim_time - (START + 144 * D)).total_seconds()) < 1  # (40 - 4) / 0.25


def test_flex_steps_follow_the_clock_and_integrate_to_the_daily_dose() -> None:
    sched = flex_schedule([(0, 300.0), (7 * 60, 600.0), (22 * 60, 300.0)])
    assert sched.dose_mcg_per_day == pytest.approx((300 * 7 + 600 * 15 + 300 * 2) / 24)
    pump = Pump(spec(schedule=sched), START)
    obs = pump.advance(START + D)
    assert pump.reservoir_ml == pytest.approx(40 - sched.dose_mcg_per_day / 2000, abs=1e-9)
    rate = at_time(obs, START + timedelta(hours=6, minutes=50))["programmed_rate_ul_per_h"]
    assert rate == pytest.approx(rate_ul_per_h(300, 2000), abs=1e-3)
    rate = at_time(obs, START + 7 * H)["programmed_rate_ul_per_h"]
    assert rate == pytest.approx(rate_ul_per_h(600, 2000), abs=1e-3)
    assert at_time(obs, START + 22 * H)["programmed_dose_mcg_per_day"] == sched.dose_mcg_per_day


def test_flex_steps_are_in_local_time() -> None:
    sched = flex_schedule([(0, 300.0), (7 * 60, 600.0)])
    obs = Pump(spec(schedule=sched, utc_offset_min=60), START).advance(START + D)
    # 07:00 local is 06:00 UTC
    assert at_time(obs, START + 6 * H)["programmed_rate_ul_per_h"] == pytest.approx(12.5)
    assert at_time(obs, START + 5 * H)["programmed_rate_ul_per_h"] == pytest.approx(6.25)


def test_routine_refill_fills_to_capacity_on_schedule() -> None:
    pump = Pump(
        spec(refill_interval_days=30, days_since_refill=29.5, initial_reservoir_ml=10.0), START
    )
    obs = pump.advance(START + 31 * D)
    refills = events(obs, "refill")
    assert [o.sim_time for o in refills] == [START + D / 2, START + D / 2 + 30 * D]
    first = refills[0].fields
    assert first["injected_ml"] == 40 and first["reservoir_after_ml"] == 40
    assert abs(first["withdrawn_ml"] - (10 - 0.125)) <= 0.9  # reading error, clipped at 3 SD


def test_refill_discrepancy_is_the_bias_accumulated_since_the_last_refill() -> None:
    s = spec(flow_bias=0.10, reporting_interval_s=3600, refill_entry_sd_ml=0.0)
    pump = Pump(s, START, [RefillVisit(START + 40 * D)])
    (refill,) = events(pump.advance(START + 40 * D), "refill")
    f = refill.fields
    assert f["expected_ml"] == pytest.approx(40 - 40 * 0.25, abs=0.001)
    assert f["expected_ml"] - f["withdrawn_ml"] == pytest.approx(40 * 0.25 * 0.10, abs=0.006)
    assert f["expected_source"] is contract.ReservoirSource.CALCULATED


def test_refill_with_a_new_concentration_changes_the_rate_not_the_dose() -> None:
    pump = Pump(spec(), START, [RefillVisit(START + H, concentration_mcg_per_ml=1000.0)])
    obs = pump.advance(START + 2 * H)
    after = at_time(obs, START + 2 * H)
    assert after["concentration_mcg_per_ml"] == 1000
    assert after["programmed_dose_mcg_per_day"] == 500
    assert after["programmed_rate_ul_per_h"] == pytest.approx(20.833)


# Boluses ------------------------------------------------------------------------------------


def test_patient_bolus_refused_inside_lockout_and_beyond_the_daily_max() -> None:
    s = spec(
        patient_bolus_dose_mcg=50.0,
        patient_bolus_max_per_day=3,
        patient_bolus_lockout_min=60.0,
        patient_bolus_duration_min=15.0,
    )
    presses_min = [10, 30, 75, 140, 210, 24 * 60 + 15]
    # 30: inside the 60-min lockout; 210: a 4th in 24 h; 24h15: the 10-min one has left the window
    pump = Pump(s, START, [PatientBolusPress(START + timedelta(minutes=m)) for m in presses_min])
    obs = pump.advance(START + 25 * H)
    given = [o.sim_time - START for o in events(obs, "bolus")]
    assert given == [timedelta(minutes=m) for m in (10, 75, 140, 24 * 60 + 15)]
    assert pump.patient_boluses_refused == 2
    # 25 h of basal plus four boluses of 50 mcg = 0.025 mL each
    assert pump.reservoir_ml == pytest.approx(40 - 25 / 24 * 0.25 - 4 * 0.025, abs=1e-9)


def test_patient_bolus_refused_when_disabled_or_not_infusing() -> None:
    pump = Pump(spec(), START, [PatientBolusPress(START + H)])
    assert events(pump.advance(START + 2 * H), "bolus") == []
    assert pump.patient_boluses_refused == 1
    s = spec(patient_bolus_dose_mcg=50.0, patient_bolus_max_per_day=3)
    faults: list[Fault] = [MotorStallFault(START + H), PatientBolusPress(START + 2 * H)]
    pump = Pump(s, START, faults)
    assert events(pump.advance(START + 3 * H), "bolus") == []


def test_clinician_bolus_adds_its_volume_and_shows_in_delivered() -> None:
    pump = Pump(spec(), START, [ClinicianBolus(START + H, dose_mcg=100.0, duration_min=30.0)])
    obs = pump.advance(START + 2 * H)
    (bolus,) = events(obs, "bolus")
    assert bolus.fields == {
        "source": "clinician",
        "dose_mcg": 100.0,
        "duration_min": 30.0,
        "event": "bolus",
    }
    assert pump.reservoir_ml == pytest.approx(40 - 2 / 24 * 0.25 - 0.05, abs=1e-9)
    # the interval ending at 1:10 carries 10 of the 30 minutes: +100 uL/h on top of 10.4
    delivered = at_time(obs, START + timedelta(hours=1, minutes=10))["delivered_ul_per_h"]
    assert delivered == pytest.approx(10.417 + 100.0, abs=1e-3)


# Battery ------------------------------------------------------------------------------------


def test_eri_then_eos_90_days_later_stops_delivery() -> None:
    # life 1000 days: ERI at 9 %; drain at 0.25 mL/day = 0.1 %/day x (0.6 + 0.4 x 0.5) = 0.08 %/day
    s = spec(battery_life_days=1000.0, initial_battery_pct=9.5, reporting_interval_s=3600)
    s = dataclasses.replace(s, battery_replacement_after_eri_days=None)  # never replaced
    pump = Pump(s, START)
    obs = pump.advance(START + 100 * D)
    raised = {o.fields["alarm"]: o.sim_time for o in events(obs, "alarm_raised")}
    eri = raised[contract.PumpAlarm.ERI]
    assert abs((eri - (START + 6.25 * D)).total_seconds()) < 60
    assert raised[contract.PumpAlarm.EOS] - eri == pytest.approx(90 * D, abs=timedelta(seconds=1))
    before = at_time(obs, START + 96 * D)
    assert before["battery_eri"] and before["pump_state"] is contract.PumpState.INFUSING
    assert before["eri_since"] == eri
    assert "eri_since" not in at_time(obs, START + 6 * D)
    after = at_time(obs, START + 97 * D)
    assert after["pump_state"] is contract.PumpState.STOPPED
    assert after["delivered_ul_per_h"] == 0 and after["battery_pct"] == 0
    assert at_time(obs, START + 100 * D)["reservoir_ml"] == after["reservoir_ml"]


def test_battery_drains_faster_at_higher_flow() -> None:
    def eri_day(dose: float) -> float:
        s = spec(schedule=continuous_schedule(dose), battery_life_days=1000.0)
        s = dataclasses.replace(s, initial_battery_pct=9.5, reporting_interval_s=86_400)
        (eri,) = events(Pump(s, START).advance(START + 30 * D), "alarm_raised")
        return (eri.sim_time - START) / D

    # 0.1 vs 0.5 mL/day: drain factors 0.68 and 1.0 of the nominal 0.1 %/day
    assert eri_day(200.0) == pytest.approx(0.5 / 0.068, rel=1e-3)
    assert eri_day(1000.0) == pytest.approx(0.5 / 0.1, rel=1e-3)


# Each fault changes what it should and nothing else -----------------------------------------

FAULT_AT = START + 6 * H
TELEMETRY_FIELDS = {
    "delivered_ul_per_h",
    "programmed_rate_ul_per_h",
    "programmed_dose_mcg_per_day",
    "reservoir_ml",
    "reservoir_capacity_ml",
    "low_reservoir_alarm_ml",
    "concentration_mcg_per_ml",
    "battery_pct",
    "battery_eri",
    "pump_state",
    "alarms",
    "reservoir_source",
    "reporting_interval_s",
    "scheduled_ul_per_h",
    "eri_since",
}
MOTION = {"delivered_ul_per_h", "reservoir_ml"}
SCHED = {"scheduled_ul_per_h"}
RES = {"reservoir_ml"}

# fault, telemetry fields that must change on a calculated pump, fields that must also change on
# a measured pump (what only a sensor sees), fields that may also change, new events
ISOLATION: list[tuple[Fault, set[str], set[str], set[str], list[str]]] = [
    (
        MotorStallFault(FAULT_AT),
        MOTION | {"pump_state", "alarms"},
        set(),
        {"battery_pct"},
        ["motor_stall", "alarm_raised"],
    ),
    (
        MriScan(FAULT_AT, scan_min=45, recover_after_h=4),
        MOTION | SCHED | {"pump_state"},
        set(),
        {"battery_pct"},
        ["mri_start", "motor_stall", "mri_end", "motor_stall_recovery"],
    ),
    (
        MriScan(FAULT_AT, scan_min=45, recover_after_h=2, recovery_logged_after_h=3),
        MOTION | SCHED | {"pump_state"},
        set(),
        {"battery_pct"},
        ["mri_start", "motor_stall", "mri_end", "motor_stall_recovery"],
    ),
    (OverInfusion(FAULT_AT, bias=0.25), set(), RES, set(), []),
    (UnderInfusion(FAULT_AT, bias=-0.30), set(), RES, set(), []),
    (CatheterOcclusion(FAULT_AT, reservoir_outflow_fraction=0.0), set(), RES, set(), []),
    (CatheterOcclusion(FAULT_AT, reservoir_outflow_fraction=1.0), set(), set(), set(), []),
    (PartialOcclusion(FAULT_AT, flow_fraction=0.5), set(), RES, set(), []),
    (RotorMismatch(FAULT_AT, factor=1.3), MOTION, set(), {"battery_pct"}, []),
    (SensorDrift(FAULT_AT, drift_ul_per_day=50.0), set(), RES, set(), []),
    (
        ClinicianSuspend(FAULT_AT, duration_h=6.0),
        MOTION | SCHED | {"pump_state"},
        set(),
        {"battery_pct"},
        ["suspend", "resume"],
    ),
    (PocketFill(FAULT_AT, pocket_ml=8.0), RES, set(), set(), ["refill"]),
    (RefillVisit(FAULT_AT), RES, set(), set(), ["refill"]),
    (
        BatteryFault(FAULT_AT),
        MOTION | SCHED | {"programmed_rate_ul_per_h", "programmed_dose_mcg_per_day", "alarms"},
        set(),
        {"battery_pct"},
        ["reprogram", "alarm_raised"],
    ),
    (
        BatteryEri(FAULT_AT),
        {"battery_eri", "battery_pct", "alarms", "eri_since"},
        set(),
        set(),
        ["alarm_raised"],
    ),
    (
        MemoryFault(FAULT_AT, critical=True),  # stopped by an alarm: the programme still asks
        MOTION | {"pump_state", "alarms"},
        set(),
        {"battery_pct"},
        ["alarm_raised"],
    ),
    (MemoryFault(FAULT_AT, critical=False), {"alarms"}, set(), set(), ["alarm_raised"]),
    (
        ClinicianReprogram(FAULT_AT, dose_mcg_per_day=750.0),
        MOTION | SCHED | {"programmed_rate_ul_per_h", "programmed_dose_mcg_per_day"},
        set(),
        {"battery_pct"},
        ["reprogram"],
    ),
    (ClinicianBolus(FAULT_AT, dose_mcg=100.0), MOTION | SCHED, set(), {"battery_pct"}, ["bolus"]),
    (ClockSkew(FAULT_AT, offset_s=240.0), set(), set(), set(), []),
    (DuplicateDelivery(FAULT_AT, duration_h=2.0), set(), set(), set(), []),
    (OutOfOrderDelivery(FAULT_AT, duration_h=2.0), set(), set(), set(), []),
    (MessageLoss(FAULT_AT, duration_h=2.0), set(), set(), set(), []),
    (TelemetrySilence(FAULT_AT, duration_h=2.0), set(), set(), set(), []),
]


@pytest.mark.parametrize("family", ["calculated", "measured"])
@pytest.mark.parametrize(
    ("fault", "must", "sensor_sees", "may", "new_events"),
    ISOLATION,
    ids=[f"{type(f).__name__}-{i}" for i, (f, *_) in enumerate(ISOLATION)],
)
def test_fault_changes_what_it_should_and_nothing_else(
    fault: Fault,
    must: set[str],
    sensor_sees: set[str],
    may: set[str],
    new_events: list[str],
    family: str,
) -> None:
    # a noiseless sensor, so that any change in a measured pump's reservoir_ml is the fault's
    s = spec(reporting_interval_s=600, family=family, sensor_noise_ul=0.0)
    if family == "measured":
        must = must | sensor_sees
    base = Pump(s, START).advance(START + D)
    hit = Pump(s, START, [fault]).advance(START + D)
    base_t = {o.sim_time: o for o in telemetry(base)}
    changed: set[str] = set()
    for o in telemetry(hit):
        ref = base_t[o.sim_time]
        diff = {k for k in TELEMETRY_FIELDS if o.fields.get(k) != ref.fields.get(k)}
        if o.sim_time < FAULT_AT:
            assert diff == set(), f"changed before the fault: {diff}"
        changed |= diff
    assert must <= changed, f"should have changed: {must - changed}"
    assert changed <= must | may, f"changed but should not: {changed - must - may}"
    assert [e.fields["event"] for e in events(hit)] == new_events
    assert events(base) == []


def test_catheter_occlusion_keeps_drug_from_the_patient_either_way() -> None:
    for fraction, reservoir_drop in ((0.0, 0.0625), (1.0, 0.25)):
        pump = Pump(spec(), START, [CatheterOcclusion(FAULT_AT, fraction)])
        obs = pump.advance(START + D)
        assert pump.delivered_to_patient_ml == pytest.approx(0.0625)  # the first 6 h only
        assert pump.reservoir_ml == pytest.approx(40 - reservoir_drop)
        assert at_time(obs, START + D)["delivered_ul_per_h"] == pytest.approx(10.417)
        assert at_time(obs, START + D)["reservoir_ml"] == 39.75  # the calculation: as programmed
        assert events(obs, "alarm_raised") == []


def test_battery_fault_resets_the_rate_without_a_session() -> None:
    obs = Pump(spec(), START, [BatteryFault(FAULT_AT)]).advance(START + 7 * H)
    (reprogram,) = events(obs, "reprogram")
    assert reprogram.fields["session"] is False
    assert reprogram.fields["old_schedule"]["dose_mcg_per_day"] == 500
    assert reprogram.fields["new_schedule"]["dose_mcg_per_day"] == pytest.approx(12.0)
    (alarm,) = events(obs, "alarm_raised")
    assert alarm.fields["alarm"] is contract.PumpAlarm.REDUCED_BATTERY_PERFORMANCE
    assert at_time(obs, START + 7 * H)["programmed_rate_ul_per_h"] == pytest.approx(0.25)


def test_motor_stall_recovery_reports_when_it_stalled() -> None:
    pump = Pump(spec(), START, [MotorStallFault(FAULT_AT, recover_after_h=2.0)])
    obs = pump.advance(START + D)
    (recovery,) = events(obs, "motor_stall_recovery")
    assert recovery.sim_time == FAULT_AT + 2 * H
    assert recovery.fields["stalled_since"] == FAULT_AT
    assert [o.fields["alarm"] for o in events(obs, "alarm_cleared")] == [
        contract.PumpAlarm.MOTOR_STALL
    ]
    assert pump.reservoir_ml == pytest.approx(40 - 22 / 24 * 0.25)


def test_mri_suspends_for_the_scan_then_stalls_until_recovery_or_forever() -> None:
    pump = Pump(spec(), START, [MriScan(FAULT_AT, scan_min=60, recover_after_h=None)])
    obs = pump.advance(START + 3 * D)
    assert at_time(obs, FAULT_AT + H / 2)["pump_state"] is contract.PumpState.SUSPENDED
    assert at_time(obs, FAULT_AT + 2 * H)["pump_state"] is contract.PumpState.STALLED
    assert at_time(obs, START + 3 * D)["pump_state"] is contract.PumpState.STALLED
    assert [e.fields["event"] for e in events(obs)] == ["mri_start", "motor_stall", "mri_end"]
    assert pump.reservoir_ml == pytest.approx(40 - 0.0625)  # nothing after the scan began


def test_telemetry_silence_sends_nothing_while_the_pump_keeps_infusing() -> None:
    pump = Pump(spec(), START, [TelemetrySilence(FAULT_AT, duration_h=2.0)])
    obs = pump.advance(START + D)
    inside = [o for o in obs if FAULT_AT < o.sim_time < FAULT_AT + 2 * H]
    assert inside == []
    statuses = [(o.sim_time, o.fields["online"]) for o in obs if o.kind == "status"]
    assert statuses == [(START, True), (FAULT_AT, False), (FAULT_AT + 2 * H, True)]
    assert pump.reservoir_ml == pytest.approx(39.75)


def test_clock_skew_shifts_device_time_only() -> None:
    obs = Pump(spec(), START, [ClockSkew(FAULT_AT, offset_s=240.0)]).advance(START + D)
    for o in obs:
        expected = timedelta(seconds=240) if o.sim_time >= FAULT_AT else timedelta(0)
        assert o.time - o.sim_time == expected


def test_transport_flags_only_inside_their_window() -> None:
    faults: list[Fault] = [
        DuplicateDelivery(START + H, duration_h=1.0, share=1.0),
        OutOfOrderDelivery(START + 3 * H, duration_h=1.0, delay_s=900.0, share=1.0),
        MessageLoss(START + 5 * H, duration_h=1.0, share=1.0),
    ]
    obs = Pump(spec(), START, faults).advance(START + 7 * H)

    def minutes(flag: str) -> set[int]:
        return {(o.sim_time - START) // timedelta(minutes=1) for o in obs if getattr(o, flag)}

    assert minutes("duplicate") == set(range(60, 120, 10))
    assert minutes("delay_s") == set(range(180, 240, 10))
    assert minutes("lost") == set(range(300, 360, 10))
    assert {o.delay_s for o in obs if o.delay_s} == {900.0}


# The seam: contract validity, determinism, slicing ------------------------------------------

EVERYTHING: list[Fault] = [
    ClinicianBolus(START + H),
    PatientBolusPress(START + 2 * H),
    ClinicianReprogram(START + 3 * H, dose_mcg_per_day=550.0),
    MriScan(START + 4 * H, recover_after_h=2.0),
    RotorMismatch(START + 7 * H, factor=1.3),
    SensorDrift(START + 8 * H, drift_ul_per_day=30.0),
    RotorMismatch(START + 9 * H, factor=1.0),
    MotorStallFault(START + 10 * H, recover_after_h=1.0),
    OverInfusion(START + 12 * H),
    PartialOcclusion(START + 13 * H, flow_fraction=0.5),
    UnderInfusion(START + 14 * H),
    CatheterOcclusion(START + 15 * H),
    PocketFill(START + 16 * H),
    RefillVisit(START + 17 * H, concentration_mcg_per_ml=1000.0),
    BatteryFault(START + 18 * H),
    MemoryFault(START + 19 * H, critical=False, clear_after_h=1.0),
    MemoryFault(START + 20 * H, critical=True, clear_after_h=1.0),
    TelemetrySilence(START + 22 * H, duration_h=1.0),
    ClockSkew(START + 24 * H, offset_s=-30.0),
    DuplicateDelivery(START + 25 * H),
    OutOfOrderDelivery(START + 26 * H),
    MessageLoss(START + 27 * H),
    BatteryEri(START + 28 * H, days_to_eos=1.0),
    ClinicianSuspend(START + 29 * H, duration_h=2.0),
    MriScan(START + 32 * H, recover_after_h=1.0, recovery_logged_after_h=5.0),
]


def everything_spec(family: str = "calculated") -> PumpSpec:
    return spec(
        family=family,
        schedule=flex_schedule([(0, 400.0), (8 * 60, 600.0), (20 * 60, 450.0)]),
        patient_bolus_dose_mcg=40.0,
        patient_bolus_max_per_day=4,
        patient_bolus_presses_per_day=6.0,
        initial_reservoir_ml=6.0,
        low_reservoir_alarm_ml=4.0,
    )


FAMILIES = ["calculated", "measured", "valve"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_observation_validates_against_the_contract(family: str) -> None:
    obs = Pump(everything_spec(family), START, EVERYTHING).advance(START + 3 * D)
    kinds = {o.fields.get("event", o.kind) for o in obs}
    assert {
        "telemetry",
        "status",
        "refill",
        "reprogram",
        "bolus",
        "suspend",
        "resume",
        "mri_start",
        "mri_end",
        "motor_stall",
        "motor_stall_recovery",
        "alarm_raised",
        "alarm_cleared",
    } <= kinds
    assert {o.fields["battery_eri"] for o in telemetry(obs)} == {False, True}
    for seq, o in enumerate(obs):
        assert o.kind != "telemetry" or ("eri_since" in o.fields) == o.fields["battery_eri"]
        envelope = {"v": 2, "pump_id": "P-000001", "seq": seq, "time": o.time}
        msg: contract.Message = o.to_message("P-000001", seq)  # what the simulator stamps
        assert msg.v == contract.CONTRACT_VERSION == 2
        wire = contract.encode(msg)
        assert contract.decode(contract.topic("P-000001", o.kind), wire) == msg
        # the agent's path: plain JSON of envelope + fields, enums and datetimes as strings
        raw = json.dumps({**envelope, "kind": o.kind, **o.fields}, default=_plain_json)
        assert contract.decode(contract.topic("P-000001", o.kind), raw) == msg


def _plain_json(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not plain JSON")


def test_same_seed_same_fleet_same_observations() -> None:
    def run(seed: int) -> list[list[Observation]]:
        specs = make_fleet(40, seed)
        pumps = [Pump(s, START, [MessageLoss(START + H, share=0.5)]) for s in specs]
        pumps[3].inject(PocketFill(START + 2 * H))
        return [p.advance(START + D) for p in pumps]

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("family", FAMILIES)
def test_how_time_is_sliced_changes_nothing(family: str) -> None:
    whole = Pump(everything_spec(family), START, EVERYTHING).advance(START + 3 * D)
    pump = Pump(everything_spec(family), START, EVERYTHING)
    rng = random.Random(3)
    sliced: list[Observation] = []
    t = START
    while t < START + 3 * D:
        t = min(START + 3 * D, t + timedelta(seconds=rng.uniform(1, 5000)))
        sliced += pump.advance(t)
    assert sliced == whole


def test_time_only_moves_forward() -> None:
    pump = Pump(spec(), START)
    pump.advance(START + H)
    with pytest.raises(ValueError, match="before the pump's time"):
        pump.advance(START)
    with pytest.raises(ValueError, match="before the pump's time"):
        pump.inject(OverInfusion(START + H / 2))
    pump.inject(OverInfusion(START + H))  # now is fine
    assert pump.advance(START + H) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"reservoir_capacity_ml": 30.0}, "reservoir_capacity_ml"),
        ({"concentration_mcg_per_ml": 50.0}, "concentration_mcg_per_ml"),
        ({"low_reservoir_alarm_ml": 45.0}, "low_reservoir_alarm_ml"),
        ({"initial_reservoir_ml": 41.0}, "initial_reservoir_ml"),
        ({"report_offset_s": 600}, "report_offset_s"),
        ({"flow_bias": -1.0}, "flow_bias"),
        ({"family": "sensorless"}, "family"),
        ({"sensor_noise_ul": -1.0}, "sensor_noise_ul"),
        ({"sensor_drift_ul_per_day": float("nan")}, "sensor_drift_ul_per_day"),
        ({"refill_entry_sd_ml": -0.1}, "refill_entry_sd_ml"),
        ({"refill_margin_days": -1.0}, "refill_margin_days"),
        ({"battery_replacement_after_eri_days": 90.0}, "battery_replacement_after_eri_days"),
    ],
)
def test_spec_rejects_impossible_pumps_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        spec(**change)


def test_flex_schedule_whose_dose_disagrees_with_its_steps_is_rejected() -> None:
    sched = flex_schedule([(0, 300.0), (600, 500.0)])
    wrong = sched.model_copy(update={"dose_mcg_per_day": 500.0})
    with pytest.raises(ValueError, match=r"schedule\.dose_mcg_per_day"):
        spec(schedule=wrong)


def test_ten_thousand_pumps_advance_one_day() -> None:
    specs = make_fleet(10_000, 1)
    pumps = [Pump(s, START) for s in specs]
    began = time.perf_counter()
    sent = sum(len(p.advance(START + D)) for p in pumps)
    took = time.perf_counter() - began
    print(f"\n10,000 pumps x 1 simulated day: {sent} observations in {took:.1f} s")
    assert sent >= 10_000 * 144
