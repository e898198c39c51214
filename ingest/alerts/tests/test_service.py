"""Alerting wired to a rule engine: rebuild at start, Findings per committed batch, watchdog,
escalation clock, notifier, and the Ingester's on_commit hook with a real broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from ingest import Ingester
from ingest._store import prepare, write_batch
from ingest.alerts import _service as service
from ingest.alerts._book import Book, acknowledge
from ingest.alerts._service import Alerting
from ingest.alerts.tests.helpers import T0, finding
from pumpfleet import contract
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions
from pumpfleet.contract import Message
from pumpfleet.findings import Finding
from pumpfleet.settings import Settings
from pumpfleet.testing import Sink, until

pytestmark = pytest.mark.integration


def telemetry(pump_id: str, seq: int, reservoir_ml: float, at: datetime | None = None) -> Message:
    body = {
        "v": 1,
        "pump_id": pump_id,
        "time": (at or T0 + timedelta(minutes=10 * seq)).isoformat(),
        "seq": seq,
        "delivered_ul_per_h": 10.4,
        "programmed_rate_ul_per_h": 10.4,
        "programmed_dose_mcg_per_day": 500.0,
        "reservoir_ml": reservoir_ml,
        "reservoir_capacity_ml": 20.0,
        "low_reservoir_alarm_ml": 2.0,
        "concentration_mcg_per_ml": 2000.0,
        "battery_pct": 80.0,
        "battery_eri": False,
        "pump_state": "infusing",
        "alarms": [],
    }
    return contract.decode(contract.topic(pump_id, "telemetry"), json.dumps(body))


class FakeEngine:
    """Low reservoir at or below 2 mL (high when empty), silence after an hour; records calls."""

    def __init__(self) -> None:
        self.warmed: list[tuple[str, int, str]] = []
        self.ticks: list[datetime] = []
        self.profiles: dict[str, Any] = {}
        self.last_seen: dict[str, datetime] = {}
        self.low: dict[str, bool] = {}

    def _judge(self, msg: Message) -> Finding | None:
        self.last_seen[msg.pump_id] = msg.time
        if msg.kind != "telemetry":
            return None
        ml = msg.reservoir_ml
        low, was = ml <= 2.0, self.low.get(msg.pump_id, False)
        self.low[msg.pump_id] = low
        if not low and not was:
            return None
        return Finding(
            msg.pump_id,
            "low_reservoir",
            low,
            "high" if ml == 0 else "medium",
            msg.time,
            f"reservoir {ml} mL",
            {"reservoir_ml": ml},
            msg.seq,
        )

    def observe(self, msg: Message) -> list[Finding]:
        f = self._judge(msg)
        return [f] if f else []

    def warm(self, msg: Message) -> None:
        self.warmed.append((msg.pump_id, msg.seq, msg.kind))
        self._judge(msg)

    def tick(self, now: datetime) -> list[Finding]:
        self.ticks.append(now)
        return [
            Finding(p, "telemetry_silence", True, "low", now, "silent", {"silent_s": 3600})
            for p, seen in self.last_seen.items()
            if now - seen >= timedelta(hours=1)
        ]

    def set_profile(self, profile: Any) -> None:
        self.profiles[profile["pump_id"]] = profile


def settings(db: str, **alerts: Any) -> Settings:
    return Settings(
        database_url=db,
        alerts={"retry_min_s": 0.05, "retry_max_s": 0.2, "poll_s": 0.05, **alerts},
    )


async def store(db: str, msgs: Sequence[Message], judged: bool = True) -> None:
    """Store messages as the ingester does; `judged`: as history an earlier alerting instance
    already ran its rules on (their feed rows gone), which a restart replays."""
    conn = await asyncpg.connect(db)
    try:
        await prepare(conn)
        await write_batch(conn, msgs, [])
        if judged:
            await conn.execute("DELETE FROM alert_feed")
    finally:
        await conn.close()


async def test_start_rebuilds_and_on_commit_runs_the_lifecycle(
    conn: asyncpg.Connection, db: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    refill = contract.decode(
        contract.topic("P-1", "event"),
        json.dumps(
            {
                "v": 1,
                "pump_id": "P-1",
                "time": (now - timedelta(minutes=5)).isoformat(),
                "seq": 5,
                "event": "refill",
                "expected_ml": 2.4,
                "withdrawn_ml": 2.3,
                "injected_ml": 18.0,
                "reservoir_after_ml": 18.0,
                "concentration_mcg_per_ml": 2000.0,
            }
        ),
    )
    await store(
        db,
        [
            *(telemetry("P-2", s, 9.0, now - timedelta(minutes=30 - s)) for s in range(3)),
            *(telemetry("P-1", s, 3.0 - s / 10, now - timedelta(minutes=60 - s)) for s in range(5)),
            refill,
            telemetry("P-3", 0, 9.0, now - timedelta(hours=49)),  # older than the warm window
        ],
    )
    await Book().apply(conn, [finding("P-2", rule="battery")])  # open before the restart

    engine = FakeEngine()
    alerting = Alerting(
        settings(db, clock="fleet", continue_history_s=0), engine, profile_factory=dict
    )
    try:
        await alerting.start()
        assert engine.warmed == [
            *(("P-1", s, "telemetry") for s in range(5)),
            ("P-1", 5, "event"),
            *(("P-2", s, "telemetry") for s in range(3)),
        ]
        assert {p: v["clinic"] for p, v in engine.profiles.items()} == {
            "P-1": "north",
            "P-2": "north",
            "P-3": "south",
        }
        assert set(alerting.book.open_alerts) == {("P-2", "battery")}
        # fleet clock: the newest telemetry time (events take the urgent lane: not the clock)
        assert alerting.now() == now - timedelta(minutes=28)

        await alerting.on_commit([telemetry("P-1", 6, 1.9, now), telemetry("P-2", 3, 9.0, now)])
        await alerting.on_commit([telemetry("P-1", 7, 1.8, now + timedelta(seconds=1))])
        await alerting.on_commit([telemetry("P-1", 8, 2.6, now + timedelta(seconds=2))])
        rows = await conn.fetch(
            "SELECT h.phase FROM alert_history h JOIN alerts a USING (alert_id) "
            "WHERE a.pump_id = 'P-1' ORDER BY h.id"
        )
        assert [r[0] for r in rows] == ["start", "continue", "end"]
        assert await conn.fetchval("SELECT count(*) FROM alerts WHERE pump_id = 'P-1'") == 1

        # Watchdog on the fleet clock: no silence yet; an hour of device time later there is.
        await alerting.tick()
        assert engine.ticks[-1] == now + timedelta(seconds=2)
        await alerting.on_commit([telemetry("P-2", 4, 9.0, now + timedelta(hours=1, seconds=3))])
        done = await alerting.tick()
        assert [(t.alert.pump_id, t.alert.rule, t.phase) for t in done] == [
            ("P-1", "telemetry_silence", "start")
        ]
    finally:
        await alerting.close()


async def test_run_notifies_escalates_on_its_clock_and_stops(
    conn: asyncpg.Connection, db: str, sink: Sink
) -> None:
    clock = [T0]
    alerting = Alerting(
        settings(db, webhook_url=sink.url, tick_s=0.05, unacked_escalation_s=60),
        FakeEngine(),
        profile_factory=None,
        clock=lambda: clock[0],
    )
    await alerting.start()
    task = asyncio.create_task(alerting.run())
    try:
        await alerting.on_commit([telemetry("P-1", 1, 0.0, T0)])
        first = await until(lambda: _bodies(sink, 1), what="trigger at the webhook")
        assert (first[0]["event_action"], first[0]["priority"]) == ("trigger", "high")

        clock[0] = T0 + timedelta(seconds=61)  # nobody acknowledged within 60 s
        bodies = await until(lambda: _bodies(sink, 2), what="escalation at the webhook")
        assert (bodies[1]["phase"], bodies[1]["escalated"]) == ("escalate", True)
        assert bodies[1]["dedup_key"] == bodies[0]["dedup_key"]
    finally:
        alerting.stop()
        await asyncio.wait_for(task, timeout=10)
    assert alerting._conn is None  # closed on the way out
    assert await conn.fetchval("SELECT count(*) FROM alert_outbox WHERE delivered_at IS NULL") == 0


async def _bodies(sink: Sink, n: int) -> list[Any] | None:
    return sink.bodies if len(sink.bodies) >= n else None


async def test_an_acknowledgement_from_the_cli_reaches_the_running_book(
    conn: asyncpg.Connection, db: str
) -> None:
    alerting = Alerting(settings(db), FakeEngine(), profile_factory=None, clock=lambda: T0)
    try:
        await alerting.start()
        await alerting.on_commit([telemetry("P-1", 1, 0.0, T0)])
        alert = alerting.book.open_alerts[("P-1", "low_reservoir")]
        await acknowledge(conn, alert.alert_id, "alice")  # another process; it sends a NOTIFY

        async def seen() -> bool:
            await alerting.tick()
            return alerting.book.open_alerts[("P-1", "low_reservoir")].acked_by == "alice"

        await until(seen, what="the running book to see the acknowledgement")
    finally:
        await alerting.close()


async def test_a_failing_rule_does_not_stop_the_batch(conn: asyncpg.Connection, db: str) -> None:
    engine = FakeEngine()
    original = engine.observe

    def observe(msg: Message) -> list[Finding]:
        if msg.pump_id == "P-2":
            raise ValueError("rule bug")
        return original(msg)

    engine.observe = observe  # type: ignore[method-assign]
    alerting = Alerting(settings(db), engine, profile_factory=None)
    try:
        await alerting.on_commit([telemetry("P-2", 1, 0.0), telemetry("P-1", 1, 1.0)])
    finally:
        await alerting.close()
    assert alerting.stats.engine_errors == 1
    assert await conn.fetchval("SELECT pump_id FROM alerts") == "P-1"


def test_profiles_come_from_the_registry_and_thresholds_from_settings() -> None:
    row = {
        "pump_id": "P-1",
        "clinic": "north",
        "high_risk": True,
        "low_reservoir_alarm_ml": 4.0,
        "reporting_interval_s": 300,
    }
    profile = service.default_profile(row)
    assert (profile.pump_id, profile.high_risk) == ("P-1", True)
    assert (profile.low_reservoir_alarm_ml, profile.reporting_interval_s) == (4.0, 300)
    assert service.build_engine(Settings()).thresholds.refill_discrepancy_ml == 2.0
    tuned = Settings(alerts={"rules": {"refill_discrepancy_ml": 2.5}})
    assert service.build_engine(tuned).thresholds.refill_discrepancy_ml == 2.5
    with pytest.raises(ValidationError, match="no_such_threshold"):
        service.build_engine(Settings(alerts={"rules": {"no_such_threshold": 1}}))


async def test_the_ingester_hands_committed_messages_to_alerting(
    db: str, conn: asyncpg.Connection, broker: stack_mod.StackInfo
) -> None:
    client_id = f"alerts-test-{uuid.uuid4().hex[:8]}"
    s = Settings(
        database_url=db,
        mqtt={"url": broker.mqtt_url_for("ingest")},
        ingest={"client_id": client_id, "metrics_port": None, "flush_ms": 20},
        alerts={"retry_min_s": 0.05},
    )
    alerting = Alerting(s, FakeEngine(), profile_factory=None)
    await alerting.start()
    ingester = Ingester(s, alerting.on_commit)
    task = asyncio.create_task(ingester.run())
    fleet = BrokerOptions.from_url(broker.mqtt_url_for("fleet"))
    pub = fleet.paho_client(f"alerts-pub-{uuid.uuid4().hex[:8]}")
    try:
        await ingester.wait_connected(timeout=20)
        pub.connect(fleet.host, fleet.port)
        pub.loop_start()
        for seq, ml in ((1, 2.5), (2, 1.9), (2, 1.9), (3, 1.8)):  # seq 2 twice: a redelivery
            msg = telemetry("P-3", seq, ml)
            pub.publish(contract.topic("P-3", "telemetry"), contract.encode(msg), qos=1)

        async def alert() -> Any:
            return await conn.fetchrow(
                "SELECT alert_id, last_seq FROM alerts WHERE pump_id = 'P-3' AND last_seq = 3"
            )

        row = await until(alert, what="the alert raised from published telemetry")
        assert await conn.fetchval("SELECT count(*) FROM alerts") == 1
        phases = await conn.fetch(
            "SELECT phase FROM alert_history WHERE alert_id = $1 ORDER BY id", row["alert_id"]
        )
        assert [p[0] for p in phases] == ["start"]  # 1.8 within the hour: history throttled
    finally:
        pub.loop_stop()
        pub.disconnect()
        ingester.stop()
        await asyncio.wait_for(task, timeout=30)
        await alerting.close()
        stack_mod_forget(broker.mqtt_url_for("ingest"), client_id)


def stack_mod_forget(mqtt_url: str, client_id: str) -> None:
    """Drop the test ingester's persistent session so the broker stops queueing for it."""
    options = BrokerOptions.from_url(mqtt_url)
    c = options.paho_client(client_id)
    c.connect(options.host, options.port, clean_start=True)
    c.disconnect()


