"""Each rule through the engine: must fire, must not fire, hysteresis, priority changes, ends."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ingest.rules import PumpProfile, RuleEngine, Thresholds
from ingest.rules.tests.feed import Feed, only
from pumpfleet.contract import PumpAlarm, PumpState

# critical_pump_alarm ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alarm",
    [
        PumpAlarm.EMPTY_RESERVOIR,
        PumpAlarm.EOS,
        PumpAlarm.MOTOR_STALL,
        PumpAlarm.CRITICAL_MEMORY_ERROR,
        PumpAlarm.REDUCED_BATTERY_PERFORMANCE,
    ],
)
def test_critical_fires_at_once_on_each_critical_pump_alarm(alarm: PumpAlarm) -> None:
    feed = Feed()
    feed.hours(1)
    found = feed.raise_alarm(alarm)
    assert only(found, "critical_pump_alarm") == [(True, "high")]
    assert found[0].details["causes"] == [alarm.value]
    assert alarm.value.replace("_", " ") in found[0].summary


@pytest.mark.parametrize(
    "alarm", [PumpAlarm.NONCRITICAL_MEMORY_ERROR, PumpAlarm.LOW_RESERVOIR, PumpAlarm.ERI]
)
def test_critical_ignores_other_pump_alarms(alarm: PumpAlarm) -> None:
    feed = Feed()
    feed.hours(1)
    feed.raise_alarm(alarm)
    feed.hours(1)
    assert only(feed.findings, "critical_pump_alarm") == []


def test_critical_seen_in_telemetry_alone_when_the_alarm_event_was_lost() -> None:
    feed = Feed()
    feed.hours(1)
    found = feed.telemetry(alarms=(PumpAlarm.EOS,), pump_state=PumpState.STOPPED)
    assert only(found, "critical_pump_alarm") == [(True, "high")]


def test_critical_flapping_alarm_is_one_alert_and_ends_after_the_clear_hold() -> None:
    feed = Feed()
    feed.hours(1)
    for _ in range(5):  # raised and cleared every 2 minutes
        feed.raise_alarm(PumpAlarm.MOTOR_STALL)
        feed.now += timedelta(seconds=60)
        feed.clear_alarm(PumpAlarm.MOTOR_STALL)
        feed.now += timedelta(seconds=60)
    assert only(feed.telemetry(dt_s=300), "critical_pump_alarm") == []  # cleared 6 min ago
    assert only(feed.telemetry(), "critical_pump_alarm") == [(False, "high")]
    assert only(feed.findings, "critical_pump_alarm") == [(True, "high"), (False, "high")]


def test_critical_new_cause_while_open_is_reported_again() -> None:
    feed = Feed()
    feed.raise_alarm(PumpAlarm.MOTOR_STALL)
    found = feed.raise_alarm(PumpAlarm.EMPTY_RESERVOIR)
    assert only(found, "critical_pump_alarm") == [(True, "high")]
    assert set(found[0].details["causes"]) == {"motor_stall", "empty_reservoir"}


def test_critical_rate_reset_without_session_until_a_clinician_reprograms() -> None:
    feed = Feed()
    feed.hours(1)
    found = feed.reprogram(12.0, session=False)
    assert only(found, "critical_pump_alarm") == [(True, "high")]
    assert "no programming session" in found[-1].summary
    feed.hours(1)
    feed.reprogram(500.0, session=True)
    feed.hours(0.5)
    assert only(feed.findings, "critical_pump_alarm") == [(True, "high"), (False, "high")]


def test_critical_unexplained_drop_seen_in_telemetry_when_nothing_was_lost() -> None:
    feed = Feed()
    feed.hours(1)
    feed.dose_mcg_per_day = 12.0  # no reprogram event at all
    found = feed.telemetry()
    assert only(found, "critical_pump_alarm") == [(True, "high")]
    assert only(found, "large_dose_change") == [(True, "low")]


def test_critical_not_claimed_for_a_drop_when_the_reprogram_may_be_in_a_gap() -> None:
    feed = Feed()
    feed.hours(1)
    feed.skip()  # the reprogram event that explains it may be this lost message
    feed.dose_mcg_per_day = 300.0
    found = feed.telemetry()
    assert only(found, "critical_pump_alarm") == []
    assert only(found, "large_dose_change") == [(True, "low")]


def test_critical_stall_event_without_alarm_counts_but_not_during_an_mri() -> None:
    feed = Feed()
    feed.hours(1)
    assert only(feed.stall(), "critical_pump_alarm") == [(True, "high")]
    feed.recover()
    other = Feed(pump_id="P-000002")
    other.hours(1)
    other.mri()
    assert only(other.findings, "critical_pump_alarm") == []


# over_infusion / under_infusion: measured trend --------------------------------------------------


def _trend(found: list, rule: str) -> dict:
    finding = next(f for f in found if f.rule == rule)
    return finding.details["measured_trend"]


def test_over_infusion_fires_from_the_measured_trend_once_the_window_is_judged() -> None:
    feed = Feed()
    feed.hours(1)
    feed.flow_factor = 1.25
    early = feed.hours(2.5)
    assert only(early, "over_infusion") == []  # the short window is not full yet
    feed.hours(3)
    assert only(feed.findings, "over_infusion") == [(True, "high")]
    assert _trend(feed.findings, "over_infusion")["deviation_pct"] > 14.5
    assert "measured reservoir fell" in next(f for f in feed.findings).summary


def test_over_infusion_not_for_a_pump_within_labelled_accuracy() -> None:
    feed = Feed(noise_ul=2.0)
    feed.flow_factor = 1.10
    feed.hours(72)
    assert feed.findings == []


def test_over_infusion_not_for_a_slow_pump_with_sensor_noise() -> None:
    # 60 mcg/day at 2000 mcg/mL = 1.25 uL/h: 30 uL a day under 2 uL of noise.
    feed = Feed(dose_mcg_per_day=60.0, noise_ul=2.0)
    feed.flow_factor = 1.04
    feed.hours(96)
    assert only(feed.findings, "over_infusion") == []
    assert only(feed.findings, "under_infusion") == []


def test_a_steady_16_percent_over_infusion_through_noise_is_one_alert_that_stays_open() -> None:
    feed = Feed(noise_ul=2.0)
    feed.hours(24)
    feed.flow_factor = 1.16
    feed.hours(72)
    assert only(feed.findings, "over_infusion") == [(True, "high")]


def test_over_infusion_not_for_boluses_the_rotor_counted() -> None:
    feed = Feed()
    feed.hours(4)
    feed.bolus(100.0, source="clinician")
    bolus_rate = feed.rate_ul_per_h + 300.0  # 50 uL in this interval, asked for by the bolus
    feed.telemetry(delivered_ul_per_h=bolus_rate, scheduled_ul_per_h=bolus_rate)
    feed.hours(6)
    assert only(feed.findings, "over_infusion") == []


def test_over_infusion_not_for_a_v1_bolus_the_engine_knows_of() -> None:
    feed = Feed(v=1, profile=None)
    feed.hours(4)
    feed.bolus(100.0, source="clinician")
    feed.telemetry(delivered_ul_per_h=feed.rate_ul_per_h + 300.0)
    feed.hours(6)
    assert only(feed.findings, "over_infusion") == []


def test_over_infusion_ends_only_once_clearly_absent_for_the_hold() -> None:
    feed = Feed()
    feed.hours(1)
    feed.flow_factor = 1.3
    feed.hours(5)
    feed.flow_factor = 1.0
    feed.hours(10)  # the long window still holds the over-infusion: stays open
    assert only(feed.findings, "over_infusion") == [(True, "high")]
    feed.hours(40)
    assert only(feed.findings, "over_infusion") == [(True, "high"), (False, "high")]


def test_refill_restarts_the_trend_instead_of_looking_like_under_infusion() -> None:
    feed = Feed()
    feed.hours(4)
    feed.refill(expected_ml=29.6, withdrawn_ml=29.6, injected_ml=20.0)
    feed.hours(4)
    feed.true_ml += 5.0  # a refill whose event was lost: the reading jumps up
    feed.hours(30)
    assert only(feed.findings, "under_infusion") == []
    assert only(feed.findings, "over_infusion") == []


def _refill_overtaking_a_reading(feed: Feed) -> None:
    """The last reading before a refill stored after the refill event (the urgent lane stores
    events at once; the reading waited in a backlog)."""
    feed.hours(4)
    late = feed.telemetry_msg()  # 29.6 mL, seq N
    feed.refill(expected_ml=29.6, withdrawn_ml=29.6, injected_ml=32.0)  # seq N + 1
    feed.findings += feed.engine.observe(late)


def test_a_reading_older_than_the_refill_stays_out_of_the_refilled_trend() -> None:
    feed = Feed(noise_ul=2.0)
    _refill_overtaking_a_reading(feed)
    feed.hours(30)
    st = feed.engine._pumps["P-000001"].state["flow"]
    assert st.trend_whole is not None
    got = st.trend_whole.slope()
    assert got is not None and got[1] < 0.01  # 2 uL of noise, not a 2.4 mL step
    assert only(feed.findings, "flow_not_observable") == []
    assert only(feed.findings, "under_infusion") == []
    assert only(feed.findings, "over_infusion") == []


def test_after_the_agent_loses_its_seq_store_the_trend_follows_the_new_seqs() -> None:
    feed = Feed(noise_ul=2.0)
    _refill_overtaking_a_reading(feed)
    feed.hours(2)
    feed.seq = 0  # reinstalled: seqs below the refill's (37) for the next 6 h
    feed.hours(3)
    st = feed.engine._pumps["P-000001"].state["flow"]
    assert st.trend_whole is not None and st.trend_whole.n == 18  # begun again with the seqs
    feed.hours(27)
    feed.flow_factor = 0.5
    feed.hours(12)
    assert only(feed.findings, "under_infusion") == [(True, "high")]


@pytest.mark.parametrize("flow_factor", [0.7, 0.5, 0.0])
def test_under_infusion_from_the_measured_trend(flow_factor: float) -> None:
    feed = Feed(noise_ul=2.0)
    feed.hours(24)
    feed.flow_factor = flow_factor  # 0.7: -30 %; 0.5 a partial kink; 0: complete occlusion
    feed.hours(12)
    assert only(feed.findings, "under_infusion") == [(True, "high")]


def test_a_complete_occlusion_through_2ul_of_noise_is_seen_within_hours() -> None:
    feed = Feed(noise_ul=2.0)
    feed.hours(24)
    feed.flow_factor = 0.0
    found = feed.hours(6)
    assert only(found, "under_infusion") == [(True, "high")]


def test_calculated_volume_pumps_get_a_standing_notice_and_no_trend() -> None:
    feed = Feed(family="calculated")
    found = feed.telemetry()
    assert only(found, "flow_not_observable") == [(True, "info")]
    feed.flow_factor = 0.0  # an occlusion: the calculated volume falls on regardless
    feed.hours(72)
    assert only(feed.findings, "under_infusion") == []
    assert only(feed.findings, "flow_not_observable") == [(True, "info")]


def test_a_measured_pump_too_noisy_for_its_flow_says_so() -> None:
    feed = Feed(dose_mcg_per_day=60.0, noise_ul=40.0)
    feed.hours(30)
    assert only(feed.findings, "flow_not_observable") == [(True, "info")]
    assert next(f for f in feed.findings).details["reason"] == "noisy_sensor"


# over_infusion / under_infusion: delivery counts -----------------------------------------------


@pytest.mark.parametrize(
    ("factor", "rule"),
    [
        (0.01, "under_infusion"),
        (0.5, "under_infusion"),
        (1.3, "over_infusion"),
        (2.0, "over_infusion"),
    ],
)
@pytest.mark.parametrize("family", ["calculated", "measured"])
def test_rotor_counts_against_the_programme_on_every_family(
    factor: float, rule: str, family: str
) -> None:
    feed = Feed(family=family)  # type: ignore[arg-type]
    feed.hours(6)
    found = feed.hours(6, delivered_ul_per_h=round(feed.rate_ul_per_h * factor, 3))
    assert only(found, rule) == [(True, "high")]
    finding = next(f for f in found if f.rule == rule)
    assert finding.details["cause"] == "delivery_counts"


def test_rotor_counts_within_the_label_raise_nothing() -> None:
    feed = Feed(family="calculated")
    feed.hours(48, delivered_ul_per_h=round(feed.rate_ul_per_h * 1.1, 3))
    assert only(feed.findings, "over_infusion") == []


def test_under_infusion_when_the_rotor_stands_still_while_programmed() -> None:
    feed = Feed()
    feed.hours(1)
    feed.state = PumpState.STALLED
    early = feed.telemetry() + feed.telemetry()  # 10 minutes of zero: not yet
    assert only(early, "under_infusion") == []
    found = feed.hours(0.5)
    assert only(found, "under_infusion") == [(True, "high")]
    assert "No delivery while programmed" in next(f for f in found).summary


def test_under_infusion_not_while_suspended_or_programmed_to_zero() -> None:
    feed = Feed()
    feed.hours(1)
    feed.state = PumpState.SUSPENDED
    feed.hours(2)
    zero = Feed(pump_id="P-000002", dose_mcg_per_day=0.0)
    zero.hours(3)
    assert feed.findings == [] and zero.findings == []


def test_under_infusion_stall_ends_after_delivery_resumes_for_the_off_hold() -> None:
    feed = Feed()
    feed.hours(1)
    feed.state = PumpState.STALLED
    feed.hours(1)
    feed.state = PumpState.INFUSING
    assert only(feed.hours(0.2), "under_infusion") == []
    assert only(feed.hours(1), "under_infusion") == [(False, "high")]


@pytest.mark.parametrize(
    "alarm", [PumpAlarm.EOS, PumpAlarm.EMPTY_RESERVOIR, PumpAlarm.CRITICAL_MEMORY_ERROR]
)
def test_one_cause_one_page_the_stop_rides_on_the_critical_alarm(alarm: PumpAlarm) -> None:
    feed = Feed()
    feed.hours(1)
    feed.raise_alarm(alarm)
    feed.state = PumpState.STOPPED
    feed.hours(6)
    assert only(feed.findings, "under_infusion") == []
    critical = [f for f in feed.findings if f.rule == "critical_pump_alarm"]
    assert (critical[0].active, critical[0].priority) == (True, "high")
    assert critical[-1].details["inhibited"][0]["rule"] == "under_infusion"


# pocket_fill ------------------------------------------------------------------------------------


def test_pocket_fill_on_a_measured_40ml_pump_above_2ml_until_a_clean_refill() -> None:
    feed = Feed()
    feed.hours(1)
    found = feed.refill(expected_ml=29.9, withdrawn_ml=29.9, injected_ml=40.0, after_ml=32.0)
    assert only(found, "pocket_fill") == [(True, "high")]
    pocket = next(f for f in found if f.rule == "pocket_fill")
    assert pocket.details["gap_ml"] == 8.0
    assert "pocket fill" in pocket.summary
    feed.hours(24)
    assert only(feed.refill(expected_ml=31.7, withdrawn_ml=31.7), "pocket_fill") == [
        (False, "high")
    ]


@pytest.mark.parametrize(
    ("capacity_ml", "gap_ml", "fires"),
    [(20.0, 0.9, False), (20.0, 1.1, True), (40.0, 1.9, False), (40.0, 2.1, True)],
)
def test_pocket_fill_just_under_and_just_over_the_limit(
    capacity_ml: float, gap_ml: float, fires: bool
) -> None:
    feed = Feed(capacity_ml=capacity_ml, reservoir_ml=capacity_ml / 2)
    feed.hours(1)
    found = feed.refill(9.9, 9.9, injected_ml=capacity_ml, after_ml=capacity_ml - gap_ml)
    assert only(found, "pocket_fill") == ([(True, "high")] if fires else [])


def test_pocket_fill_on_a_calculated_pump_shows_only_at_the_next_refill() -> None:
    feed = Feed(family="calculated")
    feed.hours(1)
    # 8 mL went beside the pump; the clinician entered 40 and the pump takes it on trust.
    assert only(feed.refill(29.9, 29.9, injected_ml=40.0), "pocket_fill") == []
    feed.hours(1)
    found = feed.refill(expected_ml=39.7, withdrawn_ml=31.7)
    assert only(found, "refill_discrepancy") == [(True, "medium")]
    assert "pocket fill at the previous refill" in found[0].summary


# refill_discrepancy -------------------------------------------------------------------------------


def test_refill_discrepancy_medium_then_high_when_repeated_then_ends() -> None:
    feed = Feed()
    feed.hours(1)
    first = feed.refill(expected_ml=29.9, withdrawn_ml=26.8)
    assert only(first, "refill_discrepancy") == [(True, "medium")]
    assert first[0].details["discrepancy_ml"] == pytest.approx(3.1)
    second = feed.refill(expected_ml=36.0, withdrawn_ml=33.0)
    assert only(second, "refill_discrepancy") == [(True, "high")]
    assert "2 refills in a row" in second[0].summary
    third = feed.refill(expected_ml=36.0, withdrawn_ml=35.9)
    assert only(third, "refill_discrepancy") == [(False, "high")]


def test_refill_discrepancy_not_within_2ml() -> None:
    feed = Feed()
    feed.hours(1)
    assert only(feed.refill(expected_ml=29.9, withdrawn_ml=28.2), "refill_discrepancy") == []
    feed.refill(expected_ml=30.0, withdrawn_ml=30.0, injected_ml=10.0)
    # 10 -> 5 mL expected: 0.9 mL off is 18 % of 5 mL but under the 2 mL a syringe can miss by
    assert only(feed.refill(expected_ml=5.0, withdrawn_ml=4.1), "refill_discrepancy") == []


def _refills(feed: Feed, bias: float, n: int, entry_sd_ml: float = 0.3, seed: int = 3) -> list:
    """n refill cycles of a 40 mL pump filled to 40, infusing 30 mL by its rotor count, whose
    true flow is (1 + bias) times that, with the clinician's reading error."""
    import random

    rng = random.Random(seed)
    found = []
    for _ in range(n):
        feed.hours(1)
        true_left = 40.0 - 30.0 * (1 + bias)
        withdrawn = max(0.0, true_left + rng.gauss(0.0, entry_sd_ml))
        found += feed.refill(expected_ml=10.0, withdrawn_ml=round(withdrawn, 2))
    return found


