"""The alerting service: stored messages -> rule engine -> alert book -> notifier.

`pumpfleet alerting` runs it apart from the ingesters (ingest/alerts/README.md). It reads the
feed the ingesters write in the same transaction as each first-stored message (`alert_feed`,
urgent alarm events first, then in stored order), runs the rules, and applies their Findings to
the book and deletes the feed rows it handled in one transaction: every stored message reaches
the rules exactly once, whatever restarts. `run()` also drives what happens without a message:
the rules' watchdog (telemetry silence), the escalation of unacknowledged high alerts, and the
notifier. `AlertingService` runs one active instance per fleet and any number of standbys,
chosen by a lease (ingest/alerts/_lease.py).

`on_commit` applies a batch in process (tests, or an Ingester hook for a single-process lab).

`start()` rebuilds what a restart lost: the open alerts, the pumps' profiles, and the rules'
per-pump state, replayed from the last `warm_hours` of telemetry and events (`warm`, which
yields no Findings, so a restart never re-raises what is already open).

Rule state is per pump, so one active instance sees every message: the lease makes sure of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from ingest import rules
from ingest.alerts._book import CHANNEL, Book, BookPolicy, Transition
from ingest.alerts._lease import Lease, LeaseLost
from ingest.alerts._notify import Notifier, receivers
from pumpfleet import contract
from pumpfleet.contract import Message
from pumpfleet.findings import SERVICE_RULE_PRIORITY, SERVICE_RULES, Finding
from pumpfleet.settings import Settings

log = logging.getLogger("pumpfleet.alerts")
T = TypeVar("T")

_PROFILE_REFRESH_S = 60.0
"""How often the pump registry is re-read for changed profiles (e.g. a 4 mL alarm volume)."""

_DB_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
)
FEED_CHANNEL = "pumpfleet_feed"
_FLEET_SLACK = timedelta(minutes=10)
FEED_BATCH = 1000
"""Feed rows per transaction: large enough to keep up with a draining backlog, small enough
that an urgent row stored meanwhile waits at most one batch (a few tens of milliseconds)."""


class RuleEngine(Protocol):
    """What Alerting needs from the rule engine (ingest/rules/)."""

    def observe(self, msg: Message) -> list[Finding]: ...

    def warm(self, msg: Message) -> None: ...

    def tick(self, now: datetime) -> list[Finding]: ...

    def set_profile(self, profile: Any) -> None: ...


ProfileFactory = Callable[[Mapping[str, Any]], Any]
"""A `pumps` row -> the engine's profile object."""


def build_engine(settings: Settings) -> rules.RuleEngine:
    """The rule engine with the thresholds of `[alerts.rules]` (domain.md's values by default)."""
    return rules.RuleEngine(rules.Thresholds.model_validate(settings.alerts.rules), {})


def default_profile(row: Mapping[str, Any]) -> rules.PumpProfile:
    """What the rules know about a pump, from its `pumps` row."""
    return rules.PumpProfile.from_row(row)


@dataclass(slots=True)
class AlertingStats:
    observed: int = 0
    findings: int = 0
    transitions: int = 0
    engine_errors: int = 0
    apply_errors: int = 0
    warmed: int = 0


