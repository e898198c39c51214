"""Thresholds: domain.md's figures by default, configurable from TOML, per pump by overrides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ingest.rules import PumpProfile, Thresholds


def test_defaults_are_domain_md_figures() -> None:
    th = Thresholds()
    assert th.flow_accuracy == 0.145
    assert (th.refill_discrepancy_ml, th.refill_discrepancy_fraction) == (2.0, 0.145)
    assert (th.pocket_fill_small_ml, th.pocket_fill_large_ml) == (1.0, 2.0)
    assert th.mri_recovery_s == 24 * 3600
    assert (th.refill_due_medium_days, th.refill_due_high_days) == (7.0, 3.0)
    assert (th.eos_after_eri_days, th.battery_high_days_to_eos) == (90.0, 14.0)
    assert th.large_dose_change_fraction == 0.20
    assert (th.silence_low_intervals, th.silence_medium_s) == (3.0, 86_400.0)
    assert th.high_risk_low_reservoir_ml == 4.0
    assert th.critical_priority == "high" and th.large_dose_change_priority == "low"
    assert (th.refill_discrepancy_priority, th.refill_discrepancy_repeated_priority) == (
        "medium",
        "high",
    )


def test_from_toml_reads_a_section() -> None:
    text = """
    [alerts.rules]
    trend_window_s = 7200
    low_reservoir_priority = "high"
    """
    th = Thresholds.from_toml(text, section="alerts.rules")
    assert th.trend_window_s == 7200
    assert th.low_reservoir_priority == "high"
    assert Thresholds.from_toml("", section="rules") == Thresholds()


def test_bad_values_are_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="flow_accuracy"):
        Thresholds(flow_accuracy=1.5)
    with pytest.raises(ValidationError, match="refill_due_high_days"):
        Thresholds(refill_due_high_days=8)
    with pytest.raises(ValidationError, match="no_such_threshold"):
        Thresholds.model_validate({"no_such_threshold": 1})
    with pytest.raises(ValidationError, match="urgent"):
        Thresholds.model_validate({"pocket_fill_priority": "urgent"})


def test_profile_overrides_are_checked_when_the_profile_is_made() -> None:
    with pytest.raises(ValidationError, match="'low_reservoir_ml' is not a threshold"):
        PumpProfile(pump_id="P-1", overrides={"low_reservoir_ml": 4})
    with pytest.raises(ValidationError, match="low_reservoir_alarm_ml"):
        PumpProfile(pump_id="P-1", overrides={"low_reservoir_alarm_ml": -1})
    profile = PumpProfile(pump_id="P-1", overrides={"low_reservoir_alarm_ml": 4})
    assert profile.thresholds(Thresholds()).low_reservoir_alarm_ml == 4
    assert Thresholds().with_overrides({}) == Thresholds()


def test_profile_from_a_registry_row_takes_the_columns_it_knows() -> None:
    row = {
        "pump_id": "P-000007",
        "clinic": "C-01",
        "reservoir_capacity_ml": None,
        "low_reservoir_alarm_ml": 2.0,
        "reporting_interval_s": 300,
        "high_risk": True,
        "risk_notes": "prior withdrawal",
    }
    profile = PumpProfile.from_row(row)
    assert profile == PumpProfile(
        pump_id="P-000007", low_reservoir_alarm_ml=2.0, reporting_interval_s=300, high_risk=True
    )
