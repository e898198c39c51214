"""Test support, not product code: shared by the tests of every part, the benchmarks and the
chaos soak (`pumpfleet soak`).

Waiting with deadlines instead of sleeps (`wait_until`, `until`), one recording MQTT subscriber
(`RecordingSubscriber`, which decodes with the contract), a valid telemetry body
(`telemetry_fields`) and a recording HTTP receiver for webhooks and Alertmanager (`Sink`).
Nothing in the product imports this module.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pumpfleet import contract
from pumpfleet.broker import BrokerOptions

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


async def until(
    check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Poll an async check until it returns something truthy, or fail after the deadline.

    Returns Any: the truthy value is the check's minus its falsy cases (None, []), which the
    type system cannot say, and tests index into it.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")


def telemetry_fields(reservoir_ml: float = 15.0, **over: Any) -> dict[str, Any]:
    """The measurement fields of a valid telemetry message; `over` replaces any of them."""
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
        # contract v2
        "reservoir_source": "calculated",
        "reporting_interval_s": 600,
        "scheduled_ul_per_h": 10.4,
    }
    fields.update(over)
    return fields


@dataclass(frozen=True)
class Received:
    """One message as a `RecordingSubscriber` got it, with its contract decoding."""

    topic: str
    payload: bytes
    retain: bool
    message: contract.Message

    @property
    def seq(self) -> int:
        return self.message.seq

    @property
    def key(self) -> tuple[str, int]:
        return self.message.pump_id, self.message.seq


class RecordingSubscriber:
    """Records and decodes (with the contract, which must pass) everything on `topic_filter`.

    Messages that fail the contract land in `errors` instead of `received`. `persistent` keeps a
    broker session (clean_start False, expiring after `session_expiry_s`), so what is published
    while this subscriber is away (e.g. the broker restarting) is queued for it and arrives
    later. The constructor returns once the broker acknowledged the subscription (SUBACK), or
    fails after `subscribe_timeout`. `close()` ends the broker session too.
    """

    def __init__(
        self,
        mqtt_url: str,
        topic_filter: str = f"{contract.TOPIC_ROOT}/#",
        *,
        persistent: bool = True,
        session_expiry_s: int = 3600,
        client_id: str | None = None,
        client_id_prefix: str = "test-sub",
        subscribe_timeout: float = 10.0,
    ) -> None:
        self.topic_filter = topic_filter
        self.received: list[Received] = []
        self.errors: list[str] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        options = BrokerOptions.from_url(mqtt_url)
        self.client = options.paho_client(
            client_id or f"{client_id_prefix}-{uuid.uuid4().hex[:10]}"
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s if persistent else 0
        self.client.connect(
            options.host, options.port, clean_start=not persistent, properties=props
        )
        self.client.loop_start()
        wait_until(self.subscribed.is_set, subscribe_timeout, "the subscription")

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


class Sink:
    """A tiny HTTP server that records every JSON POST; answers `statuses` in turn, then 200."""

    def __init__(self, port: int = 0, statuses: Iterable[int] = ()) -> None:
        self.requests: list[dict[str, Any]] = []
        self._statuses = list(statuses)
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._lock:
                    status = sink._statuses.pop(0) if sink._statuses else 200
                    if status < 300:
                        sink.requests.append(
                            {
                                "path": self.path,
                                "headers": dict(self.headers),
                                "body": json.loads(raw),
                            }
                        )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def bodies(self) -> list[Any]:
        with self._lock:
            return [r["body"] for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
