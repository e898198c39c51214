"""Scenario files: the shipped ones hold together, bad ones fail naming the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import get_args

import pytest

from pumpfleet import contract
from pumpfleet.findings import NOTICES, RULES
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
from sim_fleet._scenario import NOTICE_WITHIN, TIMELINE_TYPES, TimelineType, pump_index

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


def test_healthy_expects_nothing_and_faults_covers_every_rule() -> None:
    """Whether the engine meets them is ingest/rules/tests/test_scenarios.py's job; here: what
    the shipped files ask for."""
    healthy = build_run(load_scenario("healthy"), NOW)
    assert healthy.scenario.strict
    assert {e.rule for e in healthy.expected} == {"flow_not_observable"}  # calculated pumps
    faults = build_run(load_scenario("faults"), NOW)
    assert {e.rule for e in faults.expected} >= set(RULES) - {"clinic_data_missing"}
    cycle = build_run(load_scenario("refill_cycle"), NOW)
    assert {(e.rule, e.priority) for e in cycle.expected if e.rule not in NOTICES} == {
        ("refill_due", "medium"),
        ("refill_due", "high"),
        ("low_reservoir", "medium"),
    }


def test_every_family_scenario_puts_each_case_on_each_family() -> None:
    """families_*.yaml: each timeline case (type and parameters) comes on a calculated, a
    measured and a valve pump."""
    for name in ("families_flow", "families_refill", "families_clinic", "families_drift"):
        run = build_run(load_scenario(name), NOW)
        families = [p.spec.family for p in run.pumps]
        cases: dict[str, set[str]] = {}
        for item in run.scenario.timeline:
            case = f"{item.type} {sorted(item.params.items())}"
            index = pump_index(item.pump, len(families), "pump")
            cases.setdefault(case, set()).add(families[index])
        for case, seen in cases.items():
            assert seen == {"calculated", "measured", "valve"}, (name, case)


def test_faults_scenario_has_a_pump_for_every_fault_type() -> None:
    scenario = load_scenario("faults")
    assert {item.type for item in scenario.timeline} == set(TIMELINE_TYPES)


def test_timeline_type_names_match_their_builders() -> None:
    assert set(get_args(TimelineType)) == set(TIMELINE_TYPES)


def test_check_reports_missing_late_and_unexpected_alerts() -> None:
    run = build_run(load_scenario("faults"), NOW)
    stall = next(e for e in run.expected if e.rule == "critical_pump_alarm")
    on_time = RaisedAlert(stall.pump_id, stall.rule, stall.priority, stall.after)
    late = RaisedAlert(stall.pump_id, stall.rule, stall.priority, stall.due + timedelta(minutes=1))
    stray = RaisedAlert("P-000027", "battery", "medium", stall.after)
    allowed = RaisedAlert("P-000015", "sequence_gap", "low", stall.after)  # out-of-order pump

    problems = run.check([on_time, stray, allowed])
    assert not any(stall.pump_id in p and "critical_pump_alarm" in p for p in problems)
    assert "unexpected: P-000027 battery (medium)" in " ".join(problems)
    assert "P-000015" not in " ".join(p for p in problems if p.startswith("unexpected"))
    assert any(
        p.startswith(f"missing: {stall.pump_id} critical_pump_alarm") for p in run.check([late])
    )


NOTICE_SCENARIO = """
name: notices
duration: 1d
fleet: {n: 4}
pumps:
  - {pump: 0, set: {family: calculated}}
  - {pump: 1, set: {family: measured}}
  - {pump: 2, set: {family: valve}, profile: false}
  - {pump: 3, set: {family: measured}, profile: false, allow: [flow_not_observable]}
"""


def test_standing_notices_are_expected_by_family_and_profile() -> None:
    run = build_run(parse_scenario(NOTICE_SCENARIO), NOW)
    notices = {(e.pump_id, e.rule, e.priority) for e in run.expected}
    assert notices == {
        ("P-000001", "flow_not_observable", "info"),
        ("P-000003", "flow_not_observable", "info"),
        ("P-000003", "clinic_data_missing", "info"),
        ("P-000004", "clinic_data_missing", "info"),
    }
    assert all(e.after == run.start and e.due == run.start + NOTICE_WITHIN for e in run.expected)
    assert [run.has_profile(p.pump_id) for p in run.pumps] == [True, True, False, False]
    at = run.start + timedelta(minutes=10)

    def notice(pump: str, rule: str) -> RaisedAlert:
        return RaisedAlert(pump, rule, "info", at)

    right = [
        notice("P-000001", "flow_not_observable"),
        notice("P-000003", "flow_not_observable"),
        notice("P-000003", "clinic_data_missing"),
        notice("P-000004", "clinic_data_missing"),
        notice("P-000004", "flow_not_observable"),  # allowed: a noisy sensor may say so
    ]
    assert run.check(right) == []
    problems = run.check(
        [
            *right[1:],
            notice("P-000002", "flow_not_observable"),  # measured: its trend is watched
            notice("P-000002", "clinic_data_missing"),  # it has a profile
        ]
    )
    assert problems[0].startswith("missing: P-000001 flow_not_observable (info) by ")
    assert "standing notice: calculated volume" in problems[0]
    assert [p.split(" at ")[0] for p in problems[1:]] == [
        "unexpected: P-000002 flow_not_observable (info)",
        "unexpected: P-000002 clinic_data_missing (info)",
    ]


def test_a_scenario_may_expect_a_notice_explicitly() -> None:
    text = scenario_text(
        "pumps: [{pump: 0, set: {family: measured}, "
        "expect: [{rule: flow_not_observable, priority: info, within: 20h}]}]\n"
    )
    run = build_run(parse_scenario(text), NOW)
    assert ("P-000001", "flow_not_observable", "info") in {
        (e.pump_id, e.rule, e.priority) for e in run.expected
    }


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