async def test_with_the_real_rule_engine_profiles_restart_and_end(
    conn: asyncpg.Connection, db: str
) -> None:
    """The seam with ingest/rules: a high-risk pump's 4 mL alarm comes from `pumps`, and an
    alert raised before a restart is ended by the restarted engine."""
    await conn.execute("UPDATE pumps SET high_risk = true WHERE pump_id = 'P-1'")
    s = settings(db)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    first = Alerting(s, service.build_engine(s))
    try:
        await first.start()
        await first.on_commit([telemetry("P-1", 0, 9.0, t0), telemetry("P-1", 1, 3.9, t0)])
    finally:
        await first.close()
    row = await conn.fetchrow("SELECT * FROM alerts WHERE rule = 'low_reservoir'")
    assert (row["pump_id"], row["priority"], row["ended_at"]) == ("P-1", "medium", None)
    assert '"alarm_ml": 4.0' in row["details"]

    # A restarted ingester whose replay window no longer reaches the low reading: only the
    # open alert (restored into the engine) says the condition was there.
    s = settings(db, warm_hours=1)
    second = Alerting(s, service.build_engine(s))
    try:
        await second.start()
        refilled = [
            telemetry("P-1", 2 + i, 18.0, t0 + timedelta(minutes=10 * (i + 1))) for i in range(4)
        ]
        await second.on_commit(refilled)
    finally:
        await second.close()
    rows = await conn.fetch("SELECT alert_id, ended_at FROM alerts WHERE rule = 'low_reservoir'")
    assert [r["alert_id"] for r in rows] == [row["alert_id"]]  # not raised twice
    assert rows[0]["ended_at"] is not None
