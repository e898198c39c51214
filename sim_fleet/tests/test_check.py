"""`sim run --check`: alerts read back from the database's alerts table (rows inserted here, as
the alert lifecycle would write them) and judged against a scenario's expectations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from pumpfleet import schema
from sim_fleet import build_run, parse_scenario
from sim_fleet._check import CheckError, alert_baseline, evaluate, fetch_raised, wait_for_alerts
from sim_fleet._scenario import RaisedAlert, SimRun

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)

SCENARIO = """
name: check
seed: 2
duration: 2d
strict: true
fleet: {n: 3}
pumps:  # measured: no implicit standing notice (flow_not_observable) to insert as well
  - {pump: 0, set: {family: measured}}
  - {pump: 1, set: {family: measured}}
  - pump: 2
    set: {family: measured}
    allow: [refill_due]
timeline:
  - pump: 0
    at: 2h
    type: motor_stall
    expect:
      - {rule: critical_pump_alarm, priority: high, within: 30m}
      - {rule: under_infusion, priority: high, within: 2h}
  - pump: 1
    at: 2h
    type: telemetry_silence
    params: {duration_h: 25}
    expect:
      - {rule: telemetry_silence, priority: low, within: 45m}
      - {rule: telemetry_silence, priority: medium, within: 24h30m}
