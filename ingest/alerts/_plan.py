"""The alert book's deciding half: Findings and open alerts in, transitions out, no I/O.

`plan` turns a batch of commands (Findings from the rules, `Unacked` checks from the escalation
timer) into the transitions they cause, against a snapshot of the open alerts, without touching
that snapshot: each transition carries a fresh copy of its alert with the next revision. The
book (book.py) writes the plan in one transaction and only then `settle`s it into its memory, so
a failed write leaves nothing half-applied and the same batch can be planned again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pumpfleet.findings import PRIORITY_RANK, Finding

RULES_ACTOR = "rules"
ESCALATION_ACTOR = "escalation"

Key = tuple[str, str]
"""(pump_id, rule): one open alert at most per key."""


@dataclass(slots=True)
class Alert:
    """One alert as the book sees it; mirrors its `alerts` row."""

    alert_id: int
    pump_id: str
    rule: str
    clinic: str
    priority: str
    phase: str
    summary: str
    details: dict[str, Any]
    started_at: datetime
    updated_at: datetime
    priority_since: datetime
    ended_at: datetime | None = None
    acked_at: datetime | None = None
    acked_by: str | None = None
    resolved_by: str | None = None
    escalated_at: datetime | None = None
    last_seq: int | None = None
    rev: int = 0
    last_history_at: datetime | None = field(default=None, compare=False)
    """In memory only: when the last history row was written (throttles 'continue')."""

    @property
    def key(self) -> Key:
        return (self.pump_id, self.rule)

    @property
    def is_open(self) -> bool:
        return self.ended_at is None


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of alert_history, with the alert as it stood right after."""

    alert: Alert
    phase: str
    at: datetime
    actor: str
    note: str | None = None
    previous_priority: str | None = None
    previous_escalated: bool | None = None
    history: bool = True
    """False for a throttled 'continue': the alert row changes, no history row is written."""


@dataclass(frozen=True, slots=True)
class Unacked:
    """Command: escalate this alert if it is still high and unacknowledged."""

    key: Key
    now: datetime


Command = Finding | Unacked


@dataclass(frozen=True, slots=True)
class Timing:
    """The lifecycle's clocks (BookPolicy's, without the receivers)."""

    unacked_escalation: timedelta = timedelta(minutes=15)
    continue_history: timedelta = timedelta(hours=1)


@dataclass(slots=True)
class Plan:
    transitions: list[Transition] = field(default_factory=list)
    finals: dict[int, Alert] = field(default_factory=dict)
    """Alert id (negative: not inserted yet) -> its state after the batch."""
    expected_rev: dict[int, int] = field(default_factory=dict)
    """Alert id -> the revision the database must still hold for the update to apply."""
    next_temp: int = -1
    """The last temporary (negative) id handed out; the next plan continues below it."""


def plan(
    open_alerts: Mapping[Key, Alert],
    commands: Sequence[Command],
    timing: Timing,
    *,
    next_temp: int = -1,
) -> Plan:
    """Decide every transition of a batch; `open_alerts` and its alerts are left untouched.

    Alerts started here get temporary ids below `next_temp` (the plan's `next_temp` says
    where the next plan continues); the writer swaps them for real ones."""
    out = Plan(next_temp=next_temp)
    work: dict[Key, Alert | None] = {}

    def current(key: Key) -> Alert | None:
        return work[key] if key in work else open_alerts.get(key)

    for cmd in commands:
        cur = current(cmd.key if isinstance(cmd, Unacked) else (cmd.pump_id, cmd.rule))
        if cur is not None and cur.alert_id > 0 and cur.alert_id not in out.expected_rev:
            out.expected_rev[cur.alert_id] = cur.rev
        if isinstance(cmd, Unacked):
            t = plan_unacked(cur, cmd, timing)
        else:
            if cur is None and cmd.active:
                out.next_temp -= 1
            t = plan_finding(cur, cmd, timing, new_id=out.next_temp)
        if t is None:
            continue
        if t.history:
            t.alert.last_history_at = t.at  # a fresh copy: the caller's own is untouched
        out.transitions.append(t)
        out.finals[t.alert.alert_id] = t.alert
        work[t.alert.key] = t.alert if t.alert.is_open else None
    return out