def test_a_pump_with_a_plus_8_percent_bias_inside_the_label_does_not_page_at_every_refill() -> None:
    feed = Feed(family="calculated")
    feed.refill(30.0, 30.0)
    found = _refills(feed, bias=0.08, n=8)
    assert only(found, "refill_discrepancy") == []


def test_a_pump_outside_the_label_pages_and_repeats_high() -> None:
    feed = Feed(family="calculated")
    feed.refill(30.0, 30.0)
    found = _refills(feed, bias=0.20, n=2)
    assert only(found, "refill_discrepancy") == [(True, "medium"), (True, "high")]


def test_a_change_from_the_learned_bias_fires_inside_the_label() -> None:
    feed = Feed(family="calculated")
    feed.refill(30.0, 30.0)
    assert only(_refills(feed, bias=-0.05, n=3), "refill_discrepancy") == []
    found = _refills(feed, bias=0.09, n=1, seed=9)  # -5 % to +9 %: 5 mL, inside +-14.5 %
    assert only(found, "refill_discrepancy") == [(True, "medium")]
    assert found[0].details["departs_from_bias"] is True


def test_a_drift_across_refills_under_the_limit_raises_a_low_alert() -> None:
    feed = Feed(family="calculated")
    feed.refill(30.0, 30.0)
    found = []
    for i, bias in enumerate((0.0, 0.03, 0.06, 0.09)):
        found += _refills(feed, bias=bias, n=1, entry_sd_ml=0.0, seed=i)
    assert (True, "low") in only(found, "refill_discrepancy")
    assert all(p == "low" for _, p in only(found, "refill_discrepancy"))


