"""`pumpfleet alerts list|show|ack|resolve`: the on-call person's view of the alert book."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import typer
from rich.padding import Padding
from rich.table import Table

from ingest.alerts import _book as book
from ingest.alerts._notify import receivers
from pumpfleet import cli
from pumpfleet.findings import Priority
from pumpfleet.settings import Settings

app = typer.Typer(
    name="alerts",
    help=__doc__,
    short_help="list, show, acknowledge and resolve alerts",
    no_args_is_help=True,
)

AlertId = Annotated[int, typer.Argument()]
By = Annotated[str, typer.Option(help="who (name or on-call id)")]
Note = Annotated[str | None, typer.Option(help="free text for the history")]


# commands ---------------------------------------------------------------------------------------


@app.command(
    "list",
    help="Alerts, open ones first, then by priority (high first), newest first.",
    short_help="alerts, most urgent first",
)
def _list(
    ctx: typer.Context,
    open_: Annotated[bool, typer.Option("--open", help="only alerts that have not ended")] = False,
    priority: Annotated[Priority | None, typer.Option(help="only this priority")] = None,
    pump: Annotated[str | None, typer.Option(help="only this pump id")] = None,
    rule: Annotated[str | None, typer.Option(help="only this rule, e.g. low_reservoir")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 50,
) -> None:
    if limit < 1:
        raise cli.UsageError("--limit must be at least 1")
    filters = {"priority": priority, "pump_id": pump, "rule": rule}
    rows = asyncio.run(_fetch_list(cli.settings(ctx), open_, filters, limit))
    if not rows:
        print("no alerts match")
        return
    table = _table(
        "ID", "PRIORITY", "PUMP", "RULE", "PHASE", "STARTED", "ACKED", "ENDED", "SUMMARY"
    )
    for r in rows:
        table.add_row(
            str(r["alert_id"]),
            r["priority"],
            r["pump_id"],
            r["rule"],
            r["phase"],
            _when(r["started_at"]),
            f"{r['acked_by']} {_when(r['acked_at'])}" if r["acked_by"] else "-",
            _when(r["ended_at"]) if r["ended_at"] else "open",
            r["summary"],
        )
    cli.console().print(table)


@app.command("show", help="one alert with its history")
def _show(ctx: typer.Context, alert_id: AlertId) -> None:
    alert, history, outbox = asyncio.run(_fetch_one(cli.settings(ctx), alert_id))
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
    table = _table("AT", "PHASE", "PRIORITY", "ACTOR", "NOTE", "DETAILS")
    for h in history:
        table.add_row(
            _when(h["at"]),
            h["phase"],
            h["priority"],
            h["actor"],
            h["note"] or "",
            _figures(h["details"]),
        )
    cli.console().print(Padding(table, (0, 0, 0, 2), expand=False))


@app.command("ack", help="acknowledge an open alert (it stays open until its condition ends)")
def _ack(ctx: typer.Context, alert_id: AlertId, by: By, note: Note = None) -> None:
    alert = asyncio.run(_person(cli.settings(ctx), book.acknowledge, alert_id, by, note))
    print(
        f"alert {alert.alert_id} acknowledged by {alert.acked_by} at {_when(alert.acked_at)}; "
        "it stays open until its condition ends"
    )


@app.command("resolve", help="end an open alert by hand")
def _resolve(ctx: typer.Context, alert_id: AlertId, by: By, note: Note = None) -> None:
    alert = asyncio.run(_person(cli.settings(ctx), book.resolve, alert_id, by, note))
    print(f"alert {alert.alert_id} resolved by {alert.resolved_by} at {_when(alert.ended_at)}")


# database ---------------------------------------------------------------------------------------


async def _connect(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)


async def _fetch_list(
    settings: Settings, open_only: bool, filters: dict[str, str | None], limit: int
) -> list[asyncpg.Record]:
    """`filters`: column = value for each value given (the column names are this module's)."""
    where = ["ended_at IS NULL"] if open_only else []
    params: list[Any] = []
    for column, value in filters.items():
        if value is not None:
            params.append(value)
            where.append(f"{column} = ${len(params)}")
    params.append(limit)
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
            raise cli.UsageError(f"no alert {alert_id}; `pumpfleet alerts list` shows the ids")
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


async def _person(
    settings: Settings, action: Callable[..., Any], alert_id: int, by: str, note: str | None
) -> book.Alert:
    by = by.strip()
    if not by:
        raise cli.UsageError("--by needs a name")
    conn = await _connect(settings)
    try:
        alert: book.Alert = await action(
            conn, alert_id, by, note=note, receivers=receivers(settings.alerts)
        )
        return alert
    except book.AlertError as exc:
        raise cli.UsageError(str(exc)) from None
    finally:
        await conn.close()


# formatting -------------------------------------------------------------------------------------


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


def _table(*head: str) -> Table:
    """Columns two spaces apart, left-aligned under their headers; only the last one wraps (on a
    narrow terminal)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in head:
        table.add_column(name, no_wrap=name != head[-1])
    return table
