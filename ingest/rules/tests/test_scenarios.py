"""The simulator's scenarios straight into the engine (no MQTT): exactly the alerts each lists,
at their priorities, within their deadlines; for a healthy fleet nothing but the standing notices;
ends where due. The engine gets the clinic profile of every pump the scenario gives one
(`simrun.profiles`)."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from ingest.rules import PumpProfile, RuleEngine
from ingest.rules.tests.simrun import Delivered, drive, profiles, run_engine
from pumpfleet.contract import Message
from pumpfleet.findings import NOTICES, RULES, Finding
from sim_fleet import (
    FleetMix,
    Pump,
    ScenarioError,
    build_run,
    builtin_scenarios,
    load_scenario,
    make_fleet,
    with_fleet_size,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
"""Fixed, so runs repeat; in the past, so device times pass the contract's future check."""

FAMILY_SCENARIOS = sorted(name for name in builtin_scenarios() if name.startswith("families_"))


@functools.cache
def run_scenario(name: str) -> tuple[Delivered, list[str]]:
    """One engine run per shipped scenario per session (the tests only read the result)."""
    return run_engine(build_run(load_scenario(name), NOW))


def phases(history: Iterable[tuple[bool, str]]) -> list[tuple[bool, str]]:
    """(active, priority) changes: a repeat of the same (a re-report when what the alert is
    about changes, e.g. a critical alarm that now explains the stop) is the lifecycle's
    'continue', not a new phase."""
    out: list[tuple[bool, str]] = []
    for phase in history:
        if not out or out[-1] != phase:
            out.append(phase)
    return out


def non_notices(delivered: Delivered, pump_id: str) -> list[Finding]:
    return [f for _, f in delivered.findings if f.pump_id == pump_id and f.rule not in NOTICES]


# faults.yaml ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults() -> tuple[Delivered, list[str]]:
    return run_scenario("faults")


def test_faults_scenario_raises_exactly_the_expected_alerts_in_time(
    faults: tuple[Delivered, list[str]],
) -> None:
    _, problems = faults
    assert problems == []


def test_faults_scenario_alerts_end_when_their_condition_does(
    faults: tuple[Delivered, list[str]],
) -> None:
    delivered, _ = faults
    # P-000025: a stall that recovers after an hour
    assert phases(delivered.history("P-000025", "critical_pump_alarm")) == [
        (True, "high"),
        (False, "high"),
    ]
    # P-000012: 25 h without a message, then back
    assert delivered.history("P-000012", "telemetry_silence") == [
        (True, "low"),
        (True, "medium"),
        (False, "medium"),
    ]
    # P-000002: MRI with a normal recovery: the low notice, ended by the recovery
    assert delivered.history("P-000002", "post_mri") == [(True, "low"), (False, "low")]
    # P-000003: no recovery: low, medium, high, never ended
    assert delivered.history("P-000003", "post_mri") == [
        (True, "low"),
        (True, "medium"),
        (True, "high"),
    ]
    # A leak, clock skew, duplicates, boluses, an occlusion and an under-infusion a calculated
    # pump cannot see, a suspension, sensor drift: nothing but the standing notice.
    quiet = ["P-000007", "P-000013", "P-000014", "P-000023", "P-000024"]
    quiet += ["P-000030", "P-000033", "P-000034", "P-000036"]
    for pump_id in quiet:
        assert non_notices(delivered, pump_id) == [], pump_id


def test_faults_one_cause_one_page(faults: tuple[Delivered, list[str]]) -> None:
    """A stall, a critical memory error, EOS and an empty reservoir stop delivery: the critical
    alarm carries the stop as context, under_infusion never pages."""
    delivered, _ = faults
    for pump_id in ("P-000001", "P-000010", "P-000019", "P-000021", "P-000025"):
        assert delivered.history(pump_id, "under_infusion") == [], pump_id
        critical = [
            f
            for _, f in delivered.findings
            if (f.pump_id, f.rule) == (pump_id, "critical_pump_alarm") and f.active
        ]
        inhibited = [f.details["inhibited"] for f in critical if "inhibited" in f.details]
        assert inhibited and inhibited[0][0]["rule"] == "under_infusion", pump_id


