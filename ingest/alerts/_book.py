"""The alert book: Findings in, alerts with one persistent id per (pump, rule) out (IHE PCD ACM).

The book keeps the open alerts in memory (loaded from the database at start), so a batch of
Findings is decided without a query per Finding, then written in one transaction together with
its history rows and its outbox rows. Memory changes only after that commit.

Another process (the `pumpfleet alerts ack|resolve` CLI) may change an alert behind the book's
back. Every write bumps `alerts.rev` and the book's updates require the revision it last saw: a
stale copy makes the transaction fail, the book reloads those alerts and decides again. The CLI
also sends a NOTIFY so a running book refreshes at once (see `CHANNEL`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg

from ingest.alerts._plan import (
    Alert,
    Command,
    Plan,
    Timing,
    Transition,
    bump,
    due_unacked,
    plan,
    settle,
)
from pumpfleet.findings import PRIORITY_RANK, Finding

log = logging.getLogger("pumpfleet.alerts")

Receiver = Literal["alertmanager", "webhook"]
RECEIVERS: tuple[Receiver, ...] = ("alertmanager", "webhook")
Action = Literal["trigger", "acknowledge", "resolve"]

CHANNEL = "pumpfleet_alerts"
"""NOTIFY channel: the payload is the id of an alert a person changed."""

# What each receiver hears about, by history phase. Alertmanager has no acknowledgement and
# gets the figures of a 'continue' from the periodic re-send; the webhook follows PagerDuty's
# trigger/acknowledge/resolve.
_ACTIONS: dict[Receiver, dict[str, Action]] = {
    "alertmanager": {
        "start": "trigger",
        "escalate": "trigger",
        "de-escalate": "trigger",
        "end": "resolve",
    },
    "webhook": {
        "start": "trigger",
        "escalate": "trigger",
        "de-escalate": "trigger",
        "ack": "acknowledge",
        "end": "resolve",
    },
}


class AlertError(Exception):
    """An on-call action that cannot be done (unknown id, already ended); one line."""


class _Conflict(Exception):
    """The database differs from the book's copy; reload these and decide again."""

    def __init__(self, ids: Iterable[int] = (), keys: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__("stale alert copy")
        self.ids = set(ids)
        self.keys = set(keys)


def event(t: Transition) -> dict[str, Any]:
    """The outbox snapshot of a transition; receivers render it (ingest/alerts/_notify.py)."""
    a = t.alert
    return {
        "alert_id": a.alert_id,
        "pump_id": a.pump_id,
        "rule": a.rule,
        "clinic": a.clinic,
        "priority": a.priority,
        "phase": t.phase,
        "summary": a.summary,
        "details": a.details,
        "at": _iso(t.at),
        "actor": t.actor,
        "note": t.note,
        "started_at": _iso(a.started_at),
        "ended_at": _iso(a.ended_at),
        "acked_at": _iso(a.acked_at),
        "acked_by": a.acked_by,
        "resolved_by": a.resolved_by,
        "escalated": a.escalated_at is not None,
        "previous_priority": t.previous_priority,
        "previous_escalated": t.previous_escalated,
    }


@dataclass(frozen=True, slots=True)
class BookPolicy:
    """The knobs of the lifecycle (from AlertSettings)."""

    unacked_escalation: timedelta = timedelta(minutes=15)
    continue_history: timedelta = timedelta(hours=1)
    receivers: tuple[Receiver, ...] = ()
    """Receivers that get outbox rows; one not configured gets none."""


class Book:
    """The open alerts and the transitions that change them; see the module docstring."""

    def __init__(self, policy: BookPolicy | None = None) -> None:
        self.policy = policy or BookPolicy()
        self._open: dict[tuple[str, str], Alert] = {}
        self._next_temp = -1

    # reading ------------------------------------------------------------------------------------

    @property
    def open_alerts(self) -> Mapping[tuple[str, str], Alert]:
        return self._open

    async def load(self, conn: asyncpg.Connection) -> int:
        """Replace the in-memory view with the open alerts in the database."""
        self._open = {a.key: a for a in await load_open(conn)}
        return len(self._open)

    async def reload(self, conn: asyncpg.Connection, ids: Iterable[int]) -> None:
        """Refresh these alerts from the database (another process changed them)."""
        ids = list(ids)
        if not ids:
            return
        rows = await conn.fetch(f"{_SELECT} WHERE alert_id = ANY($1::int8[])", ids)
        for alert in map(alert_from_row, rows):
            mine = self._open.get(alert.key)
            if alert.is_open:
                if mine is not None:
                    alert.last_history_at = mine.last_history_at
                self._open[alert.key] = alert
            elif mine is not None and mine.alert_id == alert.alert_id:
                del self._open[alert.key]

    async def _reload_keys(self, conn: asyncpg.Connection, keys: Iterable[tuple[str, str]]) -> None:
        keys = list(keys)
        if not keys:
            return
        rows = await conn.fetch(
            f"{_SELECT} WHERE ended_at IS NULL AND (pump_id, rule) IN "
            "(SELECT * FROM unnest($1::text[], $2::text[]))",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        for key in keys:
            self._open.pop(key, None)
        for alert in map(alert_from_row, rows):
            self._open[alert.key] = alert

    # changing -----------------------------------------------------------------------------------

    async def apply(
        self, conn: asyncpg.Connection, findings: Sequence[Finding]
    ) -> list[Transition]:
        """Turn a batch of Findings into transitions, committed in one transaction."""
        good = [f for f in findings if f.priority in PRIORITY_RANK]
        if len(good) != len(findings):
            bad = next(f for f in findings if f.priority not in PRIORITY_RANK)
            log.error(
                "finding with an unknown priority dropped",
                extra={"pump_id": bad.pump_id, "rule": bad.rule, "priority": bad.priority},
            )
        return await self._run(conn, good)

    async def escalate_unacked(self, conn: asyncpg.Connection, now: datetime) -> list[Transition]:
        """Escalate high alerts nobody acknowledged within the policy's time."""
        due = due_unacked(self._open, now, self.policy.unacked_escalation)
        if not due:
            return []
        return await self._run(conn, due)

    async def _run(self, conn: asyncpg.Connection, commands: Sequence[Command]) -> list[Transition]:
        for _attempt in range(5):
            plan = self._plan(commands)
            if not plan.transitions and not plan.finals:
                return []
            try:
                await self._write(conn, plan)
            except _Conflict as conflict:
                log.info(
                    "alert changed elsewhere; reloading",
                    extra={"alerts": len(conflict.ids), "keys": len(conflict.keys)},
                )
                await self.reload(conn, conflict.ids)
                await self._reload_keys(conn, conflict.keys)
                continue
            settle(self._open, plan.finals)
            return plan.transitions
        raise RuntimeError("alert book: database kept changing under the batch; gave up")

    def _plan(self, commands: Sequence[Command]) -> Plan:
        """Decide every transition in memory (_plan.py, no I/O); the book itself is untouched."""
        timing = Timing(self.policy.unacked_escalation, self.policy.continue_history)
        decided = plan(self._open, commands, timing, next_temp=self._next_temp)
        self._next_temp = decided.next_temp
        return decided

    async def _write(self, conn: asyncpg.Connection, plan: Plan) -> None:
        updates = [a for a in plan.finals.values() if a.alert_id > 0]
        inserts = [a for a in plan.finals.values() if a.alert_id < 0]
        async with conn.transaction():
            if inserts:
                await self._assign_ids(conn, plan, inserts)
            if updates:
                done = await conn.fetch(
                    _UPDATE_SQL,
                    *_columns(updates),
                    [plan.expected_rev[a.alert_id] for a in updates],
                )
                if len(done) != len(updates):
                    stale = {a.alert_id for a in updates} - {r[0] for r in done}
                    raise _Conflict(ids=stale)
            if inserts:
                try:
                    await conn.execute(_INSERT_SQL, *_columns(inserts))
                except asyncpg.UniqueViolationError:
                    raise _Conflict(keys=[a.key for a in inserts]) from None
            await write_history(conn, [t for t in plan.transitions if t.history])
            await write_outbox(conn, plan.transitions, self.policy.receivers)

    async def _assign_ids(self, conn: asyncpg.Connection, plan: Plan, new: list[Alert]) -> None:
        """Real ids and clinics for alerts started in this batch, before rows reference them."""
        ids = await conn.fetchval(_NEXT_IDS_SQL, len(new))
        clinics = dict(
            await conn.fetch(
                "SELECT pump_id, clinic FROM pumps WHERE pump_id = ANY($1::text[])",
                list({a.pump_id for a in new}),
            )
        )
        real = dict(zip((a.alert_id for a in new), ids, strict=True))
        for t in plan.transitions:
            a = t.alert
            if a.alert_id in real:
                a.alert_id = real[a.alert_id]
                a.clinic = clinics.get(a.pump_id, "unassigned")
        plan.finals = {a.alert_id: a for a in plan.finals.values()}


# On-call actions (a person, usually through the CLI) -------------------------------------------


async def acknowledge(
    conn: asyncpg.Connection,
    alert_id: int,
    by: str,
    *,
    note: str | None = None,
    receivers: Sequence[Receiver] = (),
    now: datetime | None = None,
) -> Alert:
    """Record who acknowledged an open alert; it stays open until its condition ends."""
    now = now or datetime.now(UTC)
    async with conn.transaction():
        cur = await _locked(conn, alert_id)
        if cur.acked_at is not None:
            raise AlertError(
                f"alert {alert_id} already acknowledged by {cur.acked_by} at {_human(cur.acked_at)}"
            )
        alert = bump(cur, acked_at=now, acked_by=by)
        await _person_write(conn, Transition(alert, "ack", now, by, note), receivers)
    return alert


async def resolve(
    conn: asyncpg.Connection,
    alert_id: int,
    by: str,
    *,
    note: str | None = None,
    receivers: Sequence[Receiver] = (),
    now: datetime | None = None,
) -> Alert:
    """End an open alert by hand. If its condition still holds, the rules raise a new one."""
    now = now or datetime.now(UTC)
    async with conn.transaction():
        cur = await _locked(conn, alert_id)
        alert = bump(cur, phase="end", ended_at=now, updated_at=now, resolved_by=by)
        await _person_write(conn, Transition(alert, "end", now, by, note), receivers)
    return alert


async def _locked(conn: asyncpg.Connection, alert_id: int) -> Alert:
    row = await conn.fetchrow(f"{_SELECT} WHERE alert_id = $1 FOR UPDATE", alert_id)
    if row is None:
        raise AlertError(f"no alert {alert_id}; `pumpfleet alerts list` shows the ids")
    alert = alert_from_row(row)
    if alert.ended_at is not None:
        how = f"resolved by {alert.resolved_by}" if alert.resolved_by else "condition ended"
        raise AlertError(f"alert {alert_id} already ended at {_human(alert.ended_at)} ({how})")
    return alert


async def _person_write(
    conn: asyncpg.Connection, t: Transition, receivers: Sequence[Receiver]
) -> None:
    await conn.execute(_UPDATE_SQL, *_columns([t.alert]), [t.alert.rev - 1])
    await write_history(conn, [t])
    await write_outbox(conn, [t], receivers)
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(t.alert.alert_id))


async def load_open(conn: asyncpg.Connection) -> list[Alert]:
    """Every open alert, from the database."""
    rows = await conn.fetch(f"{_SELECT} WHERE ended_at IS NULL ORDER BY alert_id")
    return [alert_from_row(r) for r in rows]


# rows ------------------------------------------------------------------------------------------


async def write_history(conn: asyncpg.Connection, transitions: Sequence[Transition]) -> None:
    if not transitions:
        return
    await conn.execute(
        """INSERT INTO alert_history (alert_id, at, phase, priority, actor, note, details)
           SELECT * FROM unnest($1::int8[], $2::timestamptz[], $3::text[], $4::text[],
                                $5::text[], $6::text[], $7::jsonb[])""",
        [t.alert.alert_id for t in transitions],
        [t.at for t in transitions],
        [t.phase for t in transitions],
        [t.alert.priority for t in transitions],
        [t.actor for t in transitions],
        [t.note for t in transitions],
        [json.dumps(t.alert.details) for t in transitions],
    )


async def write_outbox(
    conn: asyncpg.Connection, transitions: Sequence[Transition], receivers: Sequence[Receiver]
) -> int:
    """Queue the notifications of these transitions; in the caller's transaction."""
    rows = [
        (receiver, t.alert.alert_id, action, json.dumps(event(t)))
        for t in transitions
        for receiver in receivers
        if (action := _ACTIONS[receiver].get(t.phase)) is not None
    ]
    if rows:
        await conn.execute(
            """INSERT INTO alert_outbox (receiver, alert_id, action, event)
               SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::jsonb[])""",
            *(list(col) for col in zip(*rows, strict=True)),
        )
    return len(rows)


_SELECT = """SELECT alert_id, pump_id, rule, coalesce(clinic, 'unassigned') AS clinic, priority,
    phase, summary, details, started_at, updated_at, coalesce(priority_since, started_at)
    AS priority_since, ended_at, acked_at, acked_by, resolved_by, escalated_at, last_seq, rev
    FROM alerts"""

_NEXT_IDS_SQL = """SELECT array_agg(nextval(pg_get_serial_sequence('alerts', 'alert_id')))
    FROM generate_series(1, $1)"""

_COLUMNS = (
    "alert_id int8",
    "pump_id text",
    "rule text",
    "clinic text",
    "priority text",
    "phase text",
    "summary text",
    "details jsonb",
    "started_at timestamptz",
    "updated_at timestamptz",
    "priority_since timestamptz",
    "ended_at timestamptz",
    "acked_at timestamptz",
    "acked_by text",
    "resolved_by text",
    "escalated_at timestamptz",
    "last_seq int8",
    "rev int4",
)
_NAMES = [c.split()[0] for c in _COLUMNS]
_UNNEST = ", ".join(f"${i}::{c.split()[1]}[]" for i, c in enumerate(_COLUMNS, 1))

_INSERT_SQL = f"""INSERT INTO alerts ({", ".join(_NAMES)})
    SELECT * FROM unnest({_UNNEST})"""

_UPDATE_SQL = f"""UPDATE alerts a SET {", ".join(f"{n} = u.{n}" for n in _NAMES[4:])}
    FROM unnest({_UNNEST}, ${len(_COLUMNS) + 1}::int4[]) AS u({", ".join(_NAMES)}, expected_rev)
    WHERE a.alert_id = u.alert_id AND a.rev = u.expected_rev
    RETURNING a.alert_id"""


def _columns(alerts: Sequence[Alert]) -> list[list[Any]]:
    return [
        [a.alert_id for a in alerts],
        [a.pump_id for a in alerts],
        [a.rule for a in alerts],
        [a.clinic for a in alerts],
        [a.priority for a in alerts],
        [a.phase for a in alerts],
        [a.summary for a in alerts],
        [json.dumps(a.details) for a in alerts],
        [a.started_at for a in alerts],
        [a.updated_at for a in alerts],
        [a.priority_since for a in alerts],
        [a.ended_at for a in alerts],
        [a.acked_at for a in alerts],
        [a.acked_by for a in alerts],
        [a.resolved_by for a in alerts],
        [a.escalated_at for a in alerts],
        [a.last_seq for a in alerts],
        [a.rev for a in alerts],
    ]


def alert_from_row(row: Mapping[str, Any]) -> Alert:
    details = row["details"]
    return Alert(
        alert_id=row["alert_id"],
        pump_id=row["pump_id"],
        rule=row["rule"],
        clinic=row["clinic"],
        priority=row["priority"],
        phase=row["phase"],
        summary=row["summary"],
        details=json.loads(details) if isinstance(details, str) else dict(details),
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        priority_since=row["priority_since"],
        ended_at=row["ended_at"],
        acked_at=row["acked_at"],
        acked_by=row["acked_by"],
        resolved_by=row["resolved_by"],
        escalated_at=row["escalated_at"],
        last_seq=row["last_seq"],
        rev=row["rev"],
    )


# helpers ---------------------------------------------------------------------------------------


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _human(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
