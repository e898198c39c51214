"""The detection table and the healthy year: what the rules catch on realistic pumps of each
family, and what a healthy fleet raises (ingest/rules/README.md carries the table)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from sim_fleet import FleetMix
from sim_fleet._detect import Outcome, detection_table, format_table, healthy_year_parallel

README = Path(__file__).resolve().parents[2] / "ingest" / "rules" / "README.md"


@pytest.fixture(scope="module")
def table() -> dict[tuple[str, str], Outcome]:
    return {(o.case, o.family): o for o in detection_table()}


def _hit(table: dict[tuple[str, str], Outcome], case: str, family: str) -> Outcome:
    outcome = table[(case, family)]
    assert not outcome.unexpected, f"{case} on {family}: also raised {outcome.unexpected}"
    return outcome


@pytest.mark.parametrize("family", ["calculated", "measured", "valve"])
@pytest.mark.parametrize("factor", [1, 50, 130, 200])
def test_rotor_counts_catch_a_rotor_off_programme_on_every_family_within_hours(
    table: dict[tuple[str, str], Outcome], factor: int, family: str
) -> None:
    o = _hit(table, f"rotor at {factor} % of programme", family)
    assert o.detected and o.priority == "high"
    assert o.after is not None and o.after <= timedelta(hours=6)


@pytest.mark.parametrize(
    "case",
    [
        "over-infusion +20 %",
        "over-infusion +16 %",
        "under-infusion -20 %",
        "under-infusion -16 %",
        "complete occlusion",
        "partial occlusion 50 %",
    ],
)
def test_a_measured_pump_sees_flow_faults_in_hours_a_calculated_one_at_the_refill_or_never(
    table: dict[tuple[str, str], Outcome], case: str
) -> None:
    measured = _hit(table, case, "measured")
    assert measured.detected and measured.priority == "high"
    assert measured.after is not None and measured.after <= timedelta(hours=24)
    calculated = _hit(table, case, "calculated")
    if calculated.detected:  # only reconciliation can see it: at the refill 28 days on
        assert calculated.rule == "refill_discrepancy"
        assert calculated.after is not None and calculated.after >= timedelta(days=27)


def test_a_slow_measured_pump_sees_16_percent_within_a_day(
    table: dict[tuple[str, str], Outcome],
) -> None:
    for case in (
        "over-infusion +16 %, slow pump (10 uL/h)",
        "under-infusion -16 %, slow pump (10 uL/h)",
    ):
        o = _hit(table, case, "measured")
        assert o.detected and o.after is not None and o.after <= timedelta(hours=30)


@pytest.mark.parametrize(
    ("case", "fires"),
    [
        ("pocket fill 0.9 mL, 20 mL pump", False),
        ("pocket fill 1.1 mL, 20 mL pump", True),
        ("pocket fill 1.9 mL, 40 mL pump", False),
        ("pocket fill 2.1 mL, 40 mL pump", True),
    ],
)
def test_pocket_fill_just_under_and_over_the_limit_at_the_refill_of_a_measuring_pump(
    table: dict[tuple[str, str], Outcome], case: str, fires: bool
) -> None:
    o = _hit(table, case, "measured")
    assert o.detected is fires
    if fires:
        assert o.rule == "pocket_fill" and o.after == timedelta(0)
    assert not _hit(table, case, "calculated").detected  # the entered volume is taken on trust


def test_a_large_pocket_fill_on_a_calculated_pump_shows_at_the_next_refill(
    table: dict[tuple[str, str], Outcome],
) -> None:
    o = _hit(table, "pocket fill 8 mL, 40 mL pump", "calculated")
    assert o.detected and o.rule == "refill_discrepancy"


@pytest.mark.parametrize("family", ["calculated", "measured", "valve"])
def test_pump_and_clinic_cases_on_every_family(
    table: dict[tuple[str, str], Outcome], family: str
) -> None:
    mri = _hit(table, "MRI, no recovery", family)
    assert mri.detected and mri.priority == "low->high"
    late = _hit(table, "MRI, recovery logged 10 h late", family)
    assert late.detected and late.priority == "low"  # ends when the rotor turns, not at the log
    eri = _hit(table, "ERI 80 days before monitoring", family)
    assert eri.detected and eri.priority is not None and eri.priority.endswith("high")
    silence = _hit(table, "second silence (12 h) after a first", family)
    assert silence.detected and silence.after is not None
    assert silence.after <= timedelta(minutes=35)
    profile = _hit(table, "high-risk pump, no clinic profile", family)
    assert profile.detected and profile.rule == "clinic_data_missing"
    for quiet in (
        "clinician suspend 24 h (must stay silent)",
        "sensor drift 20 uL/day, healthy pump (must stay silent)",
    ):
        assert not _hit(table, quiet, family).detected


def test_refill_drift_is_a_low_alert_where_refills_show_the_bias(
    table: dict[tuple[str, str], Outcome],
) -> None:
    o = _hit(table, "refill drift 0 -> +9 % over 4 refills", "calculated")
    assert o.detected and o.priority == "low"


def test_the_rules_readme_carries_the_current_detection_table(
    table: dict[tuple[str, str], Outcome],
) -> None:
    lines = README.read_text().splitlines()
    start = lines.index(format_table([])[0])
    carried = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        carried.append(line)
    assert carried == format_table(list(table.values())), (
        "ingest/rules/README.md's detection table is stale: paste the output of "
        "`pumpfleet sim detect` into its 'Detection' section"
    )


def test_a_healthy_mixed_fleet_for_a_year_raises_only_what_it_expects() -> None:
    """Reduced: 30 pumps at an hourly interval (`pumpfleet sim year` runs 1,000 at 10 min)."""
    report = healthy_year_parallel(30, 365.0, seed=1, mix=FleetMix(reporting_interval_s=3600))
    assert report.unexpected == []
    assert report.starts[("flow_not_observable", "info")] > 0  # the calculated pumps say so
    assert report.messages > 250_000
