"""Test-side tools: a recording MQTT subscriber, a scripted driver, waiting with deadlines."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent import Agent, Observation
from pumpfleet import contract

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last {value!r}")
        time.sleep(0.02)


def telemetry_fields(reservoir_ml: float = 15.0, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
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
    fields.update(over)
    return fields


class ScriptedDriver:
    """Hands out a fixed list of observations as the agent's clock passes their times."""

    def __init__(self, pump_id: str, observations: list[Observation], interval_s: float = 60.0):
        self.pump_id = pump_id
        self.reporting_interval_s = interval_s
        self._pending = sorted(observations, key=lambda o: o.time)

    def advance(self, until: datetime) -> list[Observation]:
        out = [o for o in self._pending if o.time <= until]
        self._pending = self._pending[len(out) :]
        return out

    @property
    def remaining(self) -> int:
        return len(self._pending)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    message: contract.Message

    @property
    def seq(self) -> int:
        return self.message.seq


class Subscriber:
    """Records every message on one pump's topics, decoded with the contract (which must pass).

    `persistent` keeps a broker session (clean_start False), so messages published while this
    subscriber is away (e.g. the broker restarting) are queued for it and arrive later.
    """

    def __init__(
        self, host: str, port: int, pump_id: str, *, persistent: bool = True, name: str = ""
    ) -> None:
        self.pump_id = pump_id
        self.received: list[Received] = []
        self.errors: list[str] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{name or uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if persistent else 0
        self.client.connect(host, port, clean_start=not persistent, properties=props)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, 10, "the subscription")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(f"{contract.TOPIC_ROOT}/{self.pump_id}/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            decoded = contract.decode(msg.topic, msg.payload)
        except contract.ContractError as exc:
            with self._lock:
                self.errors.append(f"{msg.topic}: {exc}")
            return
        with self._lock:
            self.received.append(Received(msg.topic, bytes(msg.payload), msg.retain, decoded))

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def data(self) -> list[Received]:
        """Telemetry and events (not status), in arrival order, duplicates included."""
        return [r for r in self.snapshot() if r.message.kind != "status"]

    def statuses(self) -> list[Received]:
        return [r for r in self.snapshot() if r.message.kind == "status"]

    def seqs(self) -> set[int]:
        return {r.seq for r in self.snapshot()}

    def close(self) -> None:
        """Disconnect and end the broker session, so it stops queueing for a finished test."""
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()


@contextmanager
def subscriber(host: str, port: int, pump_id: str, **kw: Any) -> Iterator[Subscriber]:
    sub = Subscriber(host, port, pump_id, **kw)
    try:
        yield sub
    finally:
        sub.close()


@contextmanager
def agent_thread(agent: Agent, flush_timeout_s: float = 5.0) -> Iterator[threading.Thread]:
    """Run an agent in a thread; stop it cleanly when the block ends (errors re-raised)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            agent.run(poll_s=0.05, flush_timeout_s=flush_timeout_s)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"agent-{agent.pump_id}", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        agent.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "agent thread did not stop"
    if errors:
        raise errors[0]


class AgentProcess:
    """`pumpfleet agent` as a child process, so it can be SIGKILLed like a crashing device."""

    def __init__(self, mqtt_url: str, pump_id: str, state_dir: Path, *args: str) -> None:
        self.state_dir = state_dir
        self.log = state_dir / f"agent-{pump_id}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUMPFLEET_")}
        env.update(
            PUMPFLEET_MQTT__URL=mqtt_url,
            PUMPFLEET_CONFIG=str(state_dir / "none.toml"),
            PUMPFLEET_RUN_DIR=str(state_dir),
        )
        argv = [sys.executable, "-m", "pumpfleet.cli", "--log-level", "DEBUG", "agent"]
        argv += ["--pump-id", pump_id, "--state-dir", str(state_dir), *args]
        state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=state_dir)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def queued_seqs(db: Path) -> list[int]:
    """The seqs in an agent's outbox, read without taking the agent's lock."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return [r[0] for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
        except sqlite3.OperationalError:  # schema not created yet
            return []


def past(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