# post_mri ---------------------------------------------------------------------------------------


def test_post_mri_notice_escalates_low_medium_high_from_the_watchdog_with_nothing_sent() -> None:
    feed = Feed()
    feed.hours(1)
    feed.mri()
    feed.tick(0)  # starts the watchdog
    ended = feed.now
    assert only(feed.tick(14 * 60), "post_mri") == []  # recoveries at once raise nothing
    assert only(feed.tick(2 * 60), "post_mri") == [(True, "low")]
    assert only(feed.tick(6 * 3600 - 16 * 60), "post_mri") == [(True, "medium")]
    assert only(feed.tick(18 * 3600 - 60), "post_mri") == []
    found = [f for f in feed.tick(60) if f.rule == "post_mri"]
    assert only(found, "post_mri") == [(True, "high")]
    assert found[0].seq is None and found[0].at == ended + timedelta(hours=24)
    assert "24 h" in found[0].summary


def test_post_mri_from_telemetry_too_and_ends_on_a_late_recovery() -> None:
    feed = Feed()
    feed.hours(1)
    feed.mri()
    feed.hours(24)
    assert only(feed.findings, "post_mri") == [(True, "low"), (True, "medium"), (True, "high")]
    assert only(feed.findings, "under_infusion") == []  # the MRI stall is post_mri's
    assert only(feed.recover(), "post_mri") == [(False, "high")]


