"""Scenario files: the shipped ones hold together, bad ones fail naming the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import get_args

import pytest

from pumpfleet import contract
from sim_fleet import (
    Observation,
    RaisedAlert,
    ScenarioError,
    advance_fleet,
    build_run,
    builtin_scenarios,
    load_scenario,
    make_fleet,
    parse_duration,
    parse_scenario,
)
from sim_fleet.scenario import TIMELINE_TYPES, TimelineType
from sim_fleet.tests.reference_rules import evaluate

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

MINIMAL = """
name: tiny
duration: 1d
fleet: {n: 3}
"""


def scenario_text(extra: str) -> str:
    return MINIMAL + extra


def test_the_three_shipped_scenarios_exist() -> None:
    assert {"healthy", "faults", "refill_cycle"} <= set(builtin_scenarios())


@pytest.mark.parametrize("name", sorted(builtin_scenarios()))
def test_shipped_scenario_runs_and_every_message_passes_the_contract(name: str) -> None:
    run = build_run(load_scenario(name))  # real now: device times must not be in the future
    seq: dict[str, int] = {}
    observations = advance_fleet(run.pumps, run.end)
    assert observations
    for pid, obs in observations:
        seq[pid] = seq.get(pid, -1) + 1
        wire = contract.encode(obs.to_message(pid, seq[pid]))
        contract.decode(contract.topic(pid, obs.kind), wire)


@pytest.mark.parametrize("name", sorted(builtin_scenarios()))
def test_shipped_scenario_expectations_are_met_by_reference_rules(name: str) -> None:
    """Every expected alert is observable in time, and (strict) nothing else fires."""
    run = build_run(load_scenario(name), NOW)
    raised = evaluate(advance_fleet(run.pumps, run.end))
    assert run.check(raised) == []


def test_healthy_expects_nothing_and_faults_covers_every_rule() -> None:
    healthy = build_run(load_scenario("healthy"), NOW)
    assert healthy.expected == () and healthy.scenario.strict
    faults = build_run(load_scenario("faults"), NOW)
    assert {e.rule for e in faults.expected} >= {
        "critical_pump_alarm",
        "over_infusion",
        "under_infusion",
        "pocket_fill",
        "refill_discrepancy",
        "post_mri",
        "low_reservoir",
        "battery",
        "large_dose_change",
        "telemetry_silence",
        "sequence_gap",
    }
    cycle = build_run(load_scenario("refill_cycle"), NOW)
    assert {(e.rule, e.priority) for e in cycle.expected} == {
        ("refill_due", "medium"),
        ("refill_due", "high"),
        ("low_reservoir", "medium"),
    }


def test_faults_scenario_has_one_pump_per_fault_type() -> None:
    scenario = load_scenario("faults")
    types = {item.type for item in scenario.timeline}
    assert types >= {
        "motor_stall",
        "mri",
        "over_infusion",
        "under_infusion",
        "catheter_occlusion",
        "pocket_fill",
        "battery_fault",
        "telemetry_silence",
        "clock_skew",
        "duplicate_delivery",
        "out_of_order",
        "message_loss",
    }


def test_timeline_type_names_match_their_builders() -> None:
    assert set(get_args(TimelineType)) == set(TIMELINE_TYPES)


def test_check_reports_missing_late_and_unexpected_alerts() -> None:
    run = build_run(load_scenario("faults"), NOW)
    stall = next(e for e in run.expected if e.rule == "critical_pump_alarm")
    on_time = RaisedAlert(stall.pump_id, stall.rule, stall.priority, stall.after)
    late = RaisedAlert(stall.pump_id, stall.rule, stall.priority, stall.due + timedelta(minutes=1))
    stray = RaisedAlert("P-000027", "battery", "medium", stall.after)
    allowed = RaisedAlert("P-000002", "under_infusion", "high", stall.after)  # MRI pump

    problems = run.check([on_time, stray, allowed])
    assert not any(stall.pump_id in p and "critical_pump_alarm" in p for p in problems)
    assert "unexpected: P-000027 battery (medium)" in " ".join(problems)
    assert "P-000002" not in " ".join(p for p in problems if p.startswith("unexpected"))
    assert any(
        p.startswith(f"missing: {stall.pump_id} critical_pump_alarm") for p in run.check([late])
    )


def test_same_seed_same_run() -> None:
    def observations() -> list[tuple[str, Observation]]:
        run = build_run(load_scenario("faults"), NOW)
        return advance_fleet(run.pumps, run.end)

    assert observations() == observations()


# Placing the run in time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("speed", "start"),
    [
        ("max", NOW - timedelta(days=1)),
        ("1", NOW),
        ("1440", NOW - timedelta(days=1) + timedelta(minutes=1)),
    ],
)
def test_default_start_ends_the_timeline_when_the_run_ends(speed: str, start: datetime) -> None:
    run = build_run(parse_scenario(scenario_text(f"speed: {speed}\n")), NOW)
    assert run.start == start and run.end == start + timedelta(days=1)
    assert run.sim_time(0) == (run.end if speed == "max" else start)


def test_an_explicit_start_that_would_run_into_the_future_is_refused() -> None:
    scenario = parse_scenario(scenario_text("start: 2026-06-01T00:00:00Z\nspeed: max\n"))
    with pytest.raises(ScenarioError, match=r"start: .* ahead of the wall clock"):
        build_run(scenario, NOW)
    ok = parse_scenario(scenario_text("start: 2026-05-01T00:00:00Z\n"))
    assert build_run(ok, NOW).start == datetime(2026, 5, 1, tzinfo=UTC)


# Errors name the field ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour: red\n", "colour: Extra inputs are not permitted"),
        ("speed: fast\n", "speed: 'fast' is not a positive number"),
        ("speed: 0\n", "speed: 0 is not a positive number"),
        (
            "timeline: [{pump: 0, at: 1h, type: motor_stall, "
            "expect: [{rule: stall, priority: high, within: 1h}]}]\n",
            "timeline.0.expect.0.rule",
        ),
        (
            "timeline: [{pump: 0, at: 1h, type: motor_stall, params: {recover_after: 2}}]\n",
            "timeline.0.params.recover_after: not a parameter of motor_stall; "
            "expected recover_after_h",
        ),
        (
            "timeline: [{pump: 0, at: 1h, type: over_infusion, params: {bias: -0.2}}]\n",
            "timeline.0.params.bias: over-infusion needs a bias in (0, 1]",
        ),
        (
            "timeline: [{pump: 0, at: 1h, type: under_infusion, params: {bias: lots}}]\n",
            "timeline.0.params.bias: Input should be a valid number",
        ),
        (
            "timeline: [{pump: 3, at: 1h, type: mri}]\n",
            "timeline.0.pump: 3 is outside a fleet of 3",
        ),
        ("timeline: [{pump: P-000009, at: 1h, type: mri}]\n", "timeline.0.pump"),
        ("timeline: [{pump: pump-a, at: 1h, type: mri}]\n", "timeline.0.pump"),
        ("timeline: [{pump: 0, at: 3 days, type: mri}]\n", "timeline.0.at"),
        ("timeline: [{pump: 0, at: 2d, type: mri}]\n", "timeline.0.at: 2 days, 0:00:00 is after"),
        ("timeline: [{pump: 0, at: 1h, type: explode}]\n", "timeline.0.type"),
        ("pumps: [{pump: 0, set: {colour: red}}]\n", "pumps.0.set.colour: not a pump setting"),
        (
            "pumps: [{pump: 0, set: {initial_battery_pct: 150}}]\n",
            "pumps.0.set.initial_battery_pct: must be in [0, 100]",
        ),
        (
            "pumps: [{pump: 0, set: {reservoir_capacity_ml: 25}}]\n",
            "pumps.0.set.reservoir_capacity_ml",
        ),
        ("pumps: [{pump: 0, set: {dose_mcg_per_day: many}}]\n", "pumps.0.set.dose_mcg_per_day"),
        ("pumps: [{pump: 0}, {pump: P-000001}]\n", "pumps.1.pump: P-000001 is set up twice"),
    ],
)
def test_bad_scenario_names_the_field(extra: str, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(scenario_text(extra), "bad.yaml")
    assert str(err.value).startswith("bad.yaml: ")
    assert message in str(err.value)


def test_a_setting_wrong_for_the_generated_pump_fails_at_build_naming_the_field() -> None:
    small = next(i for i, s in enumerate(make_fleet(3, 0)) if s.reservoir_capacity_ml == 20.0)
    scenario = parse_scenario(
        scenario_text(f"pumps: [{{pump: {small}, set: {{initial_reservoir_ml: 30}}}}]\n")
    )
    with pytest.raises(ScenarioError, match=r"pumps\.0\.set\.initial_reservoir_ml"):
        build_run(scenario, NOW)


def test_yaml_syntax_errors_give_the_line() -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario("name: x\nduration: 1d\nfleet: {n: 3}}\nspeed: max\n", "bad.yaml")
    assert str(err.value).startswith("bad.yaml: line 3: not valid YAML (")
    assert "\n" not in str(err.value)


def test_unknown_scenario_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ScenarioError, match="healthy"):
        load_scenario("no-such-scenario")


def test_x_keys_hold_anchors_and_are_ignored() -> None:
    text = scenario_text(
        "x-fast: &fast {flow_bias: 0.2}\npumps: [{pump: 1, set: *fast}]\n"
        "timeline: [{pump: P-000003, at: 1h, type: refill}]\n"
    )
    run = build_run(parse_scenario(text), NOW)
    assert run.pumps[1].spec.flow_bias == 0.2
    assert run.pumps[2].spec.pump_id == "P-000003"


def test_dose_setting_keeps_a_flex_shape_only_with_a_schedule() -> None:
    text = scenario_text(
        "pumps:\n"
        "  - pump: 0\n"
        "    set:\n"
        "      concentration_mcg_per_ml: 1000\n"
        "      schedule: {mode: flex, dose_mcg_per_day: 300,\n"
        "                 steps: [{start_minute: 0, dose_mcg_per_day: 200},\n"
        "                         {start_minute: 720, dose_mcg_per_day: 400}]}\n"
        "      dose_mcg_per_day: 600\n"
        "  - pump: 1\n"
        "    set: {dose_mcg_per_day: 450}\n"
    )
    run = build_run(parse_scenario(text), NOW)
    flex = run.pumps[0].spec.schedule
    assert flex.dose_mcg_per_day == 600 and [s.dose_mcg_per_day for s in flex.steps] == [400, 800]
    assert run.pumps[1].spec.schedule.mode.value == "continuous"
    assert run.pumps[1].spec.schedule.dose_mcg_per_day == 450


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90m", 5400), ("1d12h", 129_600), ("2w", 1_209_600), (3600, 3600), ("1.5h", 5400)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "-1h", "1h-", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