"""


def make_run() -> SimRun:
    return build_run(parse_scenario(SCENARIO, "check.yaml"), NOW)


async def insert_alert(
    conn: asyncpg.Connection,
    pump_id: str,
    rule: str,
    priority: str,
    started_at: datetime,
    history: tuple[tuple[str, str, datetime], ...] | list[tuple[str, str, datetime]] = (),
) -> int:
    alert_id: int = await conn.fetchval(
        "INSERT INTO alerts (pump_id, rule, priority, phase, summary, started_at, updated_at) "
        "VALUES ($1, $2, $3, $4, 'test', $5, $5) RETURNING alert_id",
        pump_id,
        rule,
        priority,
        "escalate" if len(history) > 1 else "start",
        started_at,
    )
    for phase, prio, at in history:
        await conn.execute(
            "INSERT INTO alert_history (alert_id, at, phase, priority) VALUES ($1, $2, $3, $4)",
            alert_id,
            at,
            phase,
            prio,
        )
    return alert_id


async def test_met_missed_escalated_unexpected_and_earlier_runs_ignored(database_url: str) -> None:
    await schema.migrate(database_url)
    run = make_run()
    t0 = run.start
    conn = await asyncpg.connect(database_url)
    try:
        # An earlier run's alert on the same pump: below the baseline, so it must not count.
        await insert_alert(conn, "P-000001", "under_infusion", "high", t0 + 3 * H)
        baseline = await alert_baseline(database_url)
        await insert_alert(conn, "P-000001", "critical_pump_alarm", "high", t0 + 2.2 * H)
        # Silence: started low, escalated to medium a day later (one row, two priorities).
        await insert_alert(
            conn,
            "P-000002",
            "telemetry_silence",
            "medium",
            t0 + 2.5 * H,
            [("start", "low", t0 + 2.5 * H), ("escalate", "medium", t0 + 26 * H)],
        )
        await insert_alert(conn, "P-000003", "refill_due", "medium", t0 + 5 * H)  # allowed
        await insert_alert(conn, "P-000003", "over_infusion", "high", t0 + 6 * H)  # unexpected
        await insert_alert(conn, "X-999999", "over_infusion", "high", t0 + 6 * H)  # not ours
    finally:
        await conn.close()

    raised = await fetch_raised(database_url, baseline, [p.pump_id for p in run.pumps])
    assert RaisedAlert("P-000002", "telemetry_silence", "low", t0 + 2.5 * H) in raised
    assert RaisedAlert("P-000002", "telemetry_silence", "medium", t0 + 26 * H) in raised
    assert all(a.pump_id != "X-999999" for a in raised)

    result = await wait_for_alerts(run, database_url, baseline, timeout_s=0)
    verdict = {(e.pump_id, e.rule, e.priority): a is not None for e, a in result.outcomes}
    assert verdict == {
        ("P-000001", "critical_pump_alarm", "high"): True,
        ("P-000001", "under_infusion", "high"): False,  # only the earlier run's row had it
        ("P-000002", "telemetry_silence", "low"): True,
        ("P-000002", "telemetry_silence", "medium"): True,
    }
    assert [(a.pump_id, a.rule) for a in result.unexpected] == [("P-000003", "over_infusion")]
    assert not result.passed and len(result.problems) == 2
    assert result.problems[0].startswith("missing: P-000001 under_infusion (high)")
    assert result.problems[1].startswith("unexpected: P-000003 over_infusion (high)")
    text = "\n".join(result.lines())
    assert "MISSED      P-000001 under_infusion" in text and "check FAILED: 2 problems" in text
    assert "met         P-000002 telemetry_silence (medium)" in text


async def test_waits_for_a_late_alert_and_a_late_one_past_its_deadline_is_missed(
    database_url: str,
) -> None:
    await schema.migrate(database_url)
    run = make_run()
    t0 = run.start
    baseline = await alert_baseline(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await insert_alert(conn, "P-000001", "critical_pump_alarm", "high", t0 + 2.1 * H)
        await insert_alert(conn, "P-000001", "under_infusion", "high", t0 + 5 * H)  # 1 h late
        silence = await insert_alert(
            conn,
            "P-000002",
            "telemetry_silence",
            "low",
            t0 + 2.5 * H,
            [("start", "low", t0 + 2.5 * H)],
        )

        async def engine_catches_up() -> None:
            await asyncio.sleep(0.3)  # the alert engine, a little behind the run, escalates
            await conn.execute("UPDATE alerts SET priority = 'medium' WHERE alert_id = $1", silence)
            await conn.execute(
                "INSERT INTO alert_history (alert_id, at, phase, priority) "
                "VALUES ($1, $2, 'escalate', 'medium')",
                silence,
                t0 + 25 * H,
            )

        writer = asyncio.create_task(engine_catches_up())
        result = await wait_for_alerts(run, database_url, baseline, timeout_s=1.5, poll_s=0.1)
        await writer
    finally:
        await conn.close()
    missed = [(e.rule, e.priority) for e, a in result.outcomes if a is None]
    assert missed == [("under_infusion", "high")], "5 h is past the 2 h deadline"
    assert result.waited_s >= 1.5, "kept waiting while an expectation was unmet"
    met_late = evaluate(run, [RaisedAlert("P-000001", "under_infusion", "high", t0 + 3 * H)])
    assert ("P-000001", "under_infusion") in {
        (e.pump_id, e.rule) for e, a in met_late.outcomes if a
    }


async def test_all_met_returns_before_the_timeout(database_url: str) -> None:
    await schema.migrate(database_url)
    run = make_run()
    t0 = run.start
    baseline = await alert_baseline(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        for rule, prio, at in [
            ("critical_pump_alarm", "high", 2.2),
            ("under_infusion", "high", 3.0),
        ]:
            await insert_alert(conn, "P-000001", rule, prio, t0 + at * H)
        await insert_alert(
            conn,
            "P-000002",
            "telemetry_silence",
            "medium",
            t0 + 2.5 * H,
            [("start", "low", t0 + 2.5 * H), ("escalate", "medium", t0 + 26 * H)],
        )
    finally:
        await conn.close()
    result = await wait_for_alerts(run, database_url, baseline, timeout_s=30)
    assert result.passed and result.waited_s < 5 and result.lines()[-1] == "check passed"


async def test_a_database_without_the_schema_is_one_line(database_url: str) -> None:
    with pytest.raises(CheckError, match="pumpfleet db migrate"):
        await alert_baseline(database_url)