def test_post_mri_recovery_within_hours_is_a_low_notice_that_ends() -> None:
    feed = Feed()
    feed.hours(1)
    feed.mri()
    feed.hours(4)
    feed.recover()
    feed.hours(30)
    feed.tick(0)
    assert only(feed.findings, "post_mri") == [(True, "low"), (False, "low")]
    assert [f.rule for f in feed.findings if f.rule != "post_mri"] == []


def test_post_mri_telemetry_showing_delivery_again_counts_as_a_recovery_logged_late() -> None:
    feed = Feed()
    feed.hours(1)
    feed.mri()
    feed.hours(4)
    feed.state = PumpState.INFUSING  # recovery record logged late, or lost
    feed.hours(30)
    assert only(feed.findings, "post_mri") == [(True, "low"), (False, "low")]


# low_reservoir ----------------------------------------------------------------------------------


def test_low_reservoir_at_the_pumps_alarm_volume() -> None:
    feed = Feed(reservoir_ml=1.8)
    found = feed.telemetry()
    assert only(found, "low_reservoir") == [(True, "medium")]
    low = next(f for f in found if f.rule == "low_reservoir")
    assert low.summary == "Reservoir 1.8 mL at or below alarm volume 2.0 mL"
    assert low.details["reservoir_ml"] == pytest.approx(1.798, abs=1e-3)
    assert low.details["alarm_ml"] == 2.0


