"""The alert book's planner alone: Findings and open alerts in, transitions out, no database."""

from __future__ import annotations

from datetime import timedelta

from ingest.alerts._plan import (
    ESCALATION_ACTOR,
    RULES_ACTOR,
    Alert,
    Timing,
    Unacked,
    due_unacked,
    plan,
    settle,
)
from ingest.alerts.tests.helpers import T0, finding

TIMING = Timing(unacked_escalation=timedelta(minutes=15), continue_history=timedelta(hours=1))


def open_alert(**changes: object) -> Alert:
    base = dict(
        alert_id=7,
        pump_id="P-1",
        rule="low_reservoir",
        clinic="north",
        priority="medium",
        phase="start",
        summary="low_reservoir on P-1",
        details={"reservoir_ml": 1.9},
        started_at=T0,
        updated_at=T0,
        priority_since=T0,
        last_seq=1,
        rev=3,
        last_history_at=T0,
    )
    base.update(changes)
    return Alert(**base)  # type: ignore[arg-type]


def test_a_first_finding_starts_an_alert_with_a_temporary_id_below_the_last() -> None:
    out = plan({}, [finding(seq=1), finding("P-2", seq=1)], TIMING, next_temp=-4)
    assert [(t.phase, t.alert.alert_id, t.actor) for t in out.transitions] == [
        ("start", -5, RULES_ACTOR),
        ("start", -6, RULES_ACTOR),
    ]
    assert out.next_temp == -6
    assert out.expected_rev == {}  # nothing in the database to guard yet


def test_the_snapshot_is_left_untouched_and_settle_applies_the_plan() -> None:
    cur = open_alert()
    book = {cur.key: cur}
    out = plan(book, [finding(seq=2, minutes=5, summary="lower", reservoir_ml=1.2)], TIMING)
    (t,) = out.transitions
    assert (t.phase, t.alert.rev, t.alert.summary) == ("continue", 4, "lower")
    assert book[cur.key] is cur and cur.rev == 3 and cur.summary == "low_reservoir on P-1"
    assert out.expected_rev == {7: 3}  # the update applies only if the row is still at rev 3
    settle(book, out.finals)
    assert book[cur.key].summary == "lower"


def test_the_same_state_again_says_nothing() -> None:
    cur = open_alert()
    again = finding(seq=2, minutes=5, summary=cur.summary, reservoir_ml=1.9)
    assert plan({cur.key: cur}, [again], TIMING).transitions == []


def test_a_continue_within_the_history_interval_changes_the_row_but_writes_no_history() -> None:
    cur = open_alert()
    near = finding(seq=2, minutes=30, reservoir_ml=1.5)
    far = finding(seq=3, minutes=61, reservoir_ml=1.1)
    (quiet,) = plan({cur.key: cur}, [near], TIMING).transitions
    (loud,) = plan({cur.key: cur}, [far], TIMING).transitions
    assert (quiet.history, loud.history) == (False, True)


def test_a_replayed_older_finding_is_stale_and_ignored() -> None:
    cur = open_alert(last_seq=9, updated_at=T0 + timedelta(minutes=10))
    old_end = finding(active=False, seq=5, minutes=3)
    assert plan({cur.key: cur}, [old_end], TIMING).transitions == []


def test_escalation_clears_the_acknowledgement_and_de_escalation_keeps_it() -> None:
    cur = open_alert(acked_at=T0, acked_by="dr.ng")
    (up,) = plan({cur.key: cur}, [finding(priority="high", seq=2, minutes=1)], TIMING).transitions
    assert (up.phase, up.alert.acked_by, up.previous_priority) == ("escalate", None, "medium")
    high = open_alert(priority="high", acked_at=T0, acked_by="dr.ng")
    (down,) = plan({high.key: high}, [finding(seq=2, minutes=1)], TIMING).transitions
    assert (down.phase, down.alert.acked_by, down.alert.priority) == (
        "de-escalate",
        "dr.ng",
        "medium",
    )


def test_start_and_end_in_one_batch_leave_nothing_open() -> None:
    out = plan({}, [finding(seq=1), finding(active=False, seq=2, minutes=1)], TIMING)
    assert [t.phase for t in out.transitions] == ["start", "end"]
    book: dict[tuple[str, str], Alert] = {}
    settle(book, out.finals)
    assert book == {}


def test_an_end_without_an_open_alert_does_nothing() -> None:
    assert plan({}, [finding(active=False, seq=1)], TIMING).transitions == []


def test_a_high_alert_nobody_acknowledged_escalates_once_when_due() -> None:
    cur = open_alert(priority="high")
    book = {cur.key: cur}
    assert (
        due_unacked(book, T0 + timedelta(minutes=14, seconds=59), TIMING.unacked_escalation) == []
    )
    due = due_unacked(book, T0 + timedelta(minutes=15), TIMING.unacked_escalation)
    assert due == [Unacked(cur.key, T0 + timedelta(minutes=15))]
    out = plan(book, due, TIMING)
    (t,) = out.transitions
    assert (t.phase, t.actor, t.note) == (
        "escalate",
        ESCALATION_ACTOR,
        "not acknowledged within 15 min",
    )
    settle(book, out.finals)
    assert due_unacked(book, T0 + timedelta(hours=2), TIMING.unacked_escalation) == []


def test_an_acknowledged_or_medium_alert_is_never_due() -> None:
    late = T0 + timedelta(hours=3)
    acked = open_alert(priority="high", acked_at=T0, acked_by="dr.ng")
    medium = open_alert(pump_id="P-2")
    assert due_unacked({acked.key: acked, medium.key: medium}, late, timedelta(minutes=15)) == []


def test_settle_does_not_remove_a_newer_alert_of_the_same_key() -> None:
    newer = open_alert(alert_id=9)
    ended_older = open_alert(alert_id=7, ended_at=T0)
    book = {newer.key: newer}
    settle(book, {7: ended_older})
    assert book == {newer.key: newer}
