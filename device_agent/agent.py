"""The pump agent: driver output -> contract-valid messages -> on-disk outbox -> MQTT, QoS 1.

One thread drives everything (`poll`): it advances the driver, queues what it produced, runs the
paho network loop (whose callbacks therefore run on this thread too) and feeds the broker from the
outbox in seq order, at most `inflight` unacknowledged publishes at a time. Each connection gets a
fresh paho client: when a connection ends, everything unacknowledged goes back to "not sent" and
the next connection starts again from the lowest queued seq. Reconnecting after an outage and
restarting after SIGKILL are therefore the same code path, and order holds across both.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from pumpfleet import contract
from pumpfleet.broker import BrokerOptions

from .driver import Observation, PumpDriver
from .store import Entry, Store, Will

__all__ = ["Agent", "AgentStats", "BrokerOptions", "build_entry", "client_id"]

log = logging.getLogger("device_agent")

_ENVELOPE = frozenset({"v", "pump_id", "seq", "kind", "time"})
WILL_REASON = "connection lost"
STOP_REASON = "agent stopped"


def client_id(pump_id: str) -> str:
    """Fixed per pump, so the broker keeps one session per pump across reconnects."""
    return f"pump-{pump_id}"


def utc_now() -> datetime:
    return datetime.now(UTC)


# configuration ----------------------------------------------------------------------------------


@dataclass
class AgentStats:
    """Counters since the agent started (the backlog itself is `len(agent.store)`)."""

    queued: int = 0
    invalid: int = 0
    """Observations that broke the contract: logged and never sent (a driver bug)."""
    published: int = 0
    acked: int = 0
    rejected: int = 0
    """PUBACKs with an error reason code: kept on disk and sent again after a reconnect."""
    thinned: int = 0
    lost: int = 0
    """Observations flagged `lost` by a simulator: given a seq, never sent (a sequence gap)."""
    connects: int = 0
    connect_failures: int = 0


# building messages ------------------------------------------------------------------------------


def build_entry(pump_id: str, obs: Observation, speed: float = 1.0) -> Entry:
    """Wrap an observation in the envelope and validate it exactly as the ingester will decode it.

    Raises `contract.ContractError` for anything the ingester would reject, so a driver bug never
    puts invalid bytes on the wire. The seq is filled in when the store assigns it. `speed` is
    how many simulated seconds the device clock runs per wall second: `obs.delay_s` is simulated,
    the entry's `delay_s` is wall-clock.
    """
    if speed <= 0:
        raise ValueError("speed must be > 0")
    clash = _ENVELOPE & obs.fields.keys()
    if clash:
        raise contract.ContractError(f"fields carry envelope keys {sorted(clash)}")
    try:
        kind = contract.Kind(obs.kind)
    except ValueError:
        raise contract.ContractError(f"kind: unknown {obs.kind!r}") from None
    body = {
        "v": contract.CONTRACT_VERSION,
        "pump_id": pump_id,
        "time": obs.time,
        "seq": 0,
        "kind": kind.value,
        **obs.fields,
    }
    try:
        raw = json.dumps(body, default=_json_default, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise contract.ContractError(f"fields: not JSON-serialisable: {exc}") from None
    topic = contract.topic(pump_id, kind)
    msg = contract.decode(topic, raw)

    def payload(seq: int) -> bytes:
        return contract.encode(msg.model_copy(update={"seq": seq}))

    return Entry(
        kind=kind.value,
        topic=topic,
        payload=payload,
        retain=kind is contract.Kind.STATUS,
        duplicate=obs.duplicate,
        delay_s=max(0.0, obs.delay_s) / speed,
        lost=obs.lost,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# the agent --------------------------------------------------------------------------------------


class _State(Enum):
    IDLE = "idle"  # no connection; next attempt at _retry_at
    CONNECTING = "connecting"  # CONNECT sent, waiting for CONNACK
    CONNECTED = "connected"


_WILL_DISCONNECT = 0x04  # MQTT 5 "disconnect with will message"
_AGAIN = MQTTErrorCode.MQTT_ERR_AGAIN


class Agent:
    """Publishes one pump's telemetry, events and status; loses nothing while offline.

    Drive it with `run()` (until `request_stop()`), or call `poll()` from your own loop and
    `close()` at the end. It never closes the store it was given.
    """

    def __init__(
        self,
        driver: PumpDriver,
        store: Store,
        broker: BrokerOptions,
        *,
        clock: Callable[[], datetime] = utc_now,
        inflight: int = 100,
        speed: float | None = None,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        session_expiry_s: int = 7 * 24 * 3600,
    ) -> None:
        if store.pump_id != driver.pump_id:
            raise ValueError(f"store is for pump {store.pump_id}, driver for {driver.pump_id}")
        if inflight < 1:
            raise ValueError("inflight must be >= 1")
        self.driver = driver
        self.store = store
        self.broker = broker
        self.pump_id = driver.pump_id
        self.clock = clock
        self.speed = float(speed if speed is not None else getattr(clock, "speed", 1.0))
        """Simulated seconds per wall second of `clock` (a `SimClock` says); scales `delay_s`."""
        if self.speed <= 0:
            raise ValueError("speed must be > 0")
        self.inflight = inflight
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.session_expiry_s = session_expiry_s
        self.stats = AgentStats()
        self._status_topic = contract.topic(self.pump_id, contract.Kind.STATUS)
        self._client: mqtt.Client | None = None
        self._state = _State.IDLE
        self._will: Will | None = None
        self._window = inflight
        self._inflight: dict[int, float] = {}  # seq -> monotonic time handed to paho
        self._mids: dict[int, int] = {}  # paho mid -> seq
        self._acked: list[int] = []
        self._dirty = True  # the outbox may hold something to send
        self._release_at: float | None = None  # wall time a held-back message becomes due
        self._retry_at = 0.0
        self._backoff = reconnect_min_s
        self._deadline = 0.0
        self._lost: str | None = None  # why the current connection must end
        self._failure_streak: list[str] = []
        self._over_limit = False
        self._stop_requested = False

    # public -------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def in_flight(self) -> int:
        """Publishes handed to paho and not yet acknowledged."""
        return len(self._mids)

    def request_stop(self) -> None:
        """Ask `run()` to finish; safe from a signal handler (it only sets a flag)."""
        self._stop_requested = True

    def run(self, poll_s: float = 0.25, flush_timeout_s: float = 5.0) -> None:
        """Poll until `request_stop()`, then stop cleanly (`close`)."""
        try:
            while not self._stop_requested:
                self.poll(poll_s)
        finally:
            self.close(flush_timeout_s)

    def poll(self, timeout_s: float = 0.25) -> None:
        """One round: queue what the pump produced, move network traffic, send what is due."""
        self._produce()
        if self._client is None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, timeout_s))
                return
            self._connect()
            if self._client is None:
                return
        client = self._client
        self._feed()
        rc = client.loop(timeout_s)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, _AGAIN):
            self._lost = self._lost or f"network: {mqtt.error_string(rc)}"
        if self._state is _State.CONNECTING and time.monotonic() > self._deadline:
            self._lost = self._lost or f"no CONNACK within {self.connect_timeout_s:g}s"
        self._apply_acks()
        if self._lost is not None:
            self._drop(self._lost)
        else:
            self._feed()

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Stop cleanly: publish the retained offline status, wait (bounded) for the outbox to
        drain, then DISCONNECT, which tells the broker to discard the will.

        The offline status reuses the will's reserved seq, so a clean stop leaves no seq gap;
        it is the one message that may reach the broker after higher seqs. Whatever is not
        acknowledged by the deadline stays on disk for the next start.
        """
        client = self._client
        if client is None:  # offline: the broker already holds the will's offline status
            log.info("stopped", extra={"pump_id": self.pump_id, "backlog": len(self.store)})
            return
        if self._state is _State.CONNECTED and self._will and self._will.state == "armed":
            self._queue_status(self._will.will_seq, online=False, reason=STOP_REASON)
            self._will = Will(self._will.online_seq, self._will.will_seq, b"", "spent")
            deadline = time.monotonic() + flush_timeout_s
            while self._lost is None and len(self.store) and time.monotonic() < deadline:
                self._feed()
                if client.loop(0.05) not in (MQTTErrorCode.MQTT_ERR_SUCCESS, _AGAIN):
                    break
                self._apply_acks()
        self._apply_acks()
        if len(self.store):
            log.warning(
                "stopping with messages queued",
                extra={"pump_id": self.pump_id, "backlog": len(self.store)},
            )
        client.disconnect()
        self._forget_client()
        log.info("stopped", extra={"pump_id": self.pump_id, "backlog": len(self.store)})

    # producing ----------------------------------------------------------------------------------

    def _produce(self) -> None:
        entries = []
        for obs in self.driver.advance(self.clock()):
            try:
                entries.append(build_entry(self.pump_id, obs, self.speed))
            except contract.ContractError as exc:
                self.stats.invalid += 1
                log.error(
                    "invalid observation dropped",
                    extra={"pump_id": self.pump_id, "kind": obs.kind, "error": str(exc)},
                )
        if not entries:
            return
        result = self.store.append(entries)
        lost = sum(e.lost for e in entries)
        self.stats.queued += len(result.seqs) - lost
        self.stats.lost += lost
        self._dirty = True
        if result.thinned:
            self.stats.thinned += result.thinned
            log.warning(
                "queue full: thinned old telemetry",
                extra={
                    "pump_id": self.pump_id,
                    "thinned": result.thinned,
                    "backlog": len(self.store),
                },
            )
        if result.over_limit and not self._over_limit:
            log.error(
                "queue over its bound with events and status only; keeping them",
                extra={"pump_id": self.pump_id, "backlog": len(self.store)},
            )
        self._over_limit = result.over_limit

    def _queue_status(self, seq: int, *, online: bool, reason: str | None) -> None:
        fields: dict[str, Any] = {"online": online}
        if reason:
            fields["reason"] = reason
        entry = build_entry(self.pump_id, Observation("status", self.clock(), fields))
        with self.store.transaction():
            self.store.put(seq, entry)
            if not online:
                self.store.set_will_state("spent")
        self._dirty = True

    # connecting ---------------------------------------------------------------------------------

    def _current_will(self) -> Will:
        """Reuse a will no broker has seen (same bytes), else reserve the next pair of seqs."""
        will = self.store.will()
        if will is None or will.state != "reserved":
            entry = build_entry(
                self.pump_id,
                Observation("status", self.clock(), {"online": False, "reason": WILL_REASON}),
            )
            will = self.store.reserve_will(entry.payload)
        return will

    def _connect(self) -> None:
        self._will = self._current_will()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id(self.pump_id),
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.connect_timeout = self.connect_timeout_s
        # The window is ours (`_feed`): paho sends whatever it is handed, immediately.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            client.tls_set_context(self.broker.tls_context())
        client.will_set(self._status_topic, self._will.payload, qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        try:
            client.connect(
                self.broker.host,
                self.broker.port,
                keepalive=self.broker.keepalive_s,
                clean_start=False,
                properties=props,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake, timeout
            self._connect_failed(f"{type(exc).__name__}: {exc}")
            return
        self._client = client
        self._state = _State.CONNECTING
        self._deadline = time.monotonic() + self.connect_timeout_s
        self._lost = None

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._lost = f"broker refused the connection: {reason_code}"
            return
        assert self._will is not None
        receive_max = getattr(properties, "ReceiveMaximum", None)
        self._window = min(self.inflight, int(receive_max)) if receive_max else self.inflight
        self._state = _State.CONNECTED
        with self.store.transaction():
            self.store.set_will_state("armed")
            self._queue_status(self._will.online_seq, online=True, reason=None)
        self._will = Will(self._will.online_seq, self._will.will_seq, self._will.payload, "armed")
        self.stats.connects += 1
        log.info(
            "connected",
            extra={
                "pump_id": self.pump_id,
                "broker": self.broker.url,
                "backlog": len(self.store),
                "failed_attempts": len(self._failure_streak),
                "window": self._window,
                "session_present": flags.session_present,
            },
        )
        self._failure_streak.clear()
        self._backoff = self.reconnect_min_s
        self._dirty = True

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._lost = self._lost or f"disconnected: {reason_code}"

    def _connect_failed(self, reason: str) -> None:
        """Not fatal: the outbox keeps filling on disk; retry with capped exponential backoff."""
        self.stats.connect_failures += 1
        first = not self._failure_streak or reason not in self._failure_streak
        self._failure_streak.append(reason)
        delay = self._backoff * random.uniform(0.8, 1.2)  # jitter: a fleet must not stampede
        self._retry_at = time.monotonic() + delay
        self._backoff = min(self._backoff * 2, self.reconnect_max_s)
        extra = {
            "pump_id": self.pump_id,
            "broker": self.broker.url,
            "error": reason,
            "retry_in_s": round(delay, 1),
            "backlog": len(self.store),
        }
        if first:
            hint = "queueing on disk and retrying with backoff"
            if "refused the connection" in reason:
                hint += "; check PUMPFLEET_MQTT__USERNAME / PUMPFLEET_MQTT__PASSWORD and the ACL"
            log.warning(f"broker unreachable: {hint}", extra=extra)
        else:
            log.debug("broker still unreachable", extra=extra)

    def _drop(self, reason: str) -> None:
        """End the current connection; unacknowledged messages are resent on the next one."""
        client = self._client
        was_connected = self._state is _State.CONNECTED
        if client is not None:
            # Reason 0x04 asks the broker to publish the will anyway: the pump is offline
            # until we are back, and the will's reserved seq is not left unused.
            client.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=_WILL_DISCONNECT))
        self._forget_client()
        if was_connected:
            log.warning(
                "connection lost; queueing on disk",
                extra={"pump_id": self.pump_id, "error": reason, "backlog": len(self.store)},
            )
            self._retry_at = time.monotonic() + self.reconnect_min_s * random.uniform(0.5, 1.0)
        else:
            self._connect_failed(reason)

    def _forget_client(self) -> None:
        self._client = None
        self._state = _State.IDLE
        self._inflight.clear()
        self._mids.clear()
        self._lost = None
        self._dirty = True

    # sending ------------------------------------------------------------------------------------

    def _feed(self) -> None:
        """Hand the lowest-seq due messages to paho while the in-flight window has room.

        The window counts publishes (a duplicated message counts twice) and never exceeds the
        broker's Receive Maximum.
        """
        client = self._client
        if client is None or self._state is not _State.CONNECTED or self._lost is not None:
            return
        free = self._window - len(self._mids)
        if free <= 0:
            return
        if not self._dirty and (self._release_at is None or time.time() < self._release_at):
            return
        batch = self.store.due(free, exclude=self._inflight.keys())
        now = time.monotonic()
        sent = 0
        for msg in batch:
            copies = 2 if msg.duplicate else 1
            if copies > free - sent and (sent or self._mids):
                break
            for _ in range(copies):
                info = client.publish(msg.topic, msg.payload, qos=1, retain=msg.retain)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._lost = f"publish failed: {mqtt.error_string(info.rc)}"
                    return
                self._mids[info.mid] = msg.seq
                self.stats.published += 1
                sent += 1
            self._inflight[msg.seq] = now
        self._dirty = len(batch) == free or sent < len(batch)
        self._release_at = None if self._dirty else self.store.next_release()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        seq = self._mids.pop(mid, None)
        if seq is None or seq not in self._inflight:
            return  # the second copy of a duplicated message, or a dropped connection's
        if reason_code.is_failure:
            # Kept on disk; reconnecting resends from the lowest seq, so order holds.
            self.stats.rejected += 1
            log.error(
                "broker rejected a message; will resend after reconnecting",
                extra={"pump_id": self.pump_id, "seq": seq, "reason": str(reason_code)},
            )
            self._lost = self._lost or f"PUBACK {reason_code} for seq {seq}"
            return
        del self._inflight[seq]
        self._acked.append(seq)

    def _apply_acks(self) -> None:
        if self._acked:
            self.stats.acked += self.store.ack(self._acked)
            self._acked.clear()
            self._dirty = True