def plan_finding(
    cur: Alert | None, f: Finding, timing: Timing, *, new_id: int = -1
) -> Transition | None:
    """What one Finding does to the open alert of its (pump, rule), if any; None: nothing.

    `new_id` is the (temporary) id of the alert it starts when there is none."""
    details = normalise(f.details)
    if not f.active:
        if cur is None:
            return None
        if stale(cur, f):
            return None
        ended = bump(cur, phase="end", ended_at=f.at, updated_at=f.at, last_seq=seq_after(cur, f))
        return Transition(ended, "end", f.at, RULES_ACTOR, f.summary)
    if cur is None:
        alert = Alert(
            alert_id=new_id,
            pump_id=f.pump_id,
            rule=f.rule,
            clinic="",
            priority=f.priority,
            phase="start",
            summary=f.summary,
            details=details,
            started_at=f.at,
            updated_at=f.at,
            priority_since=f.at,
            last_seq=f.seq,
        )
        return Transition(alert, "start", f.at, RULES_ACTOR)
    if stale(cur, f):
        return None
    rise = PRIORITY_RANK[f.priority] - PRIORITY_RANK[cur.priority]
    if rise:
        changes: dict[str, Any] = {
            "priority": f.priority,
            "priority_since": f.at,
            "escalated_at": None,
        }
        if rise > 0:  # an acknowledgement covers the priority it was given at
            changes.update(acked_at=None, acked_by=None)
        phase = "escalate" if rise > 0 else "de-escalate"
        alert = bump(
            cur,
            phase=phase,
            summary=f.summary,
            details=details,
            updated_at=f.at,
            last_seq=seq_after(cur, f),
            **changes,
        )
        return Transition(
            alert,
            phase,
            f.at,
            RULES_ACTOR,
            previous_priority=cur.priority,
            previous_escalated=cur.escalated_at is not None,
        )
    if f.summary == cur.summary and details == cur.details:
        return None  # the same state again: nothing to say, nothing to write
    alert = bump(
        cur,
        phase="continue",
        summary=f.summary,
        details=details,
        updated_at=f.at,
        last_seq=seq_after(cur, f),
    )
    every = timing.continue_history
    quiet = cur.last_history_at is not None and f.at - cur.last_history_at < every
    return Transition(alert, "continue", f.at, RULES_ACTOR, history=not quiet)


def plan_unacked(cur: Alert | None, cmd: Unacked, timing: Timing) -> Transition | None:
    """The escalation of an alert nobody acknowledged in time; None when it is not due."""
    if cur is None or not unacked_due(cur, cmd.now, timing.unacked_escalation):
        return None
    alert = bump(cur, phase="escalate", escalated_at=cmd.now)
    minutes = timing.unacked_escalation.total_seconds() / 60
    return Transition(
        alert,
        "escalate",
        cmd.now,
        ESCALATION_ACTOR,
        note=f"not acknowledged within {minutes:g} min",
        previous_priority=cur.priority,
        previous_escalated=False,
    )


def due_unacked(open_alerts: Mapping[Key, Alert], now: datetime, limit: timedelta) -> list[Unacked]:
    """The escalation checks due at `now`, one per open alert that qualifies."""
    return [Unacked(a.key, now) for a in open_alerts.values() if unacked_due(a, now, limit)]


def settle(open_alerts: MutableMapping[Key, Alert], finals: Mapping[int, Alert]) -> None:
    """Bring the open alerts up to a committed plan: open ones replace, ended ones leave."""
    for alert in finals.values():
        if alert.is_open:
            open_alerts[alert.key] = alert
        else:
            mine = open_alerts.get(alert.key)
            if mine is not None and mine.alert_id == alert.alert_id:
                del open_alerts[alert.key]


def bump(cur: Alert, **changes: Any) -> Alert:
    """A new copy with the changes and the next revision (the book's copy stays untouched)."""
    return dataclasses.replace(cur, rev=cur.rev + 1, **changes)


def normalise(details: Mapping[str, Any]) -> dict[str, Any]:
    """As it will read back from jsonb, so an unchanged condition compares equal."""
    out: dict[str, Any] = json.loads(json.dumps(dict(details), default=str))
    return out


def stale(cur: Alert, f: Finding) -> bool:
    """A Finding from a message older than the one the alert last saw (a replay)."""
    return (
        f.seq is not None
        and cur.last_seq is not None
        and f.seq <= cur.last_seq
        and f.at <= cur.updated_at
    )


def seq_after(cur: Alert, f: Finding) -> int | None:
    """The alert's last seq once it has seen `f` (a Finding without one keeps the old)."""
    return f.seq if f.seq is not None else cur.last_seq


def unacked_due(a: Alert, now: datetime, limit: timedelta) -> bool:
    return (
        a.priority == "high"
        and a.acked_at is None
        and a.escalated_at is None
        and a.ended_at is None
        and now - a.priority_since >= limit
    )
