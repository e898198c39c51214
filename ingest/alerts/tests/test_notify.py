"""Notifications: the outbox delivered to a real Alertmanager and to a webhook, and kept while
a receiver is unreachable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from ingest.alerts._book import Book, BookPolicy, acknowledge, resolve
from ingest.alerts._notify import Notifier, render_alertmanager
from ingest.alerts.tests.helpers import T0, finding
from pumpfleet import alertmanager
from pumpfleet.settings import AlertSettings
from pumpfleet.stack import free_port
from pumpfleet.testing import Sink, until

pytestmark = pytest.mark.integration

FAST = {"retry_min_s": 0.05, "retry_max_s": 0.2, "http_timeout_s": 2}


async def am_alerts(am: alertmanager.Alertmanager) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"{am.url}/api/v2/alerts")
        resp.raise_for_status()
        out: list[dict[str, Any]] = resp.json()
        return out


async def pending(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM alert_outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
        )
    )


async def test_webhook_gets_trigger_acknowledge_resolve_with_one_dedup_key(
    conn: asyncpg.Connection, db: str, sink: Sink
) -> None:
    cfg = AlertSettings(webhook_url=sink.url, webhook_token="s3cret", **FAST)
    book = Book(BookPolicy(receivers=("webhook",)))
    (t,) = await book.apply(
        conn, [finding(rule="pocket_fill", priority="high", gap_ml=1.4, limit_ml=1.0)]
    )
    alert_id = t.alert.alert_id
    await acknowledge(conn, alert_id, "alice", note="on it", receivers=("webhook",))
    await resolve(conn, alert_id, "bob", receivers=("webhook",))

    async with Notifier(cfg, db) as notifier:
        assert await notifier.deliver(conn, "webhook") == 3
    assert await pending(conn) == 0

    bodies = sink.bodies
    assert [b["event_action"] for b in bodies] == ["trigger", "acknowledge", "resolve"]
    assert {b["dedup_key"] for b in bodies} == {f"pumpfleet-alert-{alert_id}"}
    first = bodies[0]
    assert first["severity"] == "critical" and first["priority"] == "high"
    assert (first["pump_id"], first["rule"], first["clinic"]) == ("P-1", "pocket_fill", "north")
    assert first["details"] == {"gap_ml": 1.4, "limit_ml": 1.0}
    assert first["summary"] == "pocket_fill on P-1"
    assert first["started_at"] == T0.isoformat().replace("+00:00", "Z")
    assert first["links"][0]["href"].endswith(f"/alerts/{alert_id}")
    assert (bodies[1]["acked_by"], bodies[1]["note"]) == ("alice", "on it")
    assert (bodies[2]["resolved_by"], bodies[2]["phase"]) == ("bob", "end")
    assert sink.requests[0]["headers"]["Authorization"] == "Bearer s3cret"


async def test_unreachable_receiver_keeps_rows_and_delivers_in_order_once_up(
    conn: asyncpg.Connection, db: str
) -> None:
    port = free_port()
    cfg = AlertSettings(webhook_url=f"http://127.0.0.1:{port}/hook", **FAST)
    book = Book(BookPolicy(receivers=("webhook",)))
    for i in range(3):
        await book.apply(conn, [finding(f"P-{i + 1}", priority="high")])
    await book.apply(conn, [finding("P-1", active=False, minutes=5)])

    async with Notifier(cfg, db) as notifier:
        assert await notifier.deliver(conn, "webhook") == 0
        row = await conn.fetchrow(
            "SELECT attempts, last_error FROM alert_outbox ORDER BY id LIMIT 1"
        )
        assert row["attempts"] == 1 and "Connect" in row["last_error"]
        assert await pending(conn) == 4  # nothing lost, nothing skipped past the failure

        sink = Sink(port=port)
        try:
            await until(lambda: notifier.deliver(conn, "webhook"), what="delivery after backoff")
            await until(lambda: _none_pending(conn), what="every row delivered")
            assert [(b["pump_id"], b["event_action"]) for b in sink.bodies] == [
                ("P-1", "trigger"),
                ("P-2", "trigger"),
                ("P-3", "trigger"),
                ("P-1", "resolve"),
            ]
        finally:
            sink.close()
    assert notifier.stats.errors >= 1


async def _none_pending(conn: asyncpg.Connection) -> bool:
    return await pending(conn) == 0


async def test_a_refused_notification_is_marked_failed_and_the_rest_go_on(
    conn: asyncpg.Connection, db: str
) -> None:
    sink = Sink(statuses=[400])
    try:
        cfg = AlertSettings(webhook_url=sink.url, **FAST)
        book = Book(BookPolicy(receivers=("webhook",)))
        await book.apply(conn, [finding("P-1"), finding("P-2")])
        async with Notifier(cfg, db) as notifier:
            assert await notifier.deliver(conn, "webhook") == 1
        states = await conn.fetch(
            "SELECT failed_at IS NOT NULL, delivered_at IS NOT NULL, last_error "
            "FROM alert_outbox ORDER BY id"
        )
        assert [tuple(r)[:2] for r in states] == [(True, False), (False, True)]
        assert states[0][2].startswith("HTTP 400")
        assert [b["pump_id"] for b in sink.bodies] == ["P-2"]
    finally:
        sink.close()


async def test_alertmanager_receives_groups_relabels_and_resolves(
    conn: asyncpg.Connection, db: str, am: alertmanager.Alertmanager, sink: Sink
) -> None:
    cfg = AlertSettings(alertmanager_url=am.url, **FAST)
    book = Book(BookPolicy(receivers=("alertmanager",)))
    (t1,) = await book.apply(conn, [finding("P-1", priority="high", reservoir_ml=0.0)])
    await book.apply(conn, [finding("P-2", rule="battery", priority="high")])
    async with Notifier(cfg, db) as notifier:
        assert await notifier.deliver(conn, "alertmanager") == 2

        alerts = await am_alerts(am)
        by_pump = {a["labels"]["pump_id"]: a for a in alerts}
        assert by_pump["P-1"]["labels"] == {
            "alertname": "low_reservoir",
            "pump_id": "P-1",
            "priority": "high",
            "clinic": "north",
        }
        notes = by_pump["P-1"]["annotations"]
        assert notes["summary"] == "low_reservoir on P-1"
        assert notes["figures"] == "reservoir_ml=0" and notes["reservoir_ml"] == "0"
        assert notes["alert_id"] == str(t1.alert.alert_id)
        assert by_pump["P-1"]["status"]["state"] == "active"
        assert by_pump["P-1"]["generatorURL"].endswith(f"/alerts/{t1.alert.alert_id}")

        # Alertmanager groups by clinic and priority: both alerts in one notification.
        group = await until(lambda: _notification(sink, "firing"), what="grouped notification")
        assert group["groupLabels"] == {"clinic": "north", "priority": "high"}
        assert {a["labels"]["pump_id"] for a in group["alerts"]} == {"P-1", "P-2"}

        # De-escalation changes the priority label: the old label set ends, the new one fires.
        await book.apply(conn, [finding("P-2", rule="battery", priority="medium", minutes=1)])
        await book.apply(conn, [finding("P-1", active=False, minutes=2)])
        assert await notifier.deliver(conn, "alertmanager") == 2
        alerts = await am_alerts(am)
        assert [(a["labels"]["pump_id"], a["labels"]["priority"]) for a in alerts] == [
            ("P-2", "medium")
        ]
        resolved = await until(lambda: _notification(sink, "resolved"), what="resolved")
        assert {a["labels"]["pump_id"] for a in resolved["alerts"]} == {"P-1", "P-2"}
        assert all(a["status"] == "resolved" for a in resolved["alerts"])


async def _notification(sink: Sink, status: str) -> dict[str, Any] | None:
    for body in sink.bodies:
        if body.get("status") == status:
            found: dict[str, Any] = body
            return found
    return None


async def test_open_alerts_are_re_sent_to_an_alertmanager_that_forgot_them(
    conn: asyncpg.Connection, db: str, am: alertmanager.Alertmanager
) -> None:
    book = Book(BookPolicy(receivers=()))  # as if every notification had been lost
    await book.apply(conn, [finding("P-1"), finding("P-3", rule="battery", priority="low")])
    await book.apply(conn, [finding("P-1", active=False, minutes=1)])
    async with Notifier(AlertSettings(alertmanager_url=am.url, **FAST), db) as notifier:
        assert await notifier.step(conn) == 0  # nothing in the outbox, but the re-send ran
        alerts = await am_alerts(am)
    assert [(a["labels"]["pump_id"], a["labels"]["clinic"]) for a in alerts] == [("P-3", "south")]
    assert notifier.stats.resent == 1


def test_alertmanager_timestamps_never_run_ahead_of_now() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ev = {
        "alert_id": 7,
        "pump_id": "P-1",
        "rule": "battery",
        "clinic": "north",
        "priority": "high",
        "phase": "escalate",
        "summary": "EOS",
        "details": {"days_to_eos": 3.5, "bad key!": 1},
        "started_at": (now + timedelta(minutes=5)).isoformat(),
        "ended_at": (now + timedelta(minutes=8)).isoformat(),
        "escalated": True,
        "previous_priority": "high",
        "previous_escalated": False,
    }
    old, new = render_alertmanager(ev, "http://x/{alert_id}", now)
    assert new["startsAt"] == new["endsAt"] == "2026-01-01T00:00:00.000Z"
    assert new["labels"]["escalation"] == "unacknowledged"
    assert "escalation" not in old["labels"] and old["endsAt"] == "2026-01-01T00:00:00.000Z"
    assert new["annotations"]["bad_key_"] == "1" and new["generatorURL"] == "http://x/7"


async def test_binary_missing_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setattr(alertmanager, "BINARY_NAMES", ("no-such-alertmanager",))
    with pytest.raises(alertmanager.AlertmanagerError, match="apt-get install prometheus-alert"):
        alertmanager.start(tmp_path, "http://127.0.0.1:9/")
