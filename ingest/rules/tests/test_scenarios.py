"""The simulator's scenarios straight into the engine (no MQTT): exactly the alerts each lists,
at their priorities, within their deadlines; nothing for a healthy fleet; ends where due."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.findings import Finding
from ingest.rules import PumpProfile, RuleEngine
from ingest.rules.tests.simrun import Delivered, drive, profiles, run_engine
from pumpfleet.contract import Message
from sim_fleet import FleetMix, Pump, build_run, load_scenario, make_fleet

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
"""Fixed, so runs repeat; in the past, so device times pass the contract's future check."""


def run_scenario(name: str) -> tuple[Delivered, list[str]]:
    return run_engine(build_run(load_scenario(name), NOW))


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
    assert delivered.history("P-000025", "critical_pump_alarm") == [(True, "high"), (False, "high")]
    # P-000012: 25 h without a message, then back
    assert delivered.history("P-000012", "telemetry_silence") == [
        (True, "low"),
        (True, "medium"),
        (False, "medium"),
    ]
    # P-000002: MRI with a normal recovery; P-000007: a leak telemetry cannot see
    for quiet in ("P-000002", "P-000007", "P-000011", "P-000013", "P-000014", "P-000023"):
        assert [f for _, f in delivered.findings if f.pump_id == quiet] == [], quiet


def test_faults_findings_say_what_fired_them(faults: tuple[Delivered, list[str]]) -> None:
    delivered, _ = faults
    first: dict[tuple[str, str], Finding] = {}
    for _, f in delivered.findings:
        first.setdefault((f.pump_id, f.rule), f)
    assert first["P-000008", "pocket_fill"].details["gap_ml"] == 8.0
    assert first["P-000020", "refill_discrepancy"].details["discrepancy_ml"] > 2.0
    assert first["P-000004", "over_infusion"].details["deviation_pct"] > 14.5
    assert first["P-000022", "large_dose_change"].details["new_dose_mcg_per_day"] == 600.0
    assert all(f.summary for _, f in delivered.findings)


def test_refill_cycle_raises_due_then_low_and_the_refill_ends_them() -> None:
    delivered, problems = run_scenario("refill_cycle")
    assert problems == []
    for pump_id in ("P-000001", "P-000002"):
        assert delivered.history(pump_id, "refill_due") == [
            (True, "medium"),
            (True, "high"),
            (False, "high"),
        ]
        assert delivered.history(pump_id, "low_reservoir") == [(True, "medium"), (False, "medium")]


def test_healthy_scenario_raises_nothing() -> None:
    delivered, problems = run_scenario("healthy")
    assert problems == []
    assert delivered.findings == []


@pytest.mark.parametrize(
    ("seed", "mix"),
    [
        (1, FleetMix()),
        (2, FleetMix()),
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
    draws: five simulated days, not one finding."""
    start = NOW - timedelta(days=30)
    specs = make_fleet(150, seed, mix)
    profiles = {
        s.pump_id: PumpProfile(
            pump_id=s.pump_id, high_risk=s.high_risk, reporting_interval_s=s.reporting_interval_s
        )
        for s in specs
    }
    engine = RuleEngine(profiles=profiles)
    delivered = drive(
        engine,
        [Pump(s, start) for s in specs],
        start,
        start + timedelta(days=5),
        timedelta(hours=1),
    )
    assert delivered.messages > 100_000
    assert delivered.findings == []
    assert engine.state_size() / len(engine) < 2048


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
    whole = drive(RuleEngine(), run.pumps, run.start, run.end)
    open_alerts: dict[tuple[str, str], tuple[Finding, datetime]] = {}
    for when, f in whole.findings:
        if when <= run.start + switch:
            if f.active:
                open_alerts[f.pump_id, f.rule] = (f, when)
            else:
                open_alerts.pop((f.pump_id, f.rule), None)

    run = build_run(load_scenario("faults"), NOW)
    engine = RuleEngine()
    drive(_Warming(engine), run.pumps, run.start, run.start + switch)
    for (pump_id, rule), (f, when) in open_alerts.items():
        engine.restore(pump_id, rule, f.priority, since=when)
    resumed = drive(engine, run.pumps, run.start + switch, run.end)

    def key(f: Finding) -> tuple[str, str, bool, str]:
        return (f.pump_id, f.rule, f.active, f.priority)

    after = [key(f) for when, f in whole.findings if when > run.start + switch]
    assert [key(f) for _, f in resumed.findings] == after
    assert after  # the second half has something to compare