def test_low_reservoir_not_above_the_alarm_volume() -> None:
    feed = Feed(reservoir_ml=2.2)
    feed.hours(2)
    assert only(feed.findings, "low_reservoir") == []


def test_low_reservoir_per_pump_override_and_high_risk_profile() -> None:
    engine = RuleEngine(
        profiles={
            "P-000001": PumpProfile(pump_id="P-000001", overrides={"low_reservoir_alarm_ml": 4}),
            "P-000002": PumpProfile(pump_id="P-000002", high_risk=True),
        }
    )
    for pump_id in ("P-000001", "P-000002", "P-000003"):
        feed = Feed(engine, pump_id, reservoir_ml=3.9, profile=None)
        found = only(feed.telemetry(), "low_reservoir")
        assert found == ([] if pump_id == "P-000003" else [(True, "medium")])


def test_low_reservoir_wobble_does_not_flap_and_a_refill_ends_it() -> None:
    feed = Feed(reservoir_ml=2.0)
    feed.telemetry()
    for value in (2.2, 1.99, 2.3, 2.0):
        feed.telemetry(reservoir_ml=value)
    feed.refill(expected_ml=2.0, withdrawn_ml=2.0)
    feed.hours(0.5)
    assert only(feed.findings, "low_reservoir") == [(True, "medium"), (False, "medium")]


