"""`pumpfleet alerts list|show|ack|resolve`: the on-call person's view of the alert book."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import asyncpg

from ingest.alerts import book
from ingest.alerts.notify import receivers
from ingest.findings import PRIORITY_RANK
from pumpfleet.settings import Settings

_PRIORITIES = sorted(PRIORITY_RANK, key=PRIORITY_RANK.__getitem__, reverse=True)


def register(sub: Any) -> None:
    alerts = sub.add_parser(
        "alerts", help="list, show, acknowledge and resolve alerts", description=__doc__
    ).add_subparsers(required=True, metavar="ACTION")

    p = alerts.add_parser(
        "list",
        help="alerts, most urgent first",
        description="Alerts, open ones first, then by priority (high first), newest first.",
    )
    p.add_argument("--open", action="store_true", help="only alerts that have not ended")
    p.add_argument("--priority", choices=_PRIORITIES, help="only this priority")
    p.add_argument("--pump", help="only this pump id")
    p.add_argument("--rule", help="only this rule, e.g. low_reservoir")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(handler=_list)

    p = alerts.add_parser("show", help="one alert with its history")
    p.add_argument("alert_id", type=int)
    p.set_defaults(handler=_show)

    for name, handler, text in (
        ("ack", _ack, "acknowledge an open alert (it stays open until its condition ends)"),
        ("resolve", _resolve, "end an open alert by hand"),
    ):
        p = alerts.add_parser(name, help=text, description=text)
        p.add_argument("alert_id", type=int)
        p.add_argument("--by", required=True, help="who (name or on-call id)")
        p.add_argument("--note", default=None, help="free text for the history")
        p.set_defaults(handler=handler)


# handlers ---------------------------------------------------------------------------------------


def _list(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        _usage("--limit must be at least 1")
    rows = asyncio.run(_fetch_list(settings, args))
    if not rows:
        print("no alerts match")
        return 0
    table = [
        [
            str(r["alert_id"]),
            r["priority"],
            r["pump_id"],
            r["rule"],
            r["phase"],
            _when(r["started_at"]),
            f"{r['acked_by']} {_when(r['acked_at'])}" if r["acked_by"] else "-",
            _when(r["ended_at"]) if r["ended_at"] else "open",
            r["summary"],
        ]
        for r in rows
    ]
    head = ["ID", "PRIORITY", "PUMP", "RULE", "PHASE", "STARTED", "ACKED", "ENDED", "SUMMARY"]
    for line in _table(head, table):
        print(line)
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    alert, history, outbox = asyncio.run(_fetch_one(settings, args.alert_id))
    fields = [
        ("alert", str(alert["alert_id"])),
        ("pump", f"{alert['pump_id']} (clinic {alert['clinic']})"),
        ("rule", alert["rule"]),
        ("priority", alert["priority"]),
        ("phase", alert["phase"]),
        ("summary", alert["summary"]),
        ("started", _when(alert["started_at"])),
        ("updated", _when(alert["updated_at"])),
        (
            "acked",
            f"{alert['acked_by']} at {_when(alert['acked_at'])}" if alert["acked_by"] else "no",
        ),
        (
            "escalated",
            f"unacknowledged, at {_when(alert['escalated_at'])}" if alert["escalated_at"] else "no",
        ),
        ("ended", _ended(alert)),
        ("details", _figures(alert["details"]) or "-"),
    ]
    for name, value in fields:
        print(f"{name + ':':<11}{value}")
    if outbox:
        told = ", ".join(f"{r['receiver']} {r['n_delivered']}/{r['n']} delivered" for r in outbox)
        print(f"{'notified:':<11}{told}")
    print()
    print("history:")
    rows = [
        [
            _when(h["at"]),
            h["phase"],
            h["priority"],
            h["actor"],
            h["note"] or "",
            _figures(h["details"]),
        ]
        for h in history
    ]
    for line in _table(["AT", "PHASE", "PRIORITY", "ACTOR", "NOTE", "DETAILS"], rows):
        print("  " + line)
    return 0


def _ack(args: argparse.Namespace, settings: Settings) -> int:
    alert = asyncio.run(_person(settings, book.acknowledge, args))
    print(
        f"alert {alert.alert_id} acknowledged by {alert.acked_by} at {_when(alert.acked_at)}; "
        "it stays open until its condition ends"
    )
    return 0


def _resolve(args: argparse.Namespace, settings: Settings) -> int:
    alert = asyncio.run(_person(settings, book.resolve, args))
    print(f"alert {alert.alert_id} resolved by {alert.resolved_by} at {_when(alert.ended_at)}")
    return 0


# database ---------------------------------------------------------------------------------------


async def _connect(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)


async def _fetch_list(settings: Settings, args: argparse.Namespace) -> list[asyncpg.Record]:
    where, params = [], []
    for cond, value in (
        ("ended_at IS NULL", True if args.open else None),
        ("priority = ${}", args.priority),
        ("pump_id = ${}", args.pump),
        ("rule = ${}", args.rule),
    ):
        if value is None:
            continue
        if "$" in cond:
            params.append(value)
            cond = cond.format(len(params))
        where.append(cond)
    params.append(args.limit)
    sql = f"""SELECT alert_id, priority, pump_id, rule, phase, started_at, acked_by, acked_at,
                     ended_at, summary
              FROM alerts {"WHERE " + " AND ".join(where) if where else ""}
              ORDER BY ended_at IS NOT NULL,
                       array_position(ARRAY['high', 'medium', 'low', 'info'], priority),
                       started_at DESC, alert_id DESC
              LIMIT ${len(params)}"""
    conn = await _connect(settings)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *params)
        return rows
    finally:
        await conn.close()


async def _fetch_one(
    settings: Settings, alert_id: int
) -> tuple[asyncpg.Record, list[asyncpg.Record], list[asyncpg.Record]]:
    conn = await _connect(settings)
    try:
        alert = await conn.fetchrow(
            "SELECT *, coalesce(clinic, 'unassigned') AS clinic FROM alerts WHERE alert_id = $1",
            alert_id,
        )
        if alert is None:
            _usage(f"no alert {alert_id}; `pumpfleet alerts list` shows the ids")
        history = await conn.fetch(
            "SELECT * FROM alert_history WHERE alert_id = $1 ORDER BY id", alert_id
        )
        outbox = await conn.fetch(
            """SELECT receiver, count(*) AS n, count(delivered_at) AS n_delivered
               FROM alert_outbox WHERE alert_id = $1 GROUP BY receiver ORDER BY receiver""",
            alert_id,
        )
        return alert, history, outbox
    finally:
        await conn.close()


async def _person(settings: Settings, action: Any, args: argparse.Namespace) -> book.Alert:
    by = args.by.strip()
    if not by:
        _usage("--by needs a name")
    conn = await _connect(settings)
    try:
        alert: book.Alert = await action(
            conn, args.alert_id, by, note=args.note, receivers=receivers(settings.alerts)
        )
        return alert
    except book.AlertError as exc:
        _usage(str(exc))
    finally:
        await conn.close()


# formatting -------------------------------------------------------------------------------------


def _usage(message: str) -> NoReturn:
    from pumpfleet.cli import UsageError

    raise UsageError(message)


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ended(alert: asyncpg.Record) -> str:
    if alert["ended_at"] is None:
        return "no (open)"
    how = f"resolved by {alert['resolved_by']}" if alert["resolved_by"] else "condition ended"
    return f"{_when(alert['ended_at'])} ({how})"


def _figures(details: Any) -> str:
    if isinstance(details, str):
        details = json.loads(details)
    return " ".join(f"{k}={v}" for k, v in (details or {}).items())


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    out = []
    for row in [head, *rows]:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
        out.append("  ".join(cells).rstrip())
    return out