class Alerting:
    """Rules, alert book and notifier for one ingester; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        engine: RuleEngine,
        *,
        profile_factory: ProfileFactory | None = default_profile,
        clock: Callable[[], datetime | None] | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.alerts
        self.engine = engine
        self.profile_factory = profile_factory
        self.book = Book(
            BookPolicy(
                unacked_escalation=timedelta(seconds=self.cfg.unacked_escalation_s),
                continue_history=timedelta(seconds=self.cfg.continue_history_s),
                receivers=receivers(self.cfg),
            )
        )
        self.dsn = settings.database_url.get_secret_value()
        if lease is not None:
            self.dsn = lease.dsn(self.dsn)
        self.notifier = Notifier(self.cfg, self.dsn)
        self.stats = AlertingStats()
        self._clock = clock
        self._fleet_now: datetime | None = None
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._dirty: set[int] = set()
        self._profiles: dict[str, tuple[Any, ...]] = {}
        self._stopping = asyncio.Event()
        self._feed_wake = asyncio.Event()
        self.lease = lease
        # On the wall clock, silence counts from arrival, not from a device clock that may be off.
        self._received_at = self.cfg.clock == "wall" and _accepts(engine.observe, "received_at")
        self._fleet_ticks = self.cfg.clock == "fleet" and clock is None
        self._quarantine_raised: set[str] = set()
        """Quarantined pumps raised in their current episode (see `_unprovisioned`)."""
        self._quarantine_next = 0.0
        self._db_lost = False
        """A database outage is logged once when it starts and once when it ends."""

    # clock -------------------------------------------------------------------------------------

    def now(self) -> datetime | None:
        """The watchdog's 'now': wall time, or the newest telemetry/event device time seen."""
        if self._clock is not None:
            return self._clock()
        if self.cfg.clock == "fleet":
            return self._fleet_now
        return datetime.now(UTC)

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild after a restart: open alerts, profiles, then the rules' state from history."""

        async def rebuild(conn: asyncpg.Connection) -> tuple[int, int, int]:
            n_open = await self.book.load(conn)
            self._dirty.clear()
            n_pumps = await self._refresh_profiles(conn)
            warmed = await self._warm(conn)
            self._restore()
            return n_open, n_pumps, warmed

        n_open, n_pumps, warmed = await self._with_db(rebuild)
        log.info(
            "alerting ready",
            extra={
                "open_alerts": n_open,
                "pumps": n_pumps,
                "warm_messages": warmed,
                "receivers": ",".join(self.book.policy.receivers) or "none",
                "clock": self.cfg.clock,
            },
        )

    async def on_commit(self, msgs: Sequence[Message]) -> None:
        """Rules over a batch, then one transaction for its Findings (in process)."""
        findings = self._observe(msgs)
        if not findings:
            return
        try:
            await self.apply(findings)
        except LeaseLost:
            raise
        except Exception:  # a bug here must not stop ingestion: say so loudly and go on
            self.stats.apply_errors += 1
            log.exception("alert book failed; findings dropped", extra={"findings": len(findings)})

    def _observe(self, msgs: Sequence[Message]) -> list[Finding]:
        """Run the rules over messages; one that fails is logged and the rest go on.

        On the fleet clock the watchdog also looks at each reading's time less `_FLEET_SLACK`
        before judging it, so timers fall due at the data's time while a backlog drains (after
        a takeover, say), not a batch of hours later; the slack leaves room for readings of
        different pumps stored a little out of time order."""
        findings: list[Finding] = []
        ticked = self._fleet_now
        self.stats.observed += len(msgs)
        latest = self._fleet_now
        arrived = datetime.now(UTC)
        for msg in msgs:
            # Only telemetry moves the fleet clock: a retained status replays an old device
            # time (or any time) to every new subscriber, and events take the urgent lane, so
            # they may be stored before the telemetry that precedes them.
            if msg.kind == "telemetry" and (latest is None or msg.time > latest):
                latest = msg.time
                due = latest - _FLEET_SLACK
                if self._fleet_ticks and (ticked is None or due > ticked):
                    ticked = due
                    try:
                        findings.extend(self.engine.tick(due))
                    except Exception:
                        self.stats.engine_errors += 1
                        log.exception("rule engine tick failed")
            try:
                if self._received_at:
                    findings.extend(self.engine.observe(msg, received_at=arrived))  # type: ignore[call-arg]
                else:
                    findings.extend(self.engine.observe(msg))
            except Exception:  # one bad rule must not stop ingestion or the other pumps
                self.stats.engine_errors += 1
                log.exception(
                    "rule engine failed on a message",
                    extra={"pump_id": msg.pump_id, "seq": msg.seq},
                )
        self._fleet_now = latest
        return findings

    async def apply(self, findings: Sequence[Finding]) -> list[Transition]:
        """Apply Findings to the book, waiting out a database outage."""
        self.stats.findings += len(findings)
        done = await self._with_db(
            lambda conn: self._fenced(conn, lambda c: self.book.apply(c, findings))
        )
        self._applied(done)
        return done

    async def _fenced(
        self, conn: asyncpg.Connection, action: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        """`action` in a transaction that first checks this instance still holds the lease."""
        if self.lease is None:
            return await action(conn)
        async with conn.transaction():
            await self.lease.check(conn)
            return await action(conn)

    # the feed ----------------------------------------------------------------------------------

    async def consume_once(self, limit: int = FEED_BATCH) -> int:
        """One feed batch: read, run the rules, then apply and delete in one transaction.

        The rules see the batch once: a failed commit is retried with the same Findings (the
        feed rows are still there, the transaction having rolled back), never re-observed."""
        rows = await self._with_db(lambda conn: conn.fetch(_FEED_SQL, limit))
        if not rows:
            return 0
        msgs: list[Message] = []
        for row in rows:
            if row["doc"] is None:  # the stored row is gone (retention ran first): nothing to do
                continue
            try:
                msgs.append(
                    contract.decode(contract.topic(row["pump_id"], row["kind"]), row["doc"])
                )
            except contract.ContractError as exc:
                log.warning(
                    "stored message no longer valid; not judged",
                    extra={"pump_id": row["pump_id"], "seq": row["seq"], "error": str(exc)},
                )
        findings = self._observe(msgs)
        ids = [row["id"] for row in rows]
        self.stats.findings += len(findings)

        async def commit(conn: asyncpg.Connection) -> list[Transition]:
            done = await self.book.apply(conn, findings) if findings else []
            await conn.execute("DELETE FROM alert_feed WHERE id = ANY($1::int8[])", ids)
            return done

        async def fenced(conn: asyncpg.Connection) -> list[Transition]:
            async with conn.transaction():
                if self.lease is not None:
                    await self.lease.check(conn)
                return await commit(conn)

        self._applied(await self._with_db(fenced))
        return len(rows)

    async def _consume(self) -> None:
        """Drain the feed; then sleep until a commit NOTIFYs or `poll_s` passes."""
        while not self._stopping.is_set():
            self._feed_wake.clear()
            if await self.consume_once() >= FEED_BATCH:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._feed_wake.wait(), timeout=self.cfg.poll_s)

    def _on_feed(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._feed_wake.set()

    async def _renew(self) -> None:
        """Keep the lease while running; LeaseLost ends `run()` when another took it.

        A loop by design, not a retry: a renewal that failed is simply made again at the next
        one's time (a backoff would let the lease expire). Logged once when renewals start to
        fail and once when one succeeds again."""
        assert self.lease is not None
        lease = self.lease
        conn: asyncpg.Connection | None = None
        failing = False
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=lease.renew_every_s)
                if self._stopping.is_set():
                    break
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.dsn, timeout=lease.ttl_s)
                    renewed = await asyncio.wait_for(lease.renew(conn), timeout=lease.ttl_s)
                except (*_DB_ERRORS, asyncpg.PostgresError) as exc:
                    if not failing:
                        failing = True
                        log.warning(
                            "alerting: lease not renewed; retrying",
                            extra={"error": _one_line(exc)},
                        )
                    if conn is not None:
                        conn.terminate()
                    conn = None
                    continue
                if failing and renewed:
                    failing = False
                    log.info("alerting: lease renewed again")
                if not renewed:
                    raise LeaseLost(f"{lease.holder}: the lease was taken over")
        finally:
            if conn is not None:
                conn.terminate()

    async def tick(self) -> list[Transition]:
        """One watchdog round: the rules' tick, the quarantined pumps (unprovisioned_device),
        then the unacknowledged-escalation check."""
        quarantine: list[Finding] = []
        if time.monotonic() >= self._quarantine_next:  # not latency-critical: not every tick
            self._quarantine_next = time.monotonic() + QUARANTINE_EVERY_S
            quarantine = await self._unprovisioned()
        now = self.now()
        if now is None:  # the fleet clock has seen no telemetry yet; quarantine is wall time
            done = await self.apply(quarantine) if quarantine else []
            return done
        try:
            findings = self.engine.tick(now)
        except Exception:
            self.stats.engine_errors += 1
            log.exception("rule engine tick failed")
            findings = []
        findings += quarantine
        done = await self.apply(findings) if findings else []
        escalated = await self._with_db(
            lambda conn: self._fenced(conn, lambda c: self.book.escalate_unacked(c, now))
        )
        self._applied(escalated)
        return done + escalated

    async def _unprovisioned(self) -> list[Finding]:
        """unprovisioned_device Findings from `quarantine_seen` (the ingesters write it with
        the quarantined messages' dead letters): one alert per pump seen within the last hour
        that is still not provisioned (or revoked); ended once the pump is provisioned.

        Raised once per episode: an alert a person resolved while the pump keeps publishing
        is not raised again until the pump has been quiet for the hour (or a restart)."""

        async def read(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], set[str]]:
            open_now = {
                a.pump_id for a in self.book.open_alerts.values() if a.rule == UNPROVISIONED
            }
            return await conn.fetch(_QUARANTINE_SQL, list(open_now)), open_now

        try:
            rows, open_now = await self._with_db(read)
        except asyncpg.PostgresError as exc:  # e.g. a schema before 0008: say so, go on
            log.warning("alerting: quarantine not read", extra={"error": _one_line(exc)})
            return []
        findings: list[Finding] = []
        priority = SERVICE_RULE_PRIORITY[UNPROVISIONED]
        seen: set[str] = set()
        for r in rows:
            pump_id = r["pump_id"]
            if r["provisioned"]:
                if pump_id in open_now:
                    summary = f"pump {pump_id} is provisioned now"
                    findings.append(
                        Finding(pump_id, UNPROVISIONED, False, priority, r["now"], summary)
                    )
                continue
            if not r["recent"]:
                continue  # an open alert stays open until the pump is provisioned
            seen.add(pump_id)
            if pump_id in self._quarantine_raised and pump_id not in open_now:
                continue
            state = "revoked" if r["registered"] else "not provisioned"
            findings.append(
                Finding(
                    pump_id,
                    UNPROVISIONED,
                    True,
                    priority,
                    r["now"],
                    f"unprovisioned device publishing: pump {pump_id} is {state}; its "
                    "messages are quarantined, not stored as data",
                    {"state": state, "first_seen": r["first_at"].isoformat()},
                )
            )
        self._quarantine_raised = seen
        return findings

    async def run(self, feed: bool = True) -> None:
        """Feed, watchdog, escalation, notifier (and the lease) until stop(); raises LeaseLost
        when another instance took over, after stopping everything this one ran."""
        notifier = asyncio.create_task(self.notifier.run(self._stopping), name="notifier")
        workers = [asyncio.create_task(self._watchdog(), name="watchdog")]
        if feed:
            workers.append(asyncio.create_task(self._consume(), name="feed"))
        if self.lease is not None:
            workers.append(asyncio.create_task(self._renew(), name="lease"))
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
        finally:
            self._stopping.set()
            for t in workers:
                t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await notifier
            await self._release()
            await self.close()
            log.info("alerting stopped", extra=dataclasses.asdict(self.stats))

    async def _watchdog(self) -> None:
        next_profiles = asyncio.get_running_loop().time() + _PROFILE_REFRESH_S
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.cfg.tick_s)
            if self._stopping.is_set():
                break
            try:
                await self.tick()
                if asyncio.get_running_loop().time() >= next_profiles:
                    next_profiles = asyncio.get_running_loop().time() + _PROFILE_REFRESH_S
                    await self._with_db(self._refresh_profiles)
            except LeaseLost:
                raise
            except Exception:  # keep watching: one failed round must not end the watchdog
                log.exception("alerting round failed; trying again next tick")

    async def _release(self) -> None:
        """On a clean stop, hand the lease over at once."""
        if self.lease is None or self.lease.epoch is None:
            return
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(self.dsn, timeout=5)
            try:
                await asyncio.wait_for(self.lease.release(conn), timeout=5)
            finally:
                await conn.close()

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), timeout=5)
        self._conn = None

    # database ----------------------------------------------------------------------------------

    async def _connection(self) -> asyncpg.Connection:
        """The book's connection, (re)opened with backoff; LISTENs for on-call changes."""
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((*_DB_ERRORS, asyncpg.PostgresError)),
            wait=wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5),
            before_sleep=functools.partial(self._db_failed, "alerting: database unavailable"),
        )
        conn: asyncpg.Connection = await retrying(self._open)
        if self._conn is not None:  # a reconnect: NOTIFYs may have been missed meanwhile
            await self.book.load(conn)
            self._dirty.clear()
            self._feed_wake.set()
        self._conn = conn
        return conn

    async def _open(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            await conn.add_listener(FEED_CHANNEL, self._on_feed)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _db_failed(self, what: str, attempt: RetryCallState) -> None:
        """Once per outage, not once per retry: the log says the database is gone, and when back."""
        if not self._db_lost:
            self._db_lost = True
            log.warning(
                f"{what}; retrying",
                extra={"error": _failure(attempt), "retry_s": _next_sleep_s(attempt)},
            )

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._dirty.add(int(payload))

    async def _with_db(self, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `action` on the book's connection, one at a time, waiting out an outage.

        A failed action changed nothing in memory (the book commits first), so it is simply
        run again on a new connection, after the book was reloaded from the database. The wait
        between tries is outside the lock.
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_DB_ERRORS),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            before_sleep=functools.partial(self._db_failed, "alerting: database error"),
        )
        result: T = await retrying(self._with_db_once, action)
        return result

    async def _with_db_once(self, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._lock:
            conn = await self._connection()
            try:
                if self._dirty:
                    dirty, self._dirty = self._dirty, set()
                    await self.book.reload(conn, dirty)
                result = await action(conn)
            except _DB_ERRORS:
                conn.terminate()  # the next try reconnects, and reloads the book
                raise
        if self._db_lost:
            self._db_lost = False
            log.info("alerting: database reachable again")
        return result

    def _applied(self, done: Sequence[Transition]) -> None:
        if not done:
            return
        self.stats.transitions += len(done)
        self.notifier.wake()
        for t in done:
            if t.phase != "continue":
                log.info(
                    "alert " + t.phase,
                    extra={
                        "alert_id": t.alert.alert_id,
                        "pump_id": t.alert.pump_id,
                        "rule": t.alert.rule,
                        "priority": t.alert.priority,
                        "actor": t.actor,
                    },
                )

    async def _refresh_profiles(self, conn: asyncpg.Connection) -> int:
        """Give the engine every pump's profile, and later only those that changed."""
        rows = await conn.fetch("SELECT * FROM pumps ORDER BY pump_id")
        if self.profile_factory is None:
            return len(rows)
        rejected = 0
        for row in rows:
            values = tuple(row.values())
            if self._profiles.get(row["pump_id"]) == values:
                continue
            try:
                self.engine.set_profile(self.profile_factory(dict(row)))
            except Exception:
                rejected += 1
                if rejected == 1:  # one traceback, not one per pump of the fleet
                    log.exception("pump profile rejected", extra={"pump_id": row["pump_id"]})
                continue
            self._profiles[row["pump_id"]] = values
        if rejected:
            self.stats.engine_errors += rejected
            log.warning("pump profiles rejected; rules use defaults", extra={"pumps": rejected})
        return len(rows)

    def _restore(self) -> None:
        """Tell the engine which alerts are still open, so it reports their end even when the
        replayed history no longer shows what raised them."""
        restore = getattr(self.engine, "restore", None)
        if restore is None:
            return
        for alert in self.book.open_alerts.values():
            if alert.rule in SERVICE_RULES:  # raised by this service, not the engine
                continue
            try:
                restore(alert.pump_id, alert.rule, alert.priority, alert.started_at)
            except Exception:
                self.stats.engine_errors += 1
                log.exception(
                    "rule engine refused an open alert",
                    extra={"alert_id": alert.alert_id, "rule": alert.rule},
                )

    async def _warm(self, conn: asyncpg.Connection) -> int:
        """Replay recent telemetry and events into the rules, per pump in seq order."""
        if self.cfg.warm_hours <= 0:
            return 0
        since = datetime.now(UTC) - timedelta(hours=self.cfg.warm_hours)
        count = 0
        async with conn.transaction():
            async for row in conn.cursor(_WARM_SQL, since, prefetch=2000):
                try:
                    msg = contract.decode(contract.topic(row["pump_id"], row["kind"]), row["doc"])
                except contract.ContractError as exc:
                    log.warning(
                        "stored message no longer valid; not replayed",
                        extra={"pump_id": row["pump_id"], "seq": row["seq"], "error": str(exc)},
                    )
                    continue
                try:
                    self.engine.warm(msg)
                except Exception:
                    self.stats.engine_errors += 1
                    log.exception(
                        "rule engine failed warming",
                        extra={"pump_id": msg.pump_id, "seq": msg.seq},
                    )
                if msg.kind == "telemetry" and (
                    self._fleet_now is None or msg.time > self._fleet_now
                ):
                    self._fleet_now = msg.time
                count += 1
        warm_done = getattr(self.engine, "warm_done", None)
        if warm_done is not None:
            warm_done()
        self.stats.warmed = count
        return count


UNPROVISIONED = "unprovisioned_device"
QUARANTINE_EVERY_S = 5.0
"""How often the watchdog reads `quarantine_seen` (at most once a tick)."""

# The pumps seen in quarantine within the hour, and those with an open alert ($1), with what
# the registry says about them now. Receive times and `now` are the database's clock.
_QUARANTINE_SQL = """
SELECT u.pump_id, q.first_at, now() AS now,
       coalesce(q.last_at >= now() - interval '1 hour', false) AS recent,
       p.pump_id IS NOT NULL AS registered,
       p.pump_id IS NOT NULL AND coalesce(p.revoked_at > now(), true) AS provisioned
FROM (SELECT pump_id FROM quarantine_seen WHERE last_at >= now() - interval '1 hour'
      UNION SELECT unnest($1::text[])) u
LEFT JOIN quarantine_seen q USING (pump_id)
LEFT JOIN pumps p USING (pump_id)
ORDER BY u.pump_id
"""

# Stored rows as the wire messages they were: telemetry's columns are the message's fields; an
# event's body is the message itself; statuses come from their log.
_TELEMETRY_DOC = """jsonb_strip_nulls(to_jsonb(t) - 'received_at')
               || jsonb_build_object('v', coalesce(t.v, 1), 'kind', 'telemetry')"""
_STATUS_DOC = """jsonb_build_object(
               'v', 1, 'kind', 'status', 'pump_id', s.pump_id, 'time', s.time, 'seq', s.seq,
               'online', s.online, 'reason', s.reason)"""
_IN_FEED = """EXISTS (SELECT 1 FROM alert_feed f WHERE f.pump_id = {a}.pump_id
                  AND f.seq = {a}.seq AND f.time = {a}.time AND f.kind = '{kind}')"""

# History for a restart, minus what still waits in the feed (it is judged from there).
_WARM_SQL = f"""
SELECT pump_id, seq, kind, doc::text AS doc FROM (
    SELECT t.pump_id, t.seq, 'telemetry' AS kind, {_TELEMETRY_DOC} AS doc
    FROM telemetry t WHERE t.time >= $1 AND NOT {_IN_FEED.format(a="t", kind="telemetry")}
    UNION ALL
    SELECT e.pump_id, e.seq, 'event', e.body FROM events e
    WHERE e.time >= $1 AND NOT {_IN_FEED.format(a="e", kind="event")}
    UNION ALL
    SELECT s.pump_id, s.seq, 'status', {_STATUS_DOC} FROM status_log s
    WHERE s.time >= $1 AND NOT {_IN_FEED.format(a="s", kind="status")}
) m
ORDER BY pump_id, seq
"""

# The next feed rows with their messages. Which rows: every row up to its pump's newest urgent
# one (a pump's own alarm), then the oldest; for each pump a prefix of its rows, read in stored
# order, so per-pump order holds while an alarm overtakes other pumps' backlog. (A batch of the
# urgent rows alone commits sooner, but a pump whose every reading carries its alarm then
# starves the others while its readings move the fleet clock: silence for all.) Statuses come
# from their log (pump_status may hold a newer one by then).
_FEED_SQL = f"""
WITH u AS (SELECT pump_id, max(id) AS upto FROM alert_feed WHERE urgent GROUP BY pump_id),
first AS (SELECT f.id FROM alert_feed f JOIN u USING (pump_id) WHERE f.id <= u.upto
          ORDER BY f.id LIMIT $1),
oldest AS (SELECT id FROM alert_feed ORDER BY id LIMIT $1),
pick AS (SELECT id FROM (SELECT id, 0 AS p FROM first UNION ALL SELECT id, 1 FROM oldest) x
         GROUP BY id ORDER BY min(p), id LIMIT $1),
f AS (SELECT a.* FROM alert_feed a JOIN pick USING (id))
SELECT f.id, f.pump_id, f.seq, f.kind, d.doc::text AS doc
FROM f LEFT JOIN LATERAL (
    SELECT {_TELEMETRY_DOC} AS doc FROM telemetry t
    WHERE f.kind = 'telemetry' AND t.pump_id = f.pump_id AND t.time = f.time AND t.seq = f.seq
    UNION ALL
    SELECT e.body FROM events e
    WHERE f.kind = 'event' AND e.pump_id = f.pump_id AND e.time = f.time AND e.seq = f.seq
    UNION ALL
    SELECT {_STATUS_DOC} FROM status_log s
    WHERE f.kind = 'status' AND s.pump_id = f.pump_id AND s.time = f.time AND s.seq = f.seq
) d ON true
ORDER BY f.id
"""


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _failure(attempt: RetryCallState) -> str:
    """The failed attempt's error, in one line."""
    exc = attempt.outcome.exception() if attempt.outcome is not None else None
    return _one_line(exc) if exc is not None else "unknown error"


def _next_sleep_s(attempt: RetryCallState) -> float:
    return round(attempt.next_action.sleep, 1) if attempt.next_action is not None else 0.0


# the service: one active instance, any number of standbys ---------------------------------------


class AlertingService:
    """`pumpfleet alerting`: stands by until it holds the lease, then runs an `Alerting` built
    fresh (open alerts, profiles and rule state from the database) until it is stopped or loses
    the lease, and stands by again. /healthz says which instance is active."""

    def __init__(
        self,
        settings: Settings,
        engine_factory: Callable[[Settings], RuleEngine] = build_engine,
        *,
        poll_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.lease = Lease(settings.alerts.lease_s)
        self.poll_s = poll_s
        self.takeovers = 0
        self.lost = 0
        self.current: Alerting | None = None
        self.metrics_port: int | None = None
        self._stopping = asyncio.Event()
        self._db_ok = False

    @property
    def active(self) -> bool:
        return self.current is not None and self.lease.epoch is not None

    def healthy(self) -> tuple[bool, dict[str, object]]:
        detail: dict[str, object] = {
            "role": "active" if self.active else "standby",
            "holder": self.lease.holder,
            "epoch": self.lease.epoch,
            "database_ok": self._db_ok,
            "takeovers": self.takeovers,
        }
        return self._db_ok, detail

    def stop(self) -> None:
        self._stopping.set()
        if self.current is not None:
            self.current.stop()

    async def run(self) -> None:
        server = await self._serve_metrics()
        try:
            while not self._stopping.is_set():
                if not await self._acquire():
                    break
                self.takeovers += 1
                log.info(
                    "alerting active",
                    extra={"holder": self.lease.holder, "epoch": self.lease.epoch},
                )
                alerting = Alerting(
                    self.settings, self.engine_factory(self.settings), lease=self.lease
                )
                self.current = alerting
                try:
                    if self._stopping.is_set():
                        break
                    await alerting.start()
                    await alerting.run()
                except LeaseLost as exc:
                    self.lost += 1
                    log.warning("alerting standing by: lease lost", extra={"error": str(exc)})
                    await alerting.close()
                finally:
                    self.current = None
                    self.lease.epoch = None
        finally:
            if server is not None:
                server.close()

    async def _acquire(self) -> bool:
        """Wait for the lease (standby); False when stopped first.

        A poll loop by design, every `poll_s`: a standby must see an expired lease at once, so a
        database error waits for the next poll rather than a growing backoff."""
        announced = False
        conn: asyncpg.Connection | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if conn is None or conn.is_closed():
                        dsn = self.lease.dsn(self.settings.database_url.get_secret_value())
                        conn = await asyncpg.connect(dsn, timeout=10)
                    got = await asyncio.wait_for(self.lease.try_acquire(conn), timeout=10)
                    self._db_ok = True
                    if got:
                        return True
                    if not announced:
                        who = await Lease.who(conn)
                        log.info("alerting standing by", extra={"active": who[0] if who else None})
                        announced = True
                except (*_DB_ERRORS, asyncpg.PostgresError) as exc:
                    if self._db_ok or not announced:
                        log.warning(
                            "alerting: database unavailable; retrying",
                            extra={"error": _one_line(exc)},
                        )
                        announced = True
                    self._db_ok = False
                    if conn is not None:
                        conn.terminate()
                    conn = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.poll_s)
            return False
        finally:
            if conn is not None:
                conn.terminate()

    async def _serve_metrics(self) -> asyncio.Server | None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from ingest._metrics import http_endpoint

        cfg = self.settings.alerts
        if cfg.metrics_port is None:
            return None
        service = self

        class _Collector:
            def collect(self) -> Any:
                yield GaugeMetricFamily(
                    "pumpfleet_alerting_active",
                    "1 on the instance that holds the lease",
                    value=1.0 if service.active else 0.0,
                )
                yield CounterMetricFamily(
                    "pumpfleet_alerting_takeovers",
                    "Times this instance became the active one",
                    value=service.takeovers,
                )
                yield CounterMetricFamily(
                    "pumpfleet_alerting_leases_lost",
                    "Times another instance took the lease from this one",
                    value=service.lost,
                )
                stats = service.current.stats if service.current else AlertingStats()
                for name, value in dataclasses.asdict(stats).items():
                    yield CounterMetricFamily(
                        f"pumpfleet_alerting_{name}",
                        f"{name} since this instance became active",
                        value=value,
                    )

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        server = await http_endpoint(cfg.metrics_host, cfg.metrics_port, registry, self.healthy)
        if server is not None:
            self.metrics_port = server.sockets[0].getsockname()[1]
        return server
