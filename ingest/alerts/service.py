"""Alerting inside the ingester: rule engine -> alert book -> notifier.

`Alerting.on_commit` is the Ingester's hook: after each committed batch it runs the rules over
the first-seen messages and applies their Findings to the book in one transaction. `run()`
beside the ingester drives what happens without a message: the rules' watchdog (telemetry
silence), the escalation of unacknowledged high alerts, and the notifier.

`start()` rebuilds what a restart lost: the open alerts, the pumps' profiles, and the rules'
per-pump state, replayed from the last `warm_hours` of telemetry and events (`warm`, which
yields no Findings, so a restart never re-raises what is already open).

Rule state is per pump, so a pump's messages must all reach one Alerting: run one ingester with
alerting on, or route each pump to one owner (ingest/alerts/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg

from ingest import rules
from ingest.alerts.book import CHANNEL, Book, BookPolicy, Transition
from ingest.alerts.notify import Notifier, receivers
from ingest.findings import Finding
from pumpfleet import contract
from pumpfleet.contract import Message
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
    asyncpg.CannotConnectNowError,
)


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
        self.notifier = Notifier(self.cfg, settings.database_url.get_secret_value())
        self.stats = AlertingStats()
        self._clock = clock
        self._fleet_now: datetime | None = None
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._dirty: set[int] = set()
        self._profiles: dict[str, tuple[Any, ...]] = {}
        self._stopping = asyncio.Event()
        # On the wall clock, silence counts from arrival, not from a device clock that may be off.
        self._received_at = self.cfg.clock == "wall" and _accepts(engine.observe, "received_at")

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
        """The Ingester's hook: rules over the batch, then one transaction for its Findings."""
        findings: list[Finding] = []
        latest = self._fleet_now
        arrived = datetime.now(UTC)
        for msg in msgs:
            # Statuses do not move the fleet clock: a retained one replays an old device time,
            # or any time at all, to every new subscriber.
            if msg.kind != "status" and (latest is None or msg.time > latest):
                latest = msg.time
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
        if not findings:
            return
        try:
            await self.apply(findings)
        except Exception:  # a bug here must not stop ingestion: say so loudly and go on
            self.stats.apply_errors += 1
            log.exception("alert book failed; findings dropped", extra={"findings": len(findings)})

    async def apply(self, findings: Sequence[Finding]) -> list[Transition]:
        """Apply Findings to the book, waiting out a database outage."""
        self.stats.findings += len(findings)
        done = await self._with_db(lambda conn: self.book.apply(conn, findings))
        self._applied(done)
        return done

    async def tick(self) -> list[Transition]:
        """One watchdog round: the rules' tick, then the unacknowledged-escalation check."""
        now = self.now()
        if now is None:
            return []
        try:
            findings = self.engine.tick(now)
        except Exception:
            self.stats.engine_errors += 1
            log.exception("rule engine tick failed")
            findings = []
        done = await self.apply(findings) if findings else []
        escalated = await self._with_db(lambda conn: self.book.escalate_unacked(conn, now))
        self._applied(escalated)
        return done + escalated

    async def run(self) -> None:
        """Watchdog, escalation and notifier until stop()."""
        notifier = asyncio.create_task(self.notifier.run(self._stopping), name="notifier")
        next_profiles = asyncio.get_running_loop().time() + _PROFILE_REFRESH_S
        try:
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
                except Exception:  # keep watching: one failed round must not end the watchdog
                    log.exception("alerting round failed; trying again next tick")
        finally:
            self._stopping.set()
            await notifier
            await self.close()
            log.info("alerting stopped", extra=dataclasses.asdict(self.stats))

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
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(
                    self.settings.database_url.get_secret_value(), timeout=10
                )
                await conn.add_listener(CHANNEL, self._on_notify)
                break
            except (*_DB_ERRORS, asyncpg.PostgresError) as exc:
                log.warning(
                    "alerting: database unavailable; retrying",
                    extra={"error": _one_line(exc), "retry_s": round(delay, 1)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0) * random.uniform(0.9, 1.1)
        if self._conn is not None:  # a reconnect: NOTIFYs may have been missed meanwhile
            await self.book.load(conn)
            self._dirty.clear()
        self._conn = conn
        return conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._dirty.add(int(payload))

    async def _with_db(self, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `action` on the book's connection, one at a time, waiting out an outage.

        A failed action changed nothing in memory (the book commits first), so it is simply
        run again on a new connection, after the book was reloaded from the database.
        """
        delay = 0.2
        while True:
            async with self._lock:
                conn = await self._connection()
                try:
                    if self._dirty:
                        dirty, self._dirty = self._dirty, set()
                        await self.book.reload(conn, dirty)
                    return await action(conn)
                except _DB_ERRORS as exc:
                    log.warning(
                        "alerting: database error; retrying",
                        extra={"error": _one_line(exc), "retry_s": round(delay, 1)},
                    )
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

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
                if msg.kind != "status" and (self._fleet_now is None or msg.time > self._fleet_now):
                    self._fleet_now = msg.time
                count += 1
        self.stats.warmed = count
        return count


# Stored rows as the wire messages they were: telemetry's columns are the message's fields; an
# event's body is the message itself; the latest status is all that is kept of statuses.
_WARM_SQL = """
SELECT pump_id, seq, kind, doc::text AS doc FROM (
    SELECT t.pump_id, t.seq, 'telemetry' AS kind,
           jsonb_strip_nulls(to_jsonb(t) - 'received_at')
               || jsonb_build_object('v', coalesce(t.v, 1), 'kind', 'telemetry') AS doc
    FROM telemetry t WHERE t.time >= $1
    UNION ALL
    SELECT pump_id, seq, 'event', body FROM events WHERE time >= $1
    UNION ALL
    SELECT pump_id, seq, 'status', jsonb_build_object(
               'v', 1, 'kind', 'status', 'pump_id', pump_id, 'time', time, 'seq', seq,
               'online', online, 'reason', reason)
    FROM pump_status WHERE time >= $1
) m
ORDER BY pump_id, seq
"""


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
