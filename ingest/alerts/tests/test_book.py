"""The lifecycle against real PostgreSQL: transitions, history, acknowledgement, restart."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from ingest.alerts import _book as book_mod
from ingest.alerts._book import AlertError, Book, BookPolicy, acknowledge, resolve
from ingest.alerts.tests.helpers import T0, finding

pytestmark = pytest.mark.integration

BOTH = BookPolicy(receivers=("alertmanager", "webhook"))


async def history(conn: asyncpg.Connection, alert_id: int) -> list[tuple[str, str, str]]:
    rows = await conn.fetch(
        "SELECT phase, priority, actor FROM alert_history WHERE alert_id = $1 ORDER BY id",
        alert_id,
    )
    return [tuple(r) for r in rows]


async def outbox(conn: asyncpg.Connection) -> list[tuple[str, str, str]]:
    rows = await conn.fetch(
        "SELECT receiver, action, event->>'phase' FROM alert_outbox ORDER BY id"
    )
    return [tuple(r) for r in rows]


async def test_start_then_continue_never_duplicates(conn: asyncpg.Connection) -> None:
    book = Book(BookPolicy(continue_history=timedelta(0), receivers=BOTH.receivers))
    (t,) = await book.apply(conn, [finding(seq=1, reservoir_ml=1.9)])
    assert t.phase == "start"
    alert_id = t.alert.alert_id
    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", alert_id)
    assert (row["phase"], row["priority"], row["clinic"], row["last_seq"]) == (
        "start",
        "medium",
        "north",
        1,
    )

    # The same condition again: nothing to write. New figures: one 'continue', same alert.
    assert await book.apply(conn, [finding(seq=2, minutes=10, reservoir_ml=1.9)]) == []
    (t,) = await book.apply(conn, [finding(seq=3, minutes=20, reservoir_ml=1.8)])
    assert (t.phase, t.alert.alert_id) == ("continue", alert_id)

    assert await conn.fetchval("SELECT count(*) FROM alerts") == 1
    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", alert_id)
    assert row["phase"] == "continue" and row["last_seq"] == 3
    assert row["updated_at"] == T0 + timedelta(minutes=20)
    assert '"reservoir_ml": 1.8' in row["details"]
    assert await history(conn, alert_id) == [
        ("start", "medium", "rules"),
        ("continue", "medium", "rules"),
    ]
    # Notifications go out for the start only; a 'continue' reaches Alertmanager by re-sending.
    assert await outbox(conn) == [
        ("alertmanager", "trigger", "start"),
        ("webhook", "trigger", "start"),
    ]


async def test_continue_history_is_throttled(conn: asyncpg.Connection) -> None:
    book = Book(BookPolicy(continue_history=timedelta(hours=1)))
    (t,) = await book.apply(conn, [finding(reservoir_ml=1.9)])
    for i in range(1, 6):  # every 10 min for 50 min: one row at most per hour
        await book.apply(conn, [finding(minutes=10 * i, reservoir_ml=1.9 - i / 100)])
    await book.apply(conn, [finding(minutes=61, reservoir_ml=1.5)])
    phases = [p for p, _, _ in await history(conn, t.alert.alert_id)]
    assert phases == ["start", "continue"]
    details = await conn.fetchval("SELECT details FROM alerts WHERE alert_id=$1", t.alert.alert_id)
    assert '"reservoir_ml": 1.5' in details  # the alert row itself always has the latest figures


async def test_escalate_de_escalate_end_and_a_new_alert_after(conn: asyncpg.Connection) -> None:
    book = Book(BOTH)
    (start,) = await book.apply(conn, [finding(rule="refill_due", priority="medium", seq=1)])
    alert_id = start.alert.alert_id
    await acknowledge(conn, alert_id, "alice")
    await book.reload(conn, [alert_id])

    (up,) = await book.apply(conn, [finding(rule="refill_due", priority="high", seq=2, minutes=5)])
    assert (up.phase, up.alert.priority, up.previous_priority) == ("escalate", "high", "medium")
    assert up.alert.acked_by is None  # the acknowledgement covered the medium alert only
    (down,) = await book.apply(
        conn, [finding(rule="refill_due", priority="medium", seq=3, minutes=9)]
    )
    assert (down.phase, down.alert.priority) == ("de-escalate", "medium")
    (end,) = await book.apply(conn, [finding(rule="refill_due", active=False, seq=4, minutes=12)])
    assert end.phase == "end"

    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", alert_id)
    assert row["ended_at"] == T0 + timedelta(minutes=12)
    assert row["resolved_by"] is None and row["phase"] == "end"
    assert await history(conn, alert_id) == [
        ("start", "medium", "rules"),
        ("ack", "medium", "alice"),
        ("escalate", "high", "rules"),
        ("de-escalate", "medium", "rules"),
        ("end", "medium", "rules"),
    ]
    assert "refill_due" not in {k[1] for k in book.open_alerts}
    # An inactive Finding without an open alert does nothing; a new condition is a new alert.
    assert await book.apply(conn, [finding(rule="refill_due", active=False, minutes=13)]) == []
    (again,) = await book.apply(conn, [finding(rule="refill_due", minutes=20, seq=5)])
    assert again.phase == "start" and again.alert.alert_id != alert_id
    assert await conn.fetchval("SELECT count(*) FROM alerts WHERE ended_at IS NULL") == 1


async def test_start_and_end_in_one_batch(conn: asyncpg.Connection) -> None:
    book = Book()
    done = await book.apply(
        conn,
        [
            finding("P-1", seq=1),
            finding("P-2", seq=1),
            finding("P-1", active=False, seq=2, minutes=1),
            finding("P-1", seq=3, minutes=2),
        ],
    )
    assert [t.phase for t in done] == ["start", "start", "end", "start"]
    rows = await conn.fetch(
        "SELECT pump_id, ended_at IS NULL AS open FROM alerts ORDER BY alert_id"
    )
    assert [tuple(r) for r in rows] == [("P-1", False), ("P-2", True), ("P-1", True)]
    assert set(book.open_alerts) == {("P-1", "low_reservoir"), ("P-2", "low_reservoir")}


async def test_acknowledge_is_not_ending_and_resolve_ends(conn: asyncpg.Connection) -> None:
    book = Book(BOTH)
    (t,) = await book.apply(conn, [finding(rule="over_infusion", priority="high")])
    alert_id = t.alert.alert_id

    acked = await acknowledge(
        conn, alert_id, "alice", note="calling the patient", receivers=BOTH.receivers
    )
    assert acked.acked_by == "alice" and acked.ended_at is None
    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", alert_id)
    assert row["acked_by"] == "alice" and row["acked_at"] is not None and row["ended_at"] is None
    with pytest.raises(AlertError, match="already acknowledged by alice"):
        await acknowledge(conn, alert_id, "bob")

    gone = await resolve(conn, alert_id, "bob", note="pump replaced", receivers=BOTH.receivers)
    assert gone.resolved_by == "bob" and gone.ended_at is not None
    with pytest.raises(AlertError, match=f"alert {alert_id} already ended .*resolved by bob"):
        await resolve(conn, alert_id, "carol")
    with pytest.raises(AlertError, match="no alert 999"):
        await acknowledge(conn, 999, "alice")

    notes = await conn.fetch(
        "SELECT phase, actor, note FROM alert_history WHERE alert_id = $1 ORDER BY id", alert_id
    )
    assert [tuple(r) for r in notes] == [
        ("start", "rules", None),
        ("ack", "alice", "calling the patient"),
        ("end", "bob", "pump replaced"),
    ]
    # Alertmanager has no acknowledgement; the webhook hears all three.
    assert await outbox(conn) == [
        ("alertmanager", "trigger", "start"),
        ("webhook", "trigger", "start"),
        ("webhook", "acknowledge", "ack"),
        ("alertmanager", "resolve", "end"),
        ("webhook", "resolve", "end"),
    ]


async def test_unacknowledged_high_alert_escalates_after_the_configured_time(
    conn: asyncpg.Connection,
) -> None:
    book = Book(BookPolicy(unacked_escalation=timedelta(minutes=10), receivers=("alertmanager",)))
    (high,) = await book.apply(conn, [finding("P-1", rule="under_infusion", priority="high")])
    (acked,) = await book.apply(conn, [finding("P-2", rule="under_infusion", priority="high")])
    (medium,) = await book.apply(conn, [finding("P-3", rule="low_reservoir")])
    # Acknowledged by another process: this book's copy is stale, the database is not.
    await acknowledge(conn, acked.alert.alert_id, "alice")

    assert await book.escalate_unacked(conn, T0 + timedelta(minutes=9, seconds=59)) == []
    done = await book.escalate_unacked(conn, T0 + timedelta(minutes=10))
    assert [(t.alert.alert_id, t.phase, t.actor) for t in done] == [
        (high.alert.alert_id, "escalate", "escalation")
    ]
    assert done[0].note == "not acknowledged within 10 min"
    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", high.alert.alert_id)
    assert row["escalated_at"] == T0 + timedelta(minutes=10) and row["phase"] == "escalate"
    assert row["ended_at"] is None and row["priority"] == "high"
    # Once only; and the acknowledged and the medium alerts never.
    assert await book.escalate_unacked(conn, T0 + timedelta(hours=5)) == []
    escalated = await conn.fetch("SELECT alert_id FROM alerts WHERE escalated_at IS NOT NULL")
    assert [r[0] for r in escalated] == [high.alert.alert_id]
    assert medium.alert.alert_id not in {r[0] for r in escalated}
    # Re-notified: the Alertmanager label set changes, so it groups and sends it anew.
    ev = await conn.fetchval(
        "SELECT event FROM alert_outbox WHERE alert_id = $1 ORDER BY id DESC LIMIT 1",
        high.alert.alert_id,
    )
    assert '"escalated": true' in ev and '"phase": "escalate"' in ev


async def test_open_alerts_survive_a_restart_and_replays_never_re_raise(
    conn: asyncpg.Connection,
) -> None:
    first = Book()
    (t,) = await first.apply(conn, [finding(seq=10, reservoir_ml=1.9)])

    second = Book()  # a restarted ingester
    assert await second.load(conn) == 1
    assert second.open_alerts[("P-1", "low_reservoir")].alert_id == t.alert.alert_id
    # The same Finding again, and a Finding from an older message: no new alert, no write.
    assert await second.apply(conn, [finding(seq=10, reservoir_ml=1.9)]) == []
    assert await second.apply(conn, [finding(seq=9, active=False, minutes=-10)]) == []
    (end,) = await second.apply(conn, [finding(seq=11, active=False, minutes=10)])
    assert (end.phase, end.alert.alert_id) == ("end", t.alert.alert_id)
    assert await conn.fetchval("SELECT count(*) FROM alerts") == 1
    assert await Book().load(conn) == 0


async def test_outbox_rows_commit_with_their_transition_or_not_at_all(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = Book(BOTH)
    real = book_mod.write_outbox

    async def broken(*args: object, **kwargs: object) -> int:
        await real(*args, **kwargs)  # type: ignore[arg-type]
        raise RuntimeError("crash after the outbox insert")

    monkeypatch.setattr(book_mod, "write_outbox", broken)
    with pytest.raises(RuntimeError, match="crash after"):
        await book.apply(conn, [finding()])
    for table in ("alerts", "alert_history", "alert_outbox"):
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert book.open_alerts == {}  # memory changes only after a commit

    monkeypatch.setattr(book_mod, "write_outbox", real)
    assert [t.phase for t in await book.apply(conn, [finding()])] == ["start"]
    # One transaction wrote the alert, its history and its notifications.
    xids = await conn.fetch(
        """SELECT xmin::text FROM alerts UNION SELECT xmin::text FROM alert_history
           UNION SELECT xmin::text FROM alert_outbox"""
    )
    assert len(xids) == 1
    assert await conn.fetchval("SELECT count(*) FROM alert_outbox") == 2


async def test_no_receiver_configured_writes_no_outbox_rows(conn: asyncpg.Connection) -> None:
    book = Book(BookPolicy(receivers=()))
    (t,) = await book.apply(conn, [finding(priority="high")])
    await acknowledge(conn, t.alert.alert_id, "alice")
    assert await conn.fetchval("SELECT count(*) FROM alert_history") == 2
    assert await conn.fetchval("SELECT count(*) FROM alert_outbox") == 0


async def test_a_person_resolving_under_a_stale_book_does_not_get_overwritten(
    conn: asyncpg.Connection,
) -> None:
    book = Book()
    (t,) = await book.apply(conn, [finding(seq=1, reservoir_ml=1.9)])
    await resolve(conn, t.alert.alert_id, "bob")  # the book does not know
    # The condition still holds: the book notices its copy is stale and starts a new alert
    # rather than writing 'continue' over the resolved one.
    (again,) = await book.apply(conn, [finding(seq=2, minutes=10, reservoir_ml=1.8)])
    assert again.phase == "start" and again.alert.alert_id != t.alert.alert_id
    old = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", t.alert.alert_id)
    assert old["resolved_by"] == "bob" and old["phase"] == "end"


async def test_the_open_alerts_query_reads_the_book(conn: asyncpg.Connection) -> None:
    from pumpfleet.schema.queries import QUERIES

    book = Book()
    await book.apply(conn, [finding("P-1"), finding("P-2", rule="battery", priority="high")])
    (t,) = await book.apply(conn, [finding("P-3")])
    await acknowledge(conn, t.alert.alert_id, "alice")
    await book.apply(conn, [finding("P-1", active=False, minutes=1)])
    rows = [tuple(r) for r in await conn.fetch(QUERIES["open_alerts"])]
    assert rows == [
        ("P-2", "battery", "high", "start", False),
        ("P-3", "low_reservoir", "medium", "start", True),
    ]
