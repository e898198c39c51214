"""The engine around the rules: seqs, the silence watchdog, restarts, state size, reporting."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ingest.rules import PumpProfile, RuleEngine, Thresholds
from ingest.rules.tests.feed import Feed, only
from pumpfleet.contract import PumpAlarm, Refill

STATE_LIMIT_BYTES = 16 * 1024
"""Per pump: the last reading, 6 h of hourly delivery counts, 24 h of 2-hourly trend sums, the
refill book; measured at about 13 kB (README.md, 'Performance'). A million pumps: about 13 GB."""

# sequence_gap -----------------------------------------------------------------------------------


def test_sequence_gap_fires_once_the_missing_seq_is_overdue() -> None:
    feed = Feed()
    feed.hours(1)
    feed.skip()
    assert only(feed.hours(0.5), "sequence_gap") == []  # may still arrive late
    found = feed.hours(0.5)
    assert only(found, "sequence_gap") == [(True, "low")]
    gap = next(f for f in found if f.rule == "sequence_gap")
    assert gap.details == {"lost_messages": 1, "first_seq": 6, "last_seq": 6}


def test_sequence_gap_filled_by_a_late_arrival_stays_silent() -> None:
    feed = Feed()
    feed.hours(1)
    late = feed.telemetry_msg()
    feed.hours(0.3)
    assert feed.engine.observe(late) == []
    feed.hours(3)
    assert feed.findings == []


def test_sequence_gap_ends_when_the_lost_message_turns_up_or_after_6h() -> None:
    feed = Feed()
    feed.hours(1)
    late = feed.telemetry_msg()
    feed.hours(1)
    assert only(feed.findings, "sequence_gap") == [(True, "low")]
    assert only(feed.engine.observe(late), "sequence_gap") == [(False, "low")]

    other = Feed(pump_id="P-000002")
    other.hours(1)
    other.skip(3)
    other.hours(7.5)
    assert only(other.findings, "sequence_gap") == [(True, "low"), (False, "low")]


def test_duplicates_and_redeliveries_are_ignored() -> None:
    feed = Feed()
    feed.hours(1)
    msg = feed.telemetry_msg(reservoir_ml=1.5)
    assert only(feed.engine.observe(msg), "low_reservoir") == [(True, "medium")]
    for _ in range(3):
        assert feed.engine.observe(msg) == []
    feed.hours(3)
    assert only(feed.findings, "sequence_gap") == []


def test_a_redelivered_refill_does_not_look_like_a_repeated_discrepancy() -> None:
    feed = Feed()
    feed.hours(1)
    refill = feed.event_msg(
        Refill,
        event="refill",
        expected_ml=29.9,
        withdrawn_ml=26.8,
        injected_ml=40.0,
        reservoir_after_ml=40.0,
        concentration_mcg_per_ml=2000.0,
    )
    assert only(feed.engine.observe(refill), "refill_discrepancy") == [(True, "medium")]
    assert feed.engine.observe(refill) == []
    assert feed.engine.active("P-000001")["refill_discrepancy"] == "medium"


def test_out_of_order_telemetry_causes_no_trend_alert_or_gap() -> None:
    feed = Feed()
    feed.hours(4)
    for _ in range(10):  # every other reading arrives 20 min late
        held = feed.telemetry_msg()
        feed.telemetry()
        feed.telemetry()
        feed.engine.observe(held)
    feed.hours(6)
    assert feed.findings == []


def test_the_seq_reserved_for_the_agents_last_will_is_not_a_gap() -> None:
    feed = Feed()
    feed.status(online=True)  # seq N; N+1 is the will, published only on disconnect
    feed.skip()
    feed.hours(3)
    assert only(feed.findings, "sequence_gap") == []


def test_an_agent_that_starts_its_seqs_again_is_followed_not_ignored() -> None:
    feed = Feed()
    feed.hours(2)
    feed.seq = 0  # agent reinstalled: its seq store is gone
    feed.hours(2)
    found = feed.telemetry(reservoir_ml=1.5)
    assert only(found, "low_reservoir") == [(True, "medium")]
    assert only(feed.findings, "sequence_gap") == []


@pytest.mark.parametrize("held", [3, 20, 200])
def test_an_event_that_overtakes_the_readings_before_it_loses_nothing(held: int) -> None:
    """The urgent lane stores a pump's event while `held` readings before it (up to 33 h of
    them: a backlog after an outage) still wait in the main lane: no gap, every reading judged."""
    feed = Feed()
    feed.hours(1)
    backlog = [feed.telemetry_msg() for _ in range(held - 1)]
    backlog.append(feed.telemetry_msg(reservoir_ml=1.5))
    stall = feed.stall()  # the event, stored first
    assert only(stall, "critical_pump_alarm") == [(True, "high")]
    assert feed.tick(3 * 3600) == []  # other pumps' readings move the fleet clock on
    for m in backlog:
        feed.findings += feed.engine.observe(m)
    feed.hours(2)
    assert only(feed.findings, "sequence_gap") == []
    assert only(feed.findings, "low_reservoir")[:1] == [(True, "medium")]  # the backlog's last


@pytest.mark.parametrize("held", [3, 200])
def test_what_never_follows_an_overtaking_event_is_lost_on_the_pumps_readings(held: int) -> None:
    feed = Feed()
    feed.hours(1)
    backlog = [feed.telemetry_msg() for _ in range(held)]
    feed.stall()
    for m in backlog[1:]:  # the first of them never arrives
        feed.findings += feed.engine.observe(m)
    assert only(feed.findings, "sequence_gap") == []
    feed.hours(0.4)
    assert only(feed.findings, "sequence_gap") == []  # 30 min of the pump's readings not yet
    found = feed.hours(0.2)
    assert only(found, "sequence_gap") == [(True, "low")]
    assert next(f for f in found if f.rule == "sequence_gap").details["lost_messages"] == 1


def test_a_huge_gap_is_lost_at_once_without_remembering_every_seq() -> None:
    feed = Feed()
    feed.hours(1)
    feed.seq += 100_000
    found = feed.telemetry()
    assert only(found, "sequence_gap") == [(True, "low")]
    assert feed.engine.state_size("P-000001") < STATE_LIMIT_BYTES


# telemetry_silence --------------------------------------------------------------------------------


def test_silence_low_after_3_intervals_medium_after_24h_and_ends_on_a_message() -> None:
    feed = Feed()
    feed.hours(1)
    assert feed.tick(0) == []  # the watchdog starts
    assert feed.tick(1800 + 119) == []
    found = feed.tick(2)
    assert only(found, "telemetry_silence") == [(True, "low")]
    assert found[0].seq is None and found[0].at == feed.now
    assert "No message for 32 min" in found[0].summary
    assert only(feed.tick(22 * 3600), "telemetry_silence") == []
    assert only(feed.tick(2 * 3600), "telemetry_silence") == [(True, "medium")]
    assert only(feed.telemetry(dt_s=60), "telemetry_silence") == [(False, "medium")]


def test_silence_follows_the_pumps_reporting_interval() -> None:
    profile = PumpProfile(pump_id="P-000001", reporting_interval_s=60)
    engine = RuleEngine(profiles={"P-000001": profile})
    feed = Feed(engine, interval_s=60)
    feed.hours(0.5)
    feed.tick(0)
    assert only(feed.tick(3 * 60 + 121), "telemetry_silence") == [(True, "low")]


def test_silence_a_pump_that_reports_raises_nothing() -> None:
    feed = Feed()
    for _ in range(36):
        feed.telemetry()
        feed.tick(0)
    assert feed.findings == []


def test_no_silence_storm_after_a_restart() -> None:
    engine = RuleEngine()
    feeds = [Feed(engine, f"P-{i:06d}") for i in range(1, 51)]
    for feed in feeds:
        for _ in range(6):
            engine.warm(feed.telemetry_msg())
    later = feeds[-1].now + timedelta(hours=5)
    assert engine.tick(later) == []  # 5 h after the last message, but the watchdog just began
    for feed in feeds[:49]:
        feed.now = later
        feed.telemetry()
    found = engine.tick(later + timedelta(seconds=2000))
    assert [(f.pump_id, f.rule, f.priority) for f in found] == [
        ("P-000050", "telemetry_silence", "low")
    ]


def test_silence_counts_from_arrival_when_received_at_is_given() -> None:
    feed = Feed()
    msg = feed.telemetry_msg()
    arrival = msg.time + timedelta(hours=2)  # held back in a queue
    feed.engine.tick(arrival)
    feed.engine.observe(msg, received_at=arrival)
    assert feed.engine.tick(arrival + timedelta(seconds=1800)) == []


# Restarts: warm() and restore() -------------------------------------------------------------------


def test_warm_rebuilds_open_conditions_silently_so_nothing_is_raised_twice() -> None:
    engine = RuleEngine()
    feed = Feed(engine, reservoir_ml=1.9)
    for _ in range(6):
        engine.warm(feed.telemetry_msg())
    assert engine.active("P-000001") == {"low_reservoir": "medium", "refill_due": "high"}
    assert feed.hours(1) == []
    feed.refill(expected_ml=1.6, withdrawn_ml=1.6)
    ends = feed.hours(1.5)
    assert {(f.rule, f.active) for f in ends} == {
        ("low_reservoir", False),
        ("refill_due", False),
    }


def test_restore_lets_the_engine_end_an_alert_whose_cause_left_the_history() -> None:
    engine = RuleEngine()
    feed = Feed(engine)
    engine.restore("P-000001", "pocket_fill", "high")
    engine.restore("P-000001", "critical_pump_alarm", "high")
    feed.hours(1)
    assert only(feed.findings, "critical_pump_alarm") == [(False, "high")]
    assert only(feed.refill(expected_ml=29.7, withdrawn_ml=29.7), "pocket_fill") == [
        (False, "high")
    ]
    with pytest.raises(ValueError, match="not one of"):
        engine.restore("P-000001", "nonsense", "low")


def test_restored_silence_escalates_on_the_real_silence_length() -> None:
    engine = RuleEngine()
    feed = Feed(engine)
    engine.warm(feed.telemetry_msg())
    engine.restore("P-000001", "telemetry_silence", "low")
    feed.tick(20 * 3600)  # the watchdog starts 20 h into the silence
    assert only(feed.tick(4 * 3600), "telemetry_silence") == [(True, "medium")]


# Reporting and state --------------------------------------------------------------------------


def test_a_standing_condition_is_reported_once_not_per_message() -> None:
    feed = Feed(reservoir_ml=1.0)
    feed.hours(24)
    assert only(feed.findings, "low_reservoir") == [(True, "medium")]
    assert len(feed.findings) == 2  # and refill_due high


def test_healthy_pump_state_is_small_and_does_not_grow() -> None:
    feed = Feed(noise_ul=2.0)
    feed.hours(30)  # every window full
    size = feed.engine.state_size("P-000001")
    feed.hours(72)
    assert size < STATE_LIMIT_BYTES
    assert feed.engine.state_size("P-000001") <= size + 256


def test_set_profile_applies_to_that_pump_only() -> None:
    engine = RuleEngine(Thresholds())
    engine.set_profile(
        PumpProfile(pump_id="P-000001", overrides={"low_reservoir_alarm_ml": 3.0}, high_risk=False)
    )
    one = Feed(engine, "P-000001", reservoir_ml=2.9, profile=None)
    two = Feed(engine, "P-000002", reservoir_ml=2.9, profile=None)
    assert only(one.telemetry(), "low_reservoir") == [(True, "medium")]
    assert only(two.telemetry(), "low_reservoir") == []
    engine.set_profile(PumpProfile(pump_id="P-000002", low_reservoir_alarm_ml=3.5))
    assert only(two.telemetry(), "low_reservoir") == [(True, "medium")]


def test_findings_carry_the_deciding_message() -> None:
    feed = Feed()
    feed.hours(1)
    found = feed.raise_alarm(PumpAlarm.EOS)
    assert found[0].seq == feed.seq - 1
    assert found[0].at == feed.now
    assert found[0].pump_id == "P-000001"


def test_the_pumps_own_reporting_interval_wins_over_a_wrong_registry_value() -> None:
    feed = Feed(
        interval_s=3600.0, profile=PumpProfile(pump_id="P-000001", reporting_interval_s=600)
    )
    feed.hours(6)
    feed.tick(0)
    assert only(feed.tick(3 * 600 + 121), "telemetry_silence") == []  # an hourly pump
    assert only(feed.tick(3 * 3600), "telemetry_silence") == [(True, "low")]


def test_a_pump_without_a_profile_gets_a_notice_not_a_guess() -> None:
    feed = Feed(v=1, profile=None, interval_s=3600.0)
    found = feed.telemetry()
    assert only(found, "clinic_data_missing") == [(True, "info")]
    notice = next(f for f in found if f.rule == "clinic_data_missing")
    assert notice.details["missing"] == ["high_risk", "reporting_interval"]
    assert "high-risk status unknown" in notice.summary
    v2 = Feed(pump_id="P-000002", profile=None, interval_s=3600.0)
    v2.hours(12)
    v2.tick(0)
    assert only(v2.tick(3 * 600 + 121), "telemetry_silence") == []  # no false silence hourly
    assert only(v2.findings, "clinic_data_missing") == [(True, "info")]
    assert v2.findings[0].details["missing"] == ["high_risk"]


def test_a_new_reporting_interval_moves_the_silence_deadline() -> None:
    feed = Feed(v=1)
    feed.hours(1)
    feed.tick(0)
    feed.engine.set_profile(PumpProfile(pump_id="P-000001", reporting_interval_s=60))
    assert only(feed.tick(3 * 60 + 121), "telemetry_silence") == [(True, "low")]


# Defects found by trying it (issue: alerts that hold on what a real pump reports) -------------


def test_a_second_silence_of_the_same_pump_is_reported_on_time() -> None:
    feed = Feed()
    feed.hours(1)
    feed.tick(0)
    assert only(feed.tick(1800 + 121), "telemetry_silence") == [(True, "low")]
    assert only(feed.telemetry(), "telemetry_silence") == [(False, "low")]
    feed.hours(2)
    feed.tick(0)
    # A 12 h outage starts: it is reported 32 min in, not 20 h later.
    assert only(feed.tick(1800 + 121), "telemetry_silence") == [(True, "low")]


def test_a_noncritical_memory_error_raises_a_low_alert() -> None:
    feed = Feed()
    feed.hours(1)
    found = feed.raise_alarm(PumpAlarm.NONCRITICAL_MEMORY_ERROR)
    assert only(found, "noncritical_pump_alarm") == [(True, "low")]
    assert only(found, "critical_pump_alarm") == []
    feed.clear_alarm(PumpAlarm.NONCRITICAL_MEMORY_ERROR)
    feed.hours(1)
    assert only(feed.findings, "noncritical_pump_alarm") == [(True, "low"), (False, "low")]


def test_a_high_risk_pump_without_a_profile_is_told_not_guessed() -> None:
    feed = Feed(profile=None, alarm_ml=2.0, reservoir_ml=3.0)
    found = feed.telemetry()
    notice = next(f for f in found if f.rule == "clinic_data_missing")
    assert notice.details["alarm_ml"] == 2.0 and notice.details["alarm_ml_from"] == "pump"
    feed.engine.set_profile(PumpProfile(pump_id="P-000001", high_risk=True))
    found = feed.telemetry()
    assert only(found, "clinic_data_missing") == [(False, "info")]
    assert only(found, "low_reservoir") == [(True, "medium")]  # 4 mL for high risk