# refill_due -------------------------------------------------------------------------------------


def test_refill_due_medium_within_7_days_then_high_within_3_with_the_flow_margin() -> None:
    feed = Feed(reservoir_ml=3.8)  # measured: (3.8 - 2) / (0.25 x 1.145) mL/day = 6.3 days
    found = feed.telemetry()
    assert only(found, "refill_due") == [(True, "medium")]
    assert "6.3 days" in found[0].summary
    feed.true_ml = 2.8  # 2.8 days
    assert only(feed.telemetry(), "refill_due") == [(True, "high")]


def test_refill_due_not_beyond_7_days() -> None:
    feed = Feed(reservoir_ml=4.1)  # 7.3 days
    feed.hours(2)
    assert only(feed.findings, "refill_due") == []


def test_refill_due_uses_the_daily_dose_not_the_current_flex_step() -> None:
    feed = Feed(reservoir_ml=4.1)
    feed.hours(1, programmed_rate_ul_per_h=30.0)  # a fast flex step; the day's dose is 500
    assert only(feed.findings, "refill_due") == []


def test_refill_due_counts_the_patients_average_boluses() -> None:
    feed = Feed(reservoir_ml=4.5)  # 8.4 days at the programmed 0.25 mL/day with the margin
    feed.hours(1)
    found = []
    for _ in range(10):  # 10 x 100 mcg = 0.5 mL; over the 7-day average, 0.07 mL/day
        found += feed.bolus(100.0)
    found += feed.telemetry()
    assert only(found, "refill_due") == [(True, "medium")]
    # judged on every message: it fired at the 9th bolus
    assert found[0].details["daily_ml"] == pytest.approx(0.25 + 0.45 / 7, abs=1e-3)


