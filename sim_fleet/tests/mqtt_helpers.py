"""Test tools for the simulator's MQTT tests: a recording subscriber, waiting with deadlines."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pumpfleet import contract

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last {value!r}")
        time.sleep(0.02)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    message: contract.Message

    @property
    def key(self) -> tuple[str, int]:
        return self.message.pump_id, self.message.seq


class FleetSubscriber:
    """Records and decodes (with the contract, which must pass) everything on `topic_filter`.

    A persistent session, so what is published while the broker restarts is queued for it.
    """

    def __init__(self, host: str, port: int, topic_filter: str = "pumps/#") -> None:
        self.topic_filter = topic_filter
        self.received: list[Received] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"sim-test-sub-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(host, port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, "the subscription")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(self.topic_filter, qos=1)

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

    def close(self) -> None:
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()


@contextmanager
def fleet_subscriber(
    host: str, port: int, topic_filter: str = "pumps/#"
) -> Iterator[FleetSubscriber]:
    sub = FleetSubscriber(host, port, topic_filter)
    try:
        yield sub
    finally:
        sub.close()
