"""The pump agent: driver output -> contract-valid messages -> on-disk outbox -> MQTT, QoS 1.

An asyncio program on aiomqtt (`arun`, or `run` from a thread or the CLI). Two loops run at
once: the producer advances the driver every tick and queues what it produced; the connection
loop connects (tenacity's capped exponential backoff, with jitter) and, while connected, keeps
up to `inflight` publishes awaiting their PUBACK, handed to the client in seq order. A message
is deleted from the outbox only after its PUBACK. Each connection gets a fresh client: when a
connection ends, every unacknowledged publish is cancelled and goes back to "not sent", and the
next connection starts again from the lowest queued seq. Reconnecting after an outage and
restarting after SIGKILL are therefore the same code path, and order holds across both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from pumpfleet import contract
from pumpfleet.broker import BrokerOptions
from pumpfleet.envelope import Observation, build_entry

from ._driver import PumpDriver
from ._mqtt import Link
from ._store import Queued, Store, Will

__all__ = ["Agent", "AgentStats", "BrokerOptions", "build_entry", "client_id"]

log = logging.getLogger("device_agent")

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
    """PUBACKs with an MQTT 5 error reason code: kept on disk, sent again after a reconnect."""
    thinned: int = 0
    lost: int = 0
    """Observations flagged `lost` by a simulator: given a seq, never sent (a sequence gap)."""
    connects: int = 0
    connect_failures: int = 0


# building messages ------------------------------------------------------------------------------


# the agent --------------------------------------------------------------------------------------


class _ConnectFailed(Exception):
    """The broker did not accept the connection; the message says why (for the log)."""


class Agent:
    """Publishes one pump's telemetry, events and status; loses nothing while offline.

    Run it with `await agent.arun()` or `agent.run()` (which owns an event loop) until
    `request_stop()`. It never closes the store it was given.
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
        self._connected = False
        self._will: Will | None = None
        self._window = inflight
        self._sending: dict[asyncio.Task[None], int] = {}  # publish awaiting its PUBACK -> seq
        self._acked: list[int] = []  # PUBACKed, not yet deleted from the store
        self._dirty = True  # the outbox may hold something to send
        self._release_at: float | None = None  # wall time a held-back message becomes due
        self._failure_streak: list[str] = []
        self._over_limit = False
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # for the sender: the outbox or the window changed
        self._progress = asyncio.Event()  # acknowledgements were applied

    # public -------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def in_flight(self) -> int:
        """Publishes handed to the client and not yet acknowledged."""
        return len(self._sending)

    def request_stop(self) -> None:
        """Ask `run()` / `arun()` to stop cleanly; safe from a signal handler or another thread."""
        self._stop_requested = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._stop.set)

    def run(self, poll_s: float = 0.25, flush_timeout_s: float = 5.0) -> None:
        """`arun()` in an event loop of its own (the CLI's way, or a thread's)."""
        asyncio.run(self.arun(poll_s, flush_timeout_s))

    async def arun(self, poll_s: float = 0.25, flush_timeout_s: float = 5.0) -> None:
        """Until `request_stop()`: queue what the pump produced every `poll_s`, keep a connection
        and send the outbox over it. Then stop cleanly (see `_say_offline_and_drain`)."""
        self._loop = asyncio.get_running_loop()
        self._stop, self._wake, self._progress = asyncio.Event(), asyncio.Event(), asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        self.produce()  # before the first connection reserves its status seqs
        producer = asyncio.create_task(self._produce_every(poll_s))
        producer.add_done_callback(lambda _: self._stop.set())  # a failing driver stops us too
        try:
            await self._stay_connected(flush_timeout_s)
        finally:
            self._loop = None
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer  # re-raises the driver's error, if that is why we stopped
            log.info("stopped", extra={"pump_id": self.pump_id, "backlog": len(self.store)})

    def produce(self) -> None:
        """Queue what the driver produced up to `clock()` (what every tick of `arun` does)."""
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
        self._changed()
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

    # producing ----------------------------------------------------------------------------------

    async def _produce_every(self, poll_s: float) -> None:
        while True:
            await _wait(self._stop.wait(), poll_s)
            if self._stop.is_set():
                return
            self.produce()

    def _queue_status(self, seq: int, *, online: bool, reason: str | None) -> None:
        fields: dict[str, Any] = {"online": online}
        if reason:
            fields["reason"] = reason
        entry = build_entry(self.pump_id, Observation("status", self.clock(), fields))
        with self.store.transaction():
            self.store.put(seq, entry)
            if not online:
                self.store.set_will_state("spent")
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        self._wake.set()

    # connecting ---------------------------------------------------------------------------------

    async def _stay_connected(self, flush_timeout_s: float) -> None:
        """Connect; when a connection ends, connect again, until a stop is requested.

        A broker that does not accept us is retried with capped exponential backoff, each wait
        ±20 % (a fleet that lost its broker at one moment must not come back in step); a
        connection that was up and ended starts the backoff afresh. Never fatal: the outbox
        keeps filling on disk meanwhile."""
        backoff = wait_exponential(multiplier=self.reconnect_min_s, max=self.reconnect_max_s)
        reconnecting = AsyncRetrying(
            retry=retry_if_exception_type(_ConnectFailed),
            wait=lambda attempt: backoff(attempt) * random.uniform(0.8, 1.2),
            sleep=lambda seconds: _wait(self._stop.wait(), seconds),
            before_sleep=self._connect_failed,
        )
        while not self._stop.is_set():
            await reconnecting(self._connection_unless_stopped, flush_timeout_s)
            await _wait(self._stop.wait(), self.reconnect_min_s * random.uniform(0.5, 1.0))

    async def _connection_unless_stopped(self, flush_timeout_s: float) -> None:
        if not self._stop.is_set():  # a stop during the backoff ends it, with no new attempt
            await self._connection(flush_timeout_s)

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

    def _link(self, will: Will) -> Link:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        link = Link(
            self.broker.host,
            self.broker.port,
            identifier=client_id(self.pump_id),
            username=self.broker.username,
            password=self.broker.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            will=aiomqtt.Will(self._status_topic, will.payload, qos=1, retain=True),
            keepalive=self.broker.keepalive_s,
            tls_context=self.broker.tls_context() if self.broker.tls else None,
            # The window is ours (`_feed`): paho sends whatever it is handed, immediately.
            max_inflight_messages=0,
            max_queued_outgoing_messages=0,
            connect_timeout_s=self.connect_timeout_s,
        )
        link.pending_calls_threshold = self.inflight  # a full window is no cause for a warning
        return link

    async def _connection(self, flush_timeout_s: float) -> None:
        """One connection, from CONNECT to its end (or to a clean stop).

        Raises `_ConnectFailed` if the broker never accepted it.
        """
        will = self._current_will()
        self._will = will
        link = self._link(will)
        try:
            await link.__aenter__()
        except aiomqtt.MqttError as exc:
            raise _ConnectFailed(self._connect_error(exc)) from None
        helpers = [asyncio.create_task(self._send(link)), asyncio.create_task(_watch(link))]
        try:
            self._connected = True
            self._on_connected(link, will)
            await _first(link.ended, self._stop.wait())
            if not link.ended.done():
                await self._say_offline_and_drain(link, flush_timeout_s)
        finally:
            self._connected = False
            for task in helpers:
                task.cancel()
            if link.ended.done():
                link.abandon()  # reason 0x04: the broker publishes the will (see `Link`)
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await link.__aexit__(None, None, None)  # a normal DISCONNECT: no will
            # What is still unacknowledged is "not sent" again; the next connection resends it.
            publishes = list(self._sending)
            for task in publishes:
                task.cancel()
            await asyncio.gather(*helpers, *publishes, return_exceptions=True)
            self._sending.clear()  # a task cancelled before its first step never ran `finally`
            self._apply_acks()
            self._changed()
        if link.rejected:
            self.stats.rejected += link.rejected
            log.error(
                "broker rejected a message; will resend after reconnecting",
                extra={"pump_id": self.pump_id, "rejected": link.rejected},
            )
        if link.ended.done():
            log.warning(
                "connection lost; queueing on disk",
                extra={
                    "pump_id": self.pump_id,
                    "error": link.ended.result(),
                    "backlog": len(self.store),
                },
            )

    def _on_connected(self, link: Link, will: Will) -> None:
        self._window = min(self.inflight, link.receive_maximum or self.inflight)
        with self.store.transaction():
            self.store.set_will_state("armed")
            self._queue_status(will.online_seq, online=True, reason=None)
        self._will = Will(will.online_seq, will.will_seq, will.payload, "armed")
        self.stats.connects += 1
        log.info(
            "connected",
            extra={
                "pump_id": self.pump_id,
                "broker": self.broker.url,
                "backlog": len(self.store),
                "failed_attempts": len(self._failure_streak),
                "window": self._window,
                "session_present": link.session_present,
            },
        )
        self._failure_streak.clear()

    def _connect_error(self, exc: aiomqtt.MqttError) -> str:
        if isinstance(exc, aiomqtt.MqttCodeError) and exc.rc is not None:
            return f"broker refused the connection: {exc.rc}"
        if str(exc) == "Operation timed out":  # aiomqtt's wait for CONNACK
            return f"no CONNACK within {self.connect_timeout_s:g}s"
        cause = exc.__context__  # refused, unreachable, DNS, TLS handshake, TCP timeout
        return f"{type(cause).__name__}: {cause}" if cause else str(exc)

    def _connect_failed(self, attempt: RetryCallState) -> None:
        exc = attempt.outcome.exception() if attempt.outcome is not None else None
        reason = str(exc)
        retry_in_s = attempt.next_action.sleep if attempt.next_action is not None else 0.0
        self.stats.connect_failures += 1
        first = reason not in self._failure_streak
        self._failure_streak.append(reason)
        extra = {
            "pump_id": self.pump_id,
            "broker": self.broker.url,
            "error": reason,
            "retry_in_s": round(retry_in_s, 1),
            "backlog": len(self.store),
        }
        if first:
            hint = "queueing on disk and retrying with backoff"
            if "refused the connection" in reason:
                hint += "; check PUMPFLEET_MQTT__USERNAME / PUMPFLEET_MQTT__PASSWORD and the ACL"
            log.warning(f"broker unreachable: {hint}", extra=extra)
        else:
            log.debug("broker still unreachable", extra=extra)

    async def _say_offline_and_drain(self, link: Link, flush_timeout_s: float) -> None:
        """A clean stop: queue the retained offline status, wait (bounded) for the outbox to
        drain; the caller then sends DISCONNECT, which tells the broker to discard the will.

        The offline status reuses the will's reserved seq, so a clean stop leaves no seq gap;
        it is the one message that may reach the broker after higher seqs. Whatever is not
        acknowledged by the deadline stays on disk for the next start.
        """
        will = self._will
        if will is not None and will.state == "armed":
            self._queue_status(will.will_seq, online=False, reason=STOP_REASON)
            self._will = Will(will.online_seq, will.will_seq, b"", "spent")
            deadline = time.monotonic() + flush_timeout_s
            while len(self.store) and not link.ended.done() and time.monotonic() < deadline:
                self._progress.clear()
                await _wait(_first(self._progress.wait(), link.ended), deadline - time.monotonic())
        self._apply_acks()
        if len(self.store):
            log.warning(
                "stopping with messages queued",
                extra={"pump_id": self.pump_id, "backlog": len(self.store)},
            )

    # sending ------------------------------------------------------------------------------------

    async def _send(self, link: Link) -> None:
        """Keep the window full from the outbox until cancelled (the connection ended)."""
        while True:
            self._wake.clear()
            self._feed(link)
            wait = None if self._release_at is None else max(0.0, self._release_at - time.time())
            await _wait(self._wake.wait(), wait)

    def _feed(self, link: Link) -> None:
        """Start a publish for each of the lowest-seq due messages while the window has room.

        The window counts publishes (a duplicated message counts twice) and never exceeds the
        broker's Receive Maximum. Order: each `_publish` task hands its message to the client in
        its first step, and asyncio runs new tasks in the order they were created.
        """
        free = self._window - len(self._sending)
        if free < max(1, self._window // 2):
            return  # refill (and delete what was acknowledged) in batches of half a window
        self._apply_acks()  # so that what is acknowledged is never sent again
        if link.ended.done():
            return
        if not self._dirty and (self._release_at is None or time.time() < self._release_at):
            return
        batch = self.store.due(free, exclude=set(self._sending.values()))
        sent = 0
        for msg in batch:
            copies = 2 if msg.duplicate else 1
            if copies > free - sent and (sent or self._sending):
                break
            for _ in range(copies):
                self._sending[asyncio.create_task(self._publish(link, msg))] = msg.seq
                self.stats.published += 1
                sent += 1
        self._dirty = len(batch) == free or sent < len(batch)
        self._release_at = None if self._dirty else self.store.next_release()

    async def _publish(self, link: Link, msg: Queued) -> None:
        """One QoS 1 publish, returning once its PUBACK arrived (a rejected one never returns)."""
        try:
            await link.publish(msg.topic, msg.payload, qos=1, retain=msg.retain, timeout=math.inf)
        except aiomqtt.MqttError as exc:
            link.end(f"publish failed: {exc}")
        else:
            self._acked.append(msg.seq)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._sending.pop(task, None)
            self._wake.set()

    def _apply_acks(self) -> None:
        """Delete acknowledged messages, in one commit per batch rather than one per PUBACK."""
        if self._acked:
            self.stats.acked += self.store.ack(self._acked)
            self._acked.clear()
            self._dirty = True
            self._progress.set()


async def _watch(link: Link) -> None:
    """End the link when the broker or the network does (aiomqtt's message stream says so)."""
    try:
        async for _ in link.messages:
            pass  # the agent subscribes to nothing
    except aiomqtt.MqttError as exc:
        link.end(f"disconnected: {exc.__cause__ or exc}")


async def _first(*waits: Awaitable[Any]) -> None:
    """Wait until any of `waits` is done; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if isinstance(task, asyncio.Task):
                task.cancel()


async def _wait(wait: Awaitable[Any], timeout_s: float | None) -> None:
    """`wait`, for at most `timeout_s` (None: no limit)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait, timeout_s)
