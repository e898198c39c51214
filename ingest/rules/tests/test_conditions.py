"""Each rule's verdict alone, on plain figures: a case that fires and one that must not."""

from __future__ import annotations

import math

import pytest

from ingest.rules import PumpProfile, Thresholds
from ingest.rules import conditions as c
from pumpfleet.contract import PumpState

TH = Thresholds()


def test_trend_outside_labelled_accuracy_is_over_or_under() -> None:
    assert c.trend_verdict(52.0, 41.7, 0.145, 1.0) == "over"  # +25 %
    assert c.trend_verdict(29.0, 41.7, 0.145, 1.0) == "under"  # -30 %
    assert c.trend_verdict(0.0, 41.7, 0.145, 1.0) == "under"  # occlusion: reservoir flat


def test_trend_inside_accuracy_plus_resolution_is_ok() -> None:
    assert c.trend_verdict(41.7 * 1.04, 41.7, 0.145, 1.0) == "ok"  # a +4 % pump
    assert c.trend_verdict(20.0 * 1.145 + 0.9, 20.0, 0.145, 1.0) == "ok"  # rounding slack
    assert c.trend_verdict(20.0 * 0.855 - 0.9, 20.0, 0.145, 1.0) == "ok"


def test_no_delivery_is_a_stall_unless_suspended_or_not_programmed() -> None:
    assert c.no_delivery(0.0, 10.4, PumpState.STALLED)
    assert c.no_delivery(0.0, 10.4, PumpState.STOPPED)
    assert not c.no_delivery(0.0, 10.4, PumpState.SUSPENDED)
    assert not c.no_delivery(0.0, 0.0, PumpState.INFUSING)
    assert not c.no_delivery(0.3, 10.4, PumpState.INFUSING)


@pytest.mark.parametrize(
    ("capacity_ml", "injected_ml", "limit_ml"),
    [(20.0, 20.0, 1.0), (40.0, 40.0, 2.0), (None, 35.0, 2.0), (None, 18.0, 1.0)],
)
def test_pocket_fill_limit_follows_the_reservoir_size(
    capacity_ml: float | None, injected_ml: float, limit_ml: float
) -> None:
    assert c.pocket_fill_limit_ml(capacity_ml, injected_ml, TH) == limit_ml


def test_pocket_fill_gap_above_the_limit() -> None:
    assert c.pocket_fill(40.0, 32.0, 2.0)
    assert c.pocket_fill(20.0, 18.9, 1.0)
    assert not c.pocket_fill(40.0, 38.5, 2.0)
    assert not c.pocket_fill(20.0, 19.0, 1.0)  # exactly at the limit


def test_refill_discrepancy_absolute_and_fraction_of_infused() -> None:
    assert c.refill_discrepant(5.2, 2.2, None, TH)  # 3 mL
    assert c.refill_discrepant(2.2, 5.2, None, TH)  # either sign
    assert not c.refill_discrepant(5.2, 3.5, None, TH)  # 1.7 mL, previous refill unknown
    assert c.refill_discrepant(5.0, 4.1, 5.0, TH)  # 0.9 of 5 mL infused: 18 %
    assert not c.refill_discrepant(5.0, 4.6, 5.0, TH)  # 0.4 mL: under the noise floor
    assert not c.refill_discrepant(5.0, 3.5, 36.0, TH)  # 1.5 of 36 mL: 4 %


def test_refill_due_levels_and_margin() -> None:
    assert c.refill_due_priority(2.9, None, TH) == "high"
    assert c.refill_due_priority(6.4, None, TH) == "medium"
    assert c.refill_due_priority(7.2, None, TH) is None
    assert c.refill_due_priority(7.2, "medium", TH) == "medium"  # open: margin before ending
    assert c.refill_due_priority(3.2, "high", TH) == "high"
    assert c.refill_due_priority(3.6, "high", TH) == "medium"
    assert c.refill_due_priority(None, "medium", TH) is None


def test_days_to_alarm_from_daily_volume() -> None:
    assert c.days_to_alarm(3.6, 2.0, 0.25) == pytest.approx(6.4)
    assert c.days_to_alarm(3.6, 2.0, 0.0) is None


def test_battery_levels() -> None:
    assert c.battery_priority(True, False, None, TH) == "medium"  # ERI, start unknown
    assert c.battery_priority(True, False, 60.0, TH) == "medium"
    assert c.battery_priority(True, False, 14.0, TH) == "high"
    assert c.battery_priority(True, True, None, TH) == "high"  # EOS
    assert c.battery_priority(False, False, None, TH) is None
    assert c.days_to_eos(0.0, 76 * 86_400.0, TH) == pytest.approx(14.0)
    assert c.days_to_eos(None, 0.0, TH) is None


def test_dose_change_fraction() -> None:
    assert c.dose_change_fraction(400, 600) == pytest.approx(0.5)
    assert c.dose_change_fraction(400, 440) == pytest.approx(0.1)
    assert c.dose_change_fraction(0, 100) == math.inf
    assert c.dose_change_fraction(0, 0) == 0.0


def test_silence_levels() -> None:
    assert c.silence_priority(1800.0, 600.0, TH) is None  # the reading due exactly now
    assert c.silence_priority(1800.0 + 121, 600.0, TH) == "low"
    assert c.silence_priority(86_400.0, 600.0, TH) == "medium"
    assert c.silence_priority(299.0, 60.0, TH) is None  # a 1-minute pump: 3 min + slack
    assert c.silence_priority(300.0, 60.0, TH) == "low"


def test_alarm_volume_precedence_and_high_risk() -> None:
    assert c.effective_alarm_ml(2.0, None, TH) == 2.0
    assert c.effective_alarm_ml(2.0, None, TH.with_overrides({"low_reservoir_alarm_ml": 3})) == 3
    profile = PumpProfile(pump_id="P-1", low_reservoir_alarm_ml=2.5)
    assert c.effective_alarm_ml(2.0, profile, TH) == 2.5
    assert c.effective_alarm_ml(4.0, profile, TH) == 4.0  # never below the pump's own
    assert c.effective_alarm_ml(None, profile, TH) == 2.5  # no reading yet
    risky = PumpProfile(pump_id="P-1", high_risk=True)
    assert c.effective_alarm_ml(2.0, risky, TH) == 4.0
    assert c.effective_alarm_ml(5.0, risky, TH) == 5.0  # never lowers the pump's own


def test_low_reservoir_with_clear_margin() -> None:
    assert c.low_reservoir(2.0, 2.0, False, TH)
    assert not c.low_reservoir(2.1, 2.0, False, TH)
    assert c.low_reservoir(2.4, 2.0, True, TH)  # open: ends only above 2.5 mL
    assert not c.low_reservoir(2.6, 2.0, True, TH)