def test_faults_findings_say_what_fired_them(faults: tuple[Delivered, list[str]]) -> None:
    delivered, _ = faults
    first: dict[tuple[str, str], Finding] = {}
    for _, f in delivered.findings:
        first.setdefault((f.pump_id, f.rule), f)
    assert first["P-000008", "pocket_fill"].details["gap_ml"] == 8.0
    assert first["P-000020", "refill_discrepancy"].details["discrepancy_ml"] == pytest.approx(
        3.0, abs=0.01
    )
    # the calculated twin of the pocket fill, a day later
    assert first["P-000031", "refill_discrepancy"].details["discrepancy_ml"] == pytest.approx(
        8.0, abs=0.01
    )
    over = first["P-000004", "over_infusion"].details
    assert over["cause"] == "measured_trend" and over["measured_trend"]["deviation_pct"] > 14.5
    counts = first["P-000029", "under_infusion"].details
    assert counts["cause"] == "delivery_counts"
    assert counts["delivery_counts"]["deviation_pct"] < -14.5
    assert first["P-000022", "large_dose_change"].details["new_dose_mcg_per_day"] == 600.0
    eos_soon = [
        f
        for _, f in delivered.findings
        if (f.pump_id, f.rule, f.priority) == ("P-000018", "battery", "high")
    ]
    assert eos_soon[0].details["eri_date"] == "reported by the pump"
    assert eos_soon[0].details["days_to_eos"] == pytest.approx(10, abs=0.2)
    assert first["P-000001", "flow_not_observable"].details["reason"] == "calculated"
    assert ("P-000004", "flow_not_observable") not in first  # measured
    assert all(f.summary for _, f in delivered.findings)


# The other shipped scenarios ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(builtin_scenarios()))
def test_shipped_scenario_passes_its_checks_against_the_engine(name: str) -> None:
    """Every shipped scenario file: each expected alert in time, and (strict) nothing else."""
    _, problems = run_scenario(name)
    assert problems == []


def test_the_demos_fleet_the_faults_among_healthy_pumps_raises_only_the_faults() -> None:
    """`make demo` runs the faults scenario in a fleet of 300 (`sim run faults --pumps 300`):
    the 264 healthy pumps of the default mix must stay silent, the faults' alerts unchanged."""
    run = build_run(with_fleet_size(load_scenario("faults"), 300), NOW)
    assert len(run.pumps) == 300
    _, problems = run_engine(run)
    assert problems == []


def test_a_fleet_smaller_than_the_scenarios_own_is_refused() -> None:
    with pytest.raises(ScenarioError, match="at least its own 36 pumps"):
        with_fleet_size(load_scenario("faults"), 35)


def test_the_shipped_scenarios_cover_every_rule_and_notice() -> None:
    expected = {
        e.rule for name in builtin_scenarios() for e in build_run(load_scenario(name), NOW).expected
    }
    assert set(RULES) - expected == set()


def test_family_scenarios_exist() -> None:
    assert FAMILY_SCENARIOS == [
        "families_clinic",
        "families_drift",
        "families_flow",
        "families_refill",
    ]


def test_a_recovery_logged_late_ends_the_mri_notice_before_it_escalates() -> None:
    delivered, _ = run_scenario("families_clinic")
    for pump_id in ("P-000004", "P-000005", "P-000006"):  # calculated, measured, valve
        assert delivered.history(pump_id, "post_mri") == [(True, "low"), (False, "low")]


def test_a_second_silence_is_a_second_alert() -> None:
    delivered, _ = run_scenario("families_clinic")
    for pump_id in ("P-000010", "P-000011", "P-000012"):
        assert delivered.history(pump_id, "telemetry_silence") == [
            (True, "low"),
            (False, "low"),
            (True, "low"),
            (False, "low"),
        ]


def test_a_clinician_suspension_and_sensor_drift_raise_nothing_on_any_family() -> None:
    delivered, _ = run_scenario("families_clinic")
    for pump_id in ("P-000016", "P-000017", "P-000018", "P-000019", "P-000020", "P-000021"):
        assert non_notices(delivered, pump_id) == [], pump_id


def test_a_pump_without_a_profile_uses_its_own_alarm_volume() -> None:
    delivered, _ = run_scenario("families_clinic")
    for pump_id in ("P-000013", "P-000014", "P-000015"):
        assert delivered.history(pump_id, "clinic_data_missing") == [(True, "info")]
        assert delivered.history(pump_id, "low_reservoir") == []
    assert delivered.history("P-000022", "low_reservoir") == [(True, "medium")]
    assert delivered.history("P-000022", "clinic_data_missing") == []


def test_refill_drift_shows_on_the_families_that_calculate_their_volume() -> None:
    delivered, _ = run_scenario("families_drift")
    for pump_id in ("P-000001", "P-000003"):  # calculated, valve
        assert delivered.history(pump_id, "refill_discrepancy") == [(True, "low")]
    assert [f for _, f in delivered.findings if f.pump_id == "P-000002"] == []  # measured


def test_refill_cycle_raises_due_then_low_and_the_refill_ends_them() -> None:
    delivered, problems = run_scenario("refill_cycle")
    assert problems == []
    for pump_id in ("P-000001", "P-000002", "P-000003", "P-000004"):
        assert delivered.history(pump_id, "refill_due") == [
            (True, "medium"),
            (True, "high"),
            (False, "high"),
        ]
        assert delivered.history(pump_id, "low_reservoir") == [(True, "medium"), (False, "medium")]