def test_refill_due_ends_an_hour_after_a_refill() -> None:
    feed = Feed(reservoir_ml=2.5)
    feed.telemetry()
    feed.refill(expected_ml=2.5, withdrawn_ml=2.5)
    assert only(feed.hours(0.5), "refill_due") == []
    assert only(feed.hours(1), "refill_due") == [(False, "high")]


def test_refill_due_warns_a_calculated_pump_with_a_plus_12_percent_bias_before_it_runs_dry() -> (
    None
):
    """40 mL at 0.503 mL/day by the rotor, true flow +12 %: dry on day 71 while the pump's own
    estimate still says 4.3 mL. The worst-case projection warns on day 59 (medium, 12 days
    before dry) and pages on day 63 (high, 8 days before)."""
    dose = 0.503 * 2000.0  # mcg/day for 0.503 mL/day at 2000 mcg/mL
    feed = Feed(family="calculated", reservoir_ml=40.0, dose_mcg_per_day=dose, interval_s=3600.0)
    feed.refill(40.0, 40.0, injected_ml=40.0)
    feed.flow_factor = 1.12
    days: dict[str, float] = {}
    dry_day = None
    for hour in range(1, 75 * 24):
        for f in feed.telemetry():
            if f.rule == "refill_due" and f.active:
                days.setdefault(f.priority, hour / 24)
        if dry_day is None and feed.true_ml <= 0:
            dry_day = hour / 24
    assert dry_day is not None and dry_day == pytest.approx(71.0, abs=0.5)
    assert dry_day - days["medium"] >= 10
    assert dry_day - days["high"] >= 7


# battery ----------------------------------------------------------------------------------------


def test_battery_eri_medium_then_high_14_days_before_eos() -> None:
    feed = Feed()
    feed.hours(1)
    feed.eri = True
    found = feed.raise_alarm(PumpAlarm.ERI)
    assert only(found, "battery") == [(True, "medium")]
    assert "EOS in about 90 days" in found[0].summary
    feed.telemetry(dt_s=75 * 86_400)
    assert only(feed.telemetry(dt_s=86_400), "battery") == [(True, "high")]


