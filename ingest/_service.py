"""The ingester: every pump message from the broker into the database, nothing lost or doubled.

paho-mqtt's network thread receives and validates each message and appends it to the open
batch; an asyncio task writes batches with asyncpg and only then acknowledges (PUBACK) every
message of the batch, in the order received. aiomqtt cannot acknowledge by hand, paho-mqtt 2.x
can (`manual_ack`).

Memory is bounded by the MQTT 5 Receive Maximum we send at connect: the broker never has more
than that many unacknowledged messages out to us, so while the database is down the backlog
waits in the broker's persistent session, not here.

A PUBACK names a packet id that is only meaningful on the connection that delivered the message.
Every message remembers its connection's generation; after a reconnect the broker redelivers the
unacknowledged ones and storage drops the copies, so stale ids are never acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from ingest import _batching as batching
from ingest import _metrics as metrics
from ingest._batching import Item as _Item
from ingest._batching import TokenBuckets
from ingest._mqtt import Client as BufferedClient
from ingest._store import DeadLetter, WriteResult, prepare, write_batch
from pumpfleet import contract
from pumpfleet.broker import BrokerOptions
from pumpfleet.contract import Message
from pumpfleet.settings import Settings

log = logging.getLogger("pumpfleet.ingest")

OnCommit = Callable[[Sequence[Message]], Awaitable[None]]
"""Receives each committed, first-seen message once, in per-pump order (the alert engine)."""

SESSION_EXPIRY_S = 7 * 24 * 3600
"""The broker keeps our session (and queues for it) this long while we are away."""

REVOKED_REFRESH_S = 10.0
"""How often the revoked pumps are re-read: a revocation takes effect within this long."""


class Ingester:
    """One ingester worker. `await run()` until `stop()`; safe to run several on one group."""

    def __init__(
        self,
        settings: Settings,
        on_commit: OnCommit | None = None,
        *,
        kinds: Sequence[contract.Kind] | None = None,
        lane: str = "",
        stats: metrics.Stats | None = None,
    ) -> None:
        """`kinds` limits the subscription (default: every kind); `lane` names a second MQTT
        session of the same worker (its client id gets `-{lane}`), e.g. the urgent lane that
        takes events apart from the telemetry queue; `stats` may be shared between lanes."""
        self.settings = settings
        self.broker = BrokerOptions.from_settings(settings.mqtt)
        self.cfg = settings.ingest
        self.client_id = f"{self.cfg.client_id}-{lane}" if lane else self.cfg.client_id
        self.lane = lane or "all"
        self.filters = (
            [contract.subscription(k, self.cfg.shared_group) for k in kinds]
            if kinds
            else [contract.subscription(shared_group=self.cfg.shared_group)]
        )
        self.partners: list[Ingester] = []
        """Other lanes of this worker: /healthz is healthy only when all are."""
        self.on_commit = on_commit
        self._lock = threading.Lock()
        self._buf: deque[_Item] = deque()
        self._gen = 0
        self._connected = threading.Event()
        self._broker_lost = False
        """An outage is logged once when it starts and once when it ends."""
        self._accepting = True
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known_pumps: set[str] = set()
        """Provisioned and not revoked: stored without a question."""
        self._revoked_read_at = 0.0
        self._can_register = True
        self._limit = (
            TokenBuckets(self.cfg.rate_limit_per_s, self.cfg.rate_limit_burst)
            if self.cfg.rate_limit_per_s > 0
            else None
        )
        self._limited_reason = batching.limited_reason(
            self.cfg.rate_limit_burst, self.cfg.rate_limit_per_s
        )
        self._db: asyncpg.Connection | None = None
        self._db_ok = False
        self._reconnecting = AsyncRetrying(
            retry=retry_if_exception_type((TimeoutError, OSError, asyncpg.PostgresError)),
            wait=wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5),
            before_sleep=self._connect_failed,
        )
        """Connecting: until the database is there, never giving up (no outage ends us)."""
        self._rewriting = AsyncRetrying(
            retry=retry_if_exception_type(_TRANSIENT),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            before_sleep=self._write_failed,
        )
        """Writing a batch: a transient error drops the connection and the batch is tried again."""
        self._client = self._make_client()
        self.stats = stats if stats is not None else metrics.Stats()
        self.metrics_port: int | None = None

    # MQTT side (paho's network thread) ------------------------------------------------------

    def _make_client(self) -> BufferedClient:
        m = self.broker
        client = BufferedClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if m.username:
            client.username_pw_set(m.username, m.password)
        if m.tls:
            client.tls_set_context(m.tls_context())
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_pre_connect = self._on_pre_connect
        client.on_message = self._on_message
        client.on_raw_message = self._on_raw_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_pre_connect(self, client: mqtt.Client, userdata: object) -> None:
        with self._lock:
            self._gen += 1

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("broker refused connection", extra={"reason": str(reason)})
            return
        if self._broker_lost:
            self._broker_lost = False
            log.info("broker reachable again", extra={"url": self.settings.mqtt.url})
        log.info("broker connected", extra={"session_present": flags.session_present})
        if flags.session_present:
            self._connected.set()
        else:  # a new session: subscribe, and count as connected once the broker grants it
            client.subscribe([(f, 1) for f in self.filters])
            log.info("subscribing", extra={"filter": ",".join(self.filters)})

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        """Once per outage, not once per retry: the log says the broker is gone, and when back."""
        if not self._broker_lost:
            self._broker_lost = True
            log.warning(
                "broker unreachable; retrying every 1-30 s",
                extra={"url": self.settings.mqtt.url},
            )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[mqtt.ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error("subscription refused", extra={"reasons": ",".join(map(str, reasons))})
            return
        self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: mqtt.ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._gen += 1
        self._connected.clear()
        if not self._stopping.is_set() and not self._broker_lost:
            self._broker_lost = True
            log.warning("broker connection lost; reconnecting", extra={"reason": str(reason)})

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        """paho's own path: a publish with properties, or a topic that is not UTF-8."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = repr(message._topic)
        self._receive(topic, message.payload, message.mid, message.qos)

    def _on_raw_message(self, topic: str, payload: bytes, mid: int) -> None:
        self._receive(topic, payload, mid, 1)

    def _receive(self, topic: str, payload: bytes | bytearray, mid: int, qos: int) -> None:
        if not self._accepting:
            return  # shutting down: left unacknowledged, the broker redelivers it later
        now = time.time()
        try:
            # Before decoding: a flood costs a dictionary lookup per message, not a validation.
            # Its excess is kept as dead letters (raw bytes, replayable), so a pump loses
            # nothing, and it is acknowledged like the rest, so no other pump waits behind it.
            limit = self._limit
            if limit is not None and not limit.take(batching.pump_key(topic), time.monotonic()):
                dead = DeadLetter(
                    topic, bytes(payload), self._limited_reason, datetime.fromtimestamp(now, UTC)
                )
                item = _Item(self._gen, mid, qos, now, topic, payload, None, dead, True)
            else:
                too_big = batching.oversize(len(payload), self.cfg.max_payload_bytes)
                if too_big is not None:
                    raise contract.ContractError(too_big)
                item = _Item(
                    self._gen, mid, qos, now, topic, payload, contract.decode(topic, payload), None
                )
        except contract.ContractError as exc:
            dead = DeadLetter(topic, bytes(payload), str(exc), datetime.fromtimestamp(now, UTC))
            item = _Item(self._gen, mid, qos, now, topic, payload, None, dead)
        # No lock: only this thread appends or changes the generation, and deque appends and
        # pops are atomic.
        self._buf.append(item)
        if batching.wake_writer(len(self._buf), self.cfg.batch_max) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)  # once per batch, not per message

    # Database side (asyncio) ----------------------------------------------------------------

    async def _connect_db(self) -> asyncpg.Connection:
        """A prepared connection, waiting out a database that is down or refuses us."""
        conn: asyncpg.Connection = await self._reconnecting(self._open_db)
        if not self._db_ok:
            log.info("database connected", extra={"known_pumps": len(self._known_pumps)})
        self._db_ok = True
        return conn

    async def _open_db(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self.settings.database_url.get_secret_value(), timeout=10, command_timeout=60
        )
        try:
            await prepare(conn)
            rows = await conn.fetch(_KNOWN_SQL)
            self._known_pumps = {r[0] for r in rows}
            self._revoked_read_at = time.monotonic()
            if self.cfg.unknown_pumps == "register":
                self._can_register = await conn.fetchval(_CAN_REGISTER_SQL)
                if not self._can_register:
                    log.error(
                        "unknown_pumps=register needs INSERT on pumps, which this database "
                        "role lacks; quarantining unknown pumps instead"
                    )
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _connect_failed(self, attempt: RetryCallState) -> None:
        """Logged when the database is lost (or absent at the start), not at every retry."""
        if self._db_ok or attempt.attempt_number == 1:
            log.warning(
                "database unavailable; retrying",
                extra={"error": _failure(attempt), "retry_s": _next_sleep_s(attempt)},
            )
        self._db_ok = False
        self.stats.db_errors += 1

    async def _write(self, batch: list[_Item]) -> WriteResult:
        """Commit the batch, retrying with backoff until the database takes it."""
        all_msgs, all_dead = batching.split(batch)
        result: WriteResult = await self._rewriting(self._write_once, batch, all_msgs, all_dead)
        return result

    def _write_failed(self, attempt: RetryCallState) -> None:
        """Every failed write is logged: each one holds a batch of the fleet's messages back."""
        batch = attempt.args[0]
        extra = {"error": _failure(attempt), "batch": len(batch)}
        log.warning("batch write failed; retrying", extra=extra)
        self.stats.db_errors += 1

    async def _write_once(
        self, batch: list[_Item], msgs: list[Message], dead: list[DeadLetter]
    ) -> WriteResult:
        """One try at committing the batch; a transient error drops the connection."""
        if self._db is None or self._db.is_closed():
            self._db = await self._connect_db()
        conn = self._db
        try:
            return await self._commit(conn, batch, msgs, dead)
        except _TRANSIENT:
            self._db_ok = False
            conn.terminate()
            self._db = None
            raise

    async def _commit(
        self,
        conn: asyncpg.Connection,
        batch: list[_Item],
        msgs: list[Message],
        dead: list[DeadLetter],
    ) -> WriteResult:
        register, held = await self._sort_out(conn, {m.pump_id for m in msgs})
        quarantined: dict[str, int] = {}
        if held:
            msgs, refused, quarantined = batching.quarantine(batch, held)
            dead = [*dead, *(_dead_letter(item, why) for item, why in refused)]
        started = time.perf_counter()
        try:
            result = await write_batch(conn, msgs, dead, register, quarantined)
        except _TRANSIENT:
            raise
        except asyncpg.PostgresError as exc:
            # Valid by the contract yet refused by the database (a schema out of step
            # with the contract, a new constraint): find the culprits instead of
            # retrying the batch forever.
            log.error(
                "database refused a batch; writing its messages one by one",
                extra={"error": _one_line(exc), "batch": len(batch)},
            )
            result = await self._write_one_by_one(conn, batch, msgs, dead, register, quarantined)
        self.stats.observe_commit(time.perf_counter() - started)
        if register:
            self._known_pumps |= register
            log.info(
                "pumps registered from their first message",
                extra={"pumps": ",".join(sorted(register))},
            )
        if quarantined:
            log.warning(
                "messages quarantined: pumps not provisioned or revoked",
                extra={
                    "pumps": ",".join(sorted(quarantined)),
                    "messages": result.quarantined,
                },
            )
        return result

    async def _write_one_by_one(
        self,
        conn: asyncpg.Connection,
        batch: list[_Item],
        msgs: list[Message],
        dead: list[DeadLetter],
        register: set[str],
        quarantined: dict[str, int],
    ) -> WriteResult:
        """Each message in its own transaction; one the database refuses is dead-lettered."""
        plan = batching.one_by_one(batch, msgs)
        total = await write_batch(conn, [], dead, register, quarantined)
        for msg, item in plan:
            try:
                one = await write_batch(conn, [msg], [])
            except _TRANSIENT:
                raise
            except asyncpg.PostgresError as exc:
                refused = _dead_letter(item, batching.refused_reason(_one_line(exc)))
                one = await write_batch(conn, [], [refused])
            batching.add_result(total, one)
        return total

    async def _sort_out(
        self, conn: asyncpg.Connection, pump_ids: set[str]
    ) -> tuple[set[str], dict[str, str]]:
        """Which of a batch's pumps to register, and which to quarantine (pump -> why).

        Pumps this worker knows cost nothing; the others are looked up (one query per batch
        that has any), so a pump provisioned a moment ago is stored at once. The revoked pumps
        are re-read every REVOKED_REFRESH_S, so a revocation holds within that long."""
        if batching.revoked_refresh_due(time.monotonic(), self._revoked_read_at, REVOKED_REFRESH_S):
            revoked = {r[0] for r in await conn.fetch(_REVOKED_SQL)}
            self._known_pumps -= revoked
            self._revoked_read_at = time.monotonic()
        unknown = pump_ids - self._known_pumps
        if not unknown:
            return set(), {}
        rows = await conn.fetch(_LOOKUP_SQL, list(unknown))
        may_register = self.cfg.unknown_pumps == "register" and self._can_register
        register, held, known = batching.sort_pumps(unknown, rows, may_register)
        self._known_pumps |= known
        return register, held

    def _ack(self, batch: list[_Item]) -> int:
        """Acknowledge what this connection delivered; return how many were stale."""
        with self._lock:
            mids, stale = batching.acks(batch, self._gen)
            self._client.ack_many(mids)
        return stale

    async def _flush(self) -> int:
        batch = batching.cut(self._buf)
        if not batch:
            return 0
        result = await self._write(batch)
        stale = self._ack(batch)
        now = time.time()
        limited = batching.rate_limited(batch, result)
        self.stats.observe_batch(len(batch), batch[0].received, result, stale, now, limited)
        if self.on_commit is not None and result.new:
            try:
                await self.on_commit(result.new)
            except Exception:  # the alert engine's bug must not stop storage
                self.stats.hook_errors += 1
                log.exception("alert hook failed", extra={"messages": len(result.new)})
        return len(batch)

    def pending(self) -> int:
        return len(self._buf)

    # Lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stop(): connect, then flush batches on size or on the time limit."""
        self._loop = asyncio.get_running_loop()
        self._db = await self._connect_db()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = min(self.cfg.max_pending, 65535)
        self._client.connect_async(
            self.broker.host,
            self.broker.port,
            keepalive=self.broker.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        server = await metrics.serve(self.cfg, self.stats, self.pending, self.healthy)
        if server is not None:
            self.metrics_port = server.sockets[0].getsockname()[1]
        flush_s = batching.flush_timeout_s(self.cfg.flush_ms)
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=flush_s)
                self._wake.clear()
                await self._flush()
            # Stop taking messages, commit and acknowledge what we hold, then leave.
            self._accepting = False
            await self._flush()
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            if server is not None:
                server.close()
            if self._db is not None:
                await self._db.close()
            log.info("ingester stopped", extra=self.stats.summary())

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def healthy(self) -> tuple[bool, dict[str, object]]:
        ok = bool(self._connected.is_set() and self._db_ok)
        detail: dict[str, object] = {
            "broker_connected": self._connected.is_set(),
            "database_ok": self._db_ok,
            "pending": self.pending(),
        }
        for other in self.partners:
            other_ok, other_detail = other.healthy()
            ok = ok and other_ok
            detail[other.lane] = other_detail
        return ok, detail

    async def wait_connected(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("ingester did not connect to the broker")
            await asyncio.sleep(0.02)


_TRANSIENT = (
    TimeoutError,
    OSError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.InterfaceError,  # connection closed under us
    # "cannot switch to state N; another operation is in progress": the protocol lost its place
    # when the server went away mid-operation. The connection is unusable, not the database:
    # drop it and reconnect (it ended the process before).
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: disk full, out of memory
    asyncpg.exceptions.TransactionRollbackError,  # class 40: deadlock, serialization
)
"""Errors that go away by themselves: retry the batch. Any other database error is about data."""


_KNOWN_SQL = "SELECT pump_id FROM pumps WHERE NOT coalesce(revoked_at <= now(), false)"
_REVOKED_SQL = "SELECT pump_id FROM pumps WHERE revoked_at <= now()"
_LOOKUP_SQL = """SELECT pump_id, coalesce(revoked_at <= now(), false) FROM pumps
    WHERE pump_id = ANY($1::text[])"""
_CAN_REGISTER_SQL = "SELECT has_table_privilege('pumps', 'INSERT')"


def _dead_letter(item: _Item, reason: str) -> DeadLetter:
    """A decoded message kept out after all (quarantined, or refused by the database): its raw
    bytes, topic and receive time, with the reason."""
    return DeadLetter(
        item.topic, bytes(item.payload), reason, datetime.fromtimestamp(item.received, UTC)
    )


def _failure(attempt: RetryCallState) -> str:
    """The failed attempt's error, in one line."""
    exc = attempt.outcome.exception() if attempt.outcome is not None else None
    return _one_line(exc) if exc is not None else "unknown error"


def _next_sleep_s(attempt: RetryCallState) -> float:
    return round(attempt.next_action.sleep, 1) if attempt.next_action is not None else 0.0


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