def test_healthy_scenario_raises_nothing_but_the_notice_on_calculated_pumps() -> None:
    delivered, problems = run_scenario("healthy")
    assert problems == []
    run = build_run(load_scenario("healthy"), NOW)
    calculated = {p.pump_id for p in run.pumps if p.spec.family != "measured"}
    assert {(f.pump_id, f.rule, f.active, f.priority) for _, f in delivered.findings} == {
        (pump_id, "flow_not_observable", True, "info") for pump_id in calculated
    }


@pytest.mark.parametrize(
    ("seed", "mix"),
    [
        (1, FleetMix()),
        (2, FleetMix(valve_share=0.3)),
        (
            3,
            FleetMix(
                flex_share=1.0,
                patient_bolus_share=1.0,
                patient_bolus_presses_per_day=6,
                high_risk_share=0.5,
                child_share=0.5,
            ),
        ),
    ],
)
def test_a_healthy_fleet_over_days_raises_nothing(seed: int, mix: FleetMix) -> None:
    """Routine refills, flex steps, boluses, slow children's pumps, every flow bias the fleet
    draws (SD 5 %, up to +-14 %), sensor noise of 1-5 uL: five simulated days, not one finding
    but the standing notice on each calculated or valve pump."""
    start = NOW - timedelta(days=30)
    specs = make_fleet(150, seed, mix)
    engine = RuleEngine(
        profiles={
            s.pump_id: PumpProfile(
                pump_id=s.pump_id,
                high_risk=s.high_risk,
                reporting_interval_s=s.reporting_interval_s,
            )
            for s in specs
        }
    )
    delivered = drive(
        engine,
        [Pump(s, start) for s in specs],
        start,
        start + timedelta(days=5),
        timedelta(hours=1),
    )
    assert delivered.messages > 100_000
    calculated = {s.pump_id for s in specs if s.family != "measured"}
    assert calculated and len(calculated) < len(specs)
    assert [(f.pump_id, f.rule) for _, f in delivered.findings if f.rule not in NOTICES] == []
    assert {(f.pump_id, f.rule, f.active) for _, f in delivered.findings} == {
        (pump_id, "flow_not_observable", True) for pump_id in calculated
    }
    assert engine.state_size() / len(engine) < 16_000  # rules README: ~13 kB a measured pump


# Restarts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_faults_pass_when_events_overtake_the_readings_before_them(seed: int) -> None:
    """The urgent lane stores a pump's events at once while its readings wait in the main
    lane's backlog (up to one reporting interval, seeded): the same alerts, none more (a refill
    that overtook the reading before it once made a measured trend look noisy)."""
    lag = random.Random(seed).uniform(0.0, 600.0)
    run = build_run(load_scenario("faults"), NOW)
    delivered = drive(
        RuleEngine(profiles=profiles(run)),
        run.pumps,
        run.start,
        run.end,
        lag_s=lambda m: lag if m.kind == "telemetry" else 0.0,
    )
    assert run.check(delivered.raised()) == [], f"telemetry {lag:.0f} s behind the events"


class _Warming:
    """Stands in for the engine while history is replayed after a restart."""

    def __init__(self, engine: RuleEngine) -> None:
        self.engine = engine

    def observe(self, msg: Message, received_at: datetime | None = None) -> list[Finding]:
        self.engine.warm(msg, received_at)
        return []

    def tick(self, now: datetime) -> list[Finding]:
        return []


def test_a_restart_mid_scenario_reports_exactly_what_an_uninterrupted_run_does() -> None:
    """Warm from the first 12 h, restore what the lifecycle holds open, go on: the findings
    after the restart are the uninterrupted run's, none raised twice."""
    switch = timedelta(hours=12)
    run = build_run(load_scenario("faults"), NOW)
    whole = drive(RuleEngine(profiles=profiles(run)), run.pumps, run.start, run.end)
    open_alerts: dict[tuple[str, str], tuple[Finding, datetime]] = {}
    for when, f in whole.findings:
        if when <= run.start + switch:
            if f.active:
                open_alerts[f.pump_id, f.rule] = (f, when)
            else:
                open_alerts.pop((f.pump_id, f.rule), None)

    run = build_run(load_scenario("faults"), NOW)
    engine = RuleEngine(profiles=profiles(run))
    seqs: dict[str, int] = {}  # the pumps' seqs go on rising across the restart
    drive(_Warming(engine), run.pumps, run.start, run.start + switch, seqs=seqs)
    for (pump_id, rule), (f, when) in open_alerts.items():
        engine.restore(pump_id, rule, f.priority, since=when)
    resumed = drive(engine, run.pumps, run.start + switch, run.end, seqs=seqs)

    def key(f: Finding) -> tuple[str, str, bool, str]:
        return (f.pump_id, f.rule, f.active, f.priority)

    after = [key(f) for when, f in whole.findings if when > run.start + switch]
    assert [key(f) for _, f in resumed.findings] == after
    assert after  # the second half has something to compare