def test_battery_eri_of_a_v1_pump_already_active_at_first_sight_stays_medium() -> None:
    feed = Feed(v=1)
    feed.eri = True
    found = feed.telemetry()
    assert only(found, "battery") == [(True, "medium")]
    assert "before monitoring" in found[0].summary
    feed.telemetry(dt_s=85 * 86_400)
    assert only(feed.findings, "battery") == [(True, "medium")]


def test_battery_eri_that_began_before_monitoring_is_high_14_days_before_eos() -> None:
    feed = Feed()
    feed.eri = True
    feed.eri_since = feed.now - timedelta(days=70)  # the pump's own ERI date (contract v2)
    assert only(feed.telemetry(), "battery") == [(True, "medium")]
    feed.telemetry(dt_s=6 * 86_400)
    assert only(feed.findings, "battery") == [(True, "medium"), (True, "high")]


def test_battery_high_survives_a_restart_long_after_eri_began() -> None:
    feed = Feed()
    feed.eri = True
    feed.eri_since = feed.now - timedelta(days=80)
    msg = feed.telemetry_msg()
    fresh = RuleEngine()  # alerting restarted: only the last hours are replayed
    found = fresh.observe(msg)
    assert only(found, "battery") == [(True, "high")]


def test_battery_eos_is_high_and_no_eri_no_alert() -> None:
    feed = Feed()
    feed.hours(1)
    assert only(feed.findings, "battery") == []
    feed.eri = True
    feed.raise_alarm(PumpAlarm.ERI)
    assert only(feed.raise_alarm(PumpAlarm.EOS), "battery") == [(True, "high")]


# large_dose_change ----------------------------------------------------------------------------


def test_large_dose_change_from_a_reprogram_once_and_over_after_24h() -> None:
    feed = Feed(dose_mcg_per_day=400.0)
    feed.hours(1)
    found = feed.reprogram(600.0)
    assert only(found, "large_dose_change") == [(True, "low")]
    assert found[0].summary == ("Programmed dose changed 400 -> 600 mcg/day (+50 %, limit 20 %)")
    feed.hours(23.5)  # telemetry carries the new dose: no second finding
    assert only(feed.findings, "large_dose_change") == [(True, "low")]
    feed.tick(0)
    assert only(feed.tick(3600), "large_dose_change") == [(False, "low")]


def test_large_dose_change_not_within_20_percent() -> None:
    feed = Feed(dose_mcg_per_day=400.0)
    feed.hours(1)
    feed.reprogram(440.0)
    feed.hours(1)
    assert only(feed.findings, "large_dose_change") == []


def test_large_dose_change_from_telemetry_when_the_event_is_missing() -> None:
    feed = Feed(dose_mcg_per_day=400.0)
    feed.hours(1)
    feed.dose_mcg_per_day = 600.0
    found = feed.telemetry()
    assert only(found, "large_dose_change") == [(True, "low")]
    assert found[0].details["source"] == "telemetry"
    assert only(found, "critical_pump_alarm") == []  # a rise is not a battery reset


# Thresholds from configuration ------------------------------------------------------------------


def test_thresholds_change_what_fires() -> None:
    strict = Thresholds(large_dose_change_fraction=0.05)
    feed = Feed(RuleEngine(strict), dose_mcg_per_day=400.0)
    feed.hours(1)
    assert only(feed.reprogram(440.0), "large_dose_change") == [(True, "low")]


def test_the_running_trend_sums_match_a_fresh_sum_of_the_window() -> None:
    from ingest.rules._flow import _window

    feed = Feed(noise_ul=3.0)
    feed.hours(24 * 20)
    st = feed.engine._pumps["P-000001"].state["flow"]
    th = feed.engine.thresholds
    fresh = _window(st, feed.now.timestamp(), th.trend_window_s, th.trend_bucket_s)
    assert fresh is not None and st.trend_whole is not None
    running, merged = st.trend_whole.slope(), fresh.slope()
    assert running is not None and merged is not None
    assert running == pytest.approx(merged, rel=1e-6)  # float sums drift, far below noise
    assert st.trend_whole.n == fresh.n
