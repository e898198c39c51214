"""Test-side helpers: build pump messages and publish them at QoS 1 (waiting: pumpfleet.testing)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt

from pumpfleet import contract
from pumpfleet.broker import BrokerOptions
from pumpfleet.testing import telemetry_fields

BASE_TIME = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)


def telemetry(pump_id: str, seq: int, **over: object) -> bytes:
    """A valid telemetry payload; `over` replaces fields (may make it invalid on purpose)."""
    body: dict[str, object] = {
        "v": 2,
        "pump_id": pump_id,
        "time": (BASE_TIME + timedelta(seconds=seq)).isoformat(),
        "seq": seq,
        **telemetry_fields(reservoir_ml=15.0 - seq * 1e-4),
    }
    body.update(over)
    import json

    return json.dumps(body).encode()


def stream(pumps: int, per_pump: int, start_seq: int = 0) -> list[tuple[str, bytes]]:
    """(topic, payload) for `per_pump` consecutive telemetry messages of each pump, interleaved."""
    out = []
    for seq in range(start_seq, start_seq + per_pump):
        for p in range(pumps):
            pump_id = f"T-{p:05d}"
            out.append((contract.topic(pump_id, "telemetry"), telemetry(pump_id, seq)))
    return out


class Publisher:
    """A QoS 1 publisher that can wait until the broker acknowledged everything it sent."""

    def __init__(self, mqtt_url: str, client_id: str | None = None) -> None:
        """`mqtt_url` carries the account (e.g. a stack's `mqtt_url_for("fleet")`)."""
        options = BrokerOptions.from_url(mqtt_url)
        self.client = options.paho_client(client_id or f"test-pub-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(options.host, options.port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, messages: Iterable[tuple[str, bytes]], retain: bool = False) -> None:
        for topic_name, payload in messages:
            self.infos.append(self.client.publish(topic_name, payload, qos=1, retain=retain))

    def wait_acked(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait_info(info, left):
                done = sum(i.is_published() for i in self.infos)
                raise TimeoutError(f"broker acknowledged {done}/{len(self.infos)} publishes")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_info(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
    try:
        info.wait_for_publish(timeout)
    except RuntimeError:  # not yet sent while reconnecting; keep waiting
        deadline = time.monotonic() + timeout
        while not info.is_published() and time.monotonic() < deadline:
            time.sleep(0.01)
    return info.is_published()


def forget_session(mqtt_url: str, client_id: str) -> None:
    """Remove a persistent session from the broker so it stops queueing for a finished test."""
    options = BrokerOptions.from_url(mqtt_url)
    client = options.paho_client(client_id)
    client.connect(options.host, options.port, clean_start=True)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
