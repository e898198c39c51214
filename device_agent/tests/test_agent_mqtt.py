"""The agent against a real mosquitto: what arrives, in what order, across broker outages,
SIGKILL and clean stops, counted by a subscriber."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent import Agent, BrokerOptions, ConstantPump, Observation, Store
from device_agent._agent import STOP_REASON, WILL_REASON
from pumpfleet import contract
from pumpfleet.stack import StackInfo, start_broker, stop_broker
from pumpfleet.testing import Received, telemetry_fields, wait_until

from .helpers import (
    OWN_PASSWORD,
    OWN_USER,
    AgentProcess,
    ScriptedDriver,
    Subscriber,
    agent_thread,
    own_broker,
    queued_seqs,
    subscriber,
)

pytestmark = pytest.mark.integration


def new_pump() -> str:
    return f"IT-{uuid.uuid4().hex[:10]}"


def options(info: StackInfo) -> BrokerOptions:
    return BrokerOptions.from_url(info.mqtt_url_for("fleet"), keepalive_s=5)


def fast_agent(driver: object, store: Store, where: StackInfo | BrokerOptions) -> Agent:
    return Agent(
        driver,  # type: ignore[arg-type]
        store,
        where if isinstance(where, BrokerOptions) else options(where),
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        connect_timeout_s=5,
    )


def first_arrivals(received: list[Received]) -> list[int]:
    seen: dict[int, None] = {}
    for r in received:
        seen.setdefault(r.seq, None)
    return list(seen)


def assert_no_seq_reused(received: list[Received]) -> None:
    """A seq seen twice must carry the same bytes: a redelivery, never a second message."""
    by_seq: dict[int, bytes] = {}
    for r in received:
        assert by_seq.setdefault(r.seq, r.payload) == r.payload, f"seq {r.seq} reused"


def assert_complete(sub: Subscriber) -> None:
    """Every seq up to the highest arrived, except will seqs of connections whose will the
    broker never published (it does not when it is shut down itself)."""
    received = sub.snapshot()
    assert not sub.errors, sub.errors
    assert_no_seq_reused(received)
    top = max(r.seq for r in received)
    missing = set(range(1, top + 1)) - {r.seq for r in received}
    will_seqs = {r.seq + 1 for r in sub.statuses() if r.message.online}  # type: ignore[union-attr]
    assert missing <= will_seqs, f"lost seqs {sorted(missing - will_seqs)}"
    data = first_arrivals(sub.data())
    assert data == sorted(data), "telemetry and events arrived out of seq order"


def status_of(r: Received) -> contract.Status:
    assert isinstance(r.message, contract.Status)
    return r.message


def test_publishes_what_the_driver_produced_valid_and_consecutive(
    broker: StackInfo, tmp_path: Path
) -> None:
    pump = new_pump()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    observations = [
        Observation("telemetry", t0 + timedelta(minutes=i), telemetry_fields(15.0 - i / 100))
        for i in range(20)
    ]
    observations.insert(
        5,
        Observation(
            "event",
            t0 + timedelta(minutes=4, seconds=30),
            {"event": "alarm_raised", "alarm": "low_reservoir"},
        ),
    )
    observations.insert(
        9,
        Observation(
            "telemetry", t0 + timedelta(minutes=7, seconds=30), telemetry_fields(battery_pct=140.0)
        ),
    )  # a driver bug
    driver = ScriptedDriver(pump, observations)
    with subscriber(broker.mqtt_url_for("ingest"), pump, persistent=False) as sub:
        with Store(tmp_path / "q.sqlite3", pump) as store:
            agent = fast_agent(driver, store, broker)
            with agent_thread(agent):
                wait_until(lambda: len(sub.data()) >= 21, 20, "21 data messages")
            statuses = wait_until(lambda: sub.statuses()[1:] and sub.statuses(), 10, "offline")
            assert len(store) == 0, "everything acknowledged was deleted"
            assert agent.stats.invalid == 1 and agent.stats.acked == 23

        received = sub.snapshot()
        assert not sub.errors, sub.errors
        # 1-21 telemetry and event in driver order, 22 online, 23 the will's seq used by the
        # clean stop's offline status: no gap, nothing else.
        assert first_arrivals(received) == list(range(1, 24))
        data = sub.data()
        assert [r.message.kind for r in data].count("event") == 1
        reservoirs = [getattr(r.message, "reservoir_ml", None) for r in data]
        expected = [o.fields.get("reservoir_ml") for o in observations if o.kind != "status"]
        assert reservoirs == expected[:9] + expected[10:], "the invalid one never left the agent"
        assert [r.message.time for r in data][:3] == [o.time for o in observations[:3]]
        online, offline = (status_of(r) for r in statuses)
        assert (online.seq, online.online, online.reason) == (22, True, None)
        assert (offline.seq, offline.online, offline.reason) == (23, False, STOP_REASON)


def test_broker_outage_replays_every_queued_message_in_order(
    broker: StackInfo, tmp_path: Path
) -> None:
    pump = new_pump()
    driver = ConstantPump(pump, start=datetime.now(UTC), reporting_interval_s=0.02)
    with subscriber(broker.mqtt_url_for("ingest"), pump) as sub:
        with Store(tmp_path / "q.sqlite3", pump) as store:
            agent = fast_agent(driver, store, broker)
            with agent_thread(agent):
                wait_until(lambda: len(sub.data()) >= 20, 20, "traffic before the outage")
                stop_broker(broker)
                wait_until(lambda: not agent.connected, 10, "the agent to notice")
                wait_until(lambda: len(store) >= 200, 30, "a backlog of 200 on disk")
                backlog = {m.seq for m in store.messages()}
                start_broker(broker)
                wait_until(lambda: backlog <= sub.seqs(), 60, "the backlog to arrive")
                wait_until(lambda: agent.connected and agent.stats.connects == 2, 10)
            wait_until(lambda: any(status_of(r).reason == STOP_REASON for r in sub.statuses()), 10)
            assert len(store) == 0
        assert_complete(sub)
        assert max(backlog) < max(sub.seqs())


def test_sigkill_with_a_backlog_loses_nothing(broker: StackInfo, tmp_path: Path) -> None:
    pump = new_pump()
    db = tmp_path / f"{pump}.sqlite3"
    stop_broker(broker)
    first = AgentProcess(broker.mqtt_url_for("fleet"), pump, tmp_path, "--interval-s", "0.02")
    try:
        wait_until(lambda: len(queued_seqs(db)) >= 100, 30, "a backlog of 100 on disk")
    finally:
        first.kill()
    before = queued_seqs(db)
    assert before == list(range(1, before[-1] + 1)) or set(before) == set(
        range(1, before[-1] + 1)
    ) - {2, 3}, "data 1, the reserved status pair 2-3, then data: all on disk"
    start_broker(broker)
    with subscriber(broker.mqtt_url_for("ingest"), pump) as sub:
        second = AgentProcess(broker.mqtt_url_for("fleet"), pump, tmp_path, "--interval-s", "0.5")
        try:
            wait_until(lambda: set(before) <= sub.seqs(), 60, "the killed agent's backlog")
        finally:
            assert second.terminate() == 0, second.log_text()
        wait_until(lambda: any(status_of(r).reason == STOP_REASON for r in sub.statuses()), 10)
        assert_complete(sub)
        assert queued_seqs(db) == [], "a clean stop with a broker drains the outbox"
        online = [status_of(r) for r in sub.statuses() if status_of(r).online]
        assert [s.seq for s in online] == [2], "the never-used status pair was reused"
        assert "broker unreachable" in first.log_text()


def test_last_will_says_offline_when_the_agent_dies(broker: StackInfo, tmp_path: Path) -> None:
    pump = new_pump()
    with subscriber(broker.mqtt_url_for("ingest"), pump, persistent=False) as live:
        proc = AgentProcess(broker.mqtt_url_for("fleet"), pump, tmp_path, "--interval-s", "1")
        try:
            online = status_of(wait_until(lambda: live.statuses(), 20, "online")[0])
            assert online.online is True
            # Retained: a subscriber arriving later is told at once, with the retain flag.
            with subscriber(broker.mqtt_url_for("ingest"), pump, persistent=False) as late:
                got = wait_until(lambda: late.statuses(), 10, "the retained status")[0]
                assert got.retain and status_of(got).online is True
                assert got.seq == online.seq
        finally:
            proc.kill()
        will = status_of(wait_until(lambda: live.statuses()[1:], 20, "the will")[0])
        assert (will.online, will.reason, will.seq) == (False, WILL_REASON, online.seq + 1)
        with subscriber(broker.mqtt_url_for("ingest"), pump, persistent=False) as late:
            got = wait_until(lambda: late.statuses(), 10, "the retained will")[0]
            assert got.retain and json.loads(got.payload)["online"] is False


def test_clean_stop_publishes_retained_offline_and_no_will(
    broker: StackInfo, tmp_path: Path
) -> None:
    pump = new_pump()
    with subscriber(broker.mqtt_url_for("ingest"), pump, persistent=False) as live:
        proc = AgentProcess(broker.mqtt_url_for("fleet"), pump, tmp_path, "--interval-s", "1")
        try:
            wait_until(lambda: live.statuses() and live.data(), 20, "online and telemetry")
        finally:
            assert proc.terminate() == 0, proc.log_text()
        statuses = wait_until(lambda: live.statuses()[1:] and live.statuses(), 10, "offline")
        online, offline = (status_of(r) for r in statuses)
        assert (offline.online, offline.reason, offline.seq) == (False, STOP_REASON, online.seq + 1)
        with subscriber(broker.mqtt_url_for("ingest"), pump, persistent=False) as late:
            got = wait_until(lambda: late.statuses(), 10, "the retained status")[0]
            assert got.retain and status_of(got).reason == STOP_REASON
        assert [status_of(r).reason for r in live.statuses()] == [None, STOP_REASON]
        assert queued_seqs(tmp_path / f"{pump}.sqlite3") == []
        assert 'event="agent starting"' in proc.log_text()


def test_transport_faults_from_the_driver_duplicate_and_delay(
    broker: StackInfo, tmp_path: Path
) -> None:
    pump = new_pump()
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    observations = [
        Observation("telemetry", t0, telemetry_fields(15.0), duplicate=True),
        Observation("telemetry", t0 + timedelta(minutes=1), telemetry_fields(14.9), delay_s=1.0),
        Observation("telemetry", t0 + timedelta(minutes=2), telemetry_fields(14.8)),
    ]
    with subscriber(broker.mqtt_url_for("ingest"), pump, persistent=False) as sub:
        with Store(tmp_path / "q.sqlite3", pump) as store:
            agent = fast_agent(ScriptedDriver(pump, observations), store, broker)
            with agent_thread(agent):
                wait_until(lambda: {1, 2, 3} <= sub.seqs(), 20, "all three")
                wait_until(lambda: [r.seq for r in sub.data()].count(1) == 2, 5, "the copy")
        data = [r.seq for r in sub.data()]
        assert data.index(3) < data.index(2), "the held-back message was overtaken"
        assert_no_seq_reused(sub.snapshot())


def test_a_rejected_puback_keeps_the_message_on_disk_and_the_will_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that denies telemetry answers its PUBACK with 0x87 (not authorized): aiomqtt
    alone would report success and the agent would delete the message."""
    pump = new_pump()
    acl = "topic read pumps/#\ntopic readwrite pumps/+/status\ntopic readwrite pumps/+/event\n"
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    observations = [
        Observation("telemetry", t0, telemetry_fields(15.0)),
        Observation("event", t0 + timedelta(minutes=1), {"event": "mri_start"}),
    ]
    caplog.set_level(logging.INFO, logger="device_agent")
    with (
        own_broker(tmp_path, acl, "max_inflight_messages 7") as port,
        subscriber(
            f"mqtt://{OWN_USER}:{OWN_PASSWORD}@127.0.0.1:{port}", pump, persistent=False
        ) as sub,
        Store(tmp_path / "q.sqlite3", pump) as store,
    ):
        broker = BrokerOptions(port=port, keepalive_s=5, username=OWN_USER, password=OWN_PASSWORD)
        agent = fast_agent(ScriptedDriver(pump, observations), store, broker)
        with agent_thread(agent, flush_timeout_s=0.5):
            wait_until(lambda: agent.stats.rejected >= 2, 20, "two rejections, one per connection")
            wait_until(lambda: 2 in sub.seqs(), 10, "the event, which the broker allows")
            wills = wait_until(
                lambda: [r for r in sub.statuses() if status_of(r).reason == WILL_REASON],
                10,
                "the will of a connection the agent gave up on (DISCONNECT 0x04)",
            )
        queued = {m.seq: m.kind for m in store.messages()}
        assert queued.get(1) == "telemetry", "the rejected message stayed on disk"
        assert 2 not in queued, "the event the broker took was deleted"
        assert set(queued) - {1} <= {r.seq for r in sub.statuses()} | {
            r.seq + 1 for r in sub.statuses()
        }, "nothing else left but status messages"
        assert 1 not in sub.seqs(), "the broker never passed the telemetry on"
        assert agent.stats.connects >= 2 and wills
    connected = [r for r in caplog.records if r.getMessage() == "connected"]
    assert connected and all(getattr(r, "window", None) == 7 for r in connected), (
        "the broker's Receive Maximum"
    )
    assert any("rejected a message" in r.getMessage() for r in caplog.records)
