"""The demo's live view while the fleet runs: messages per second (the ingester's own counter),
pumps online, open alerts by priority with the newest ones, dead letters and quarantine.

A rich `Live` panel refreshed twice a second on a terminal; elsewhere (CI, a pipe) one plain
line every few seconds. The open-alert and quarantine counts are the dashboards' own queries
(`pumpfleet.schema.panels`), so the view and Grafana agree.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pumpfleet.schema.panels import SQL, expand

REFRESH_S = 0.5
PLAIN_EVERY_S = 5.0
NEWEST = 6
STYLE = {"high": "bold red", "medium": "dark_orange", "low": "yellow", "info": "grey50"}
_RECEIVED = re.compile(r"^pumpfleet_ingest_messages_received_total(?:\{[^}]*\})? (\S+)$", re.M)


@dataclass
class Snapshot:
    received_total: float | None = None
    msg_per_s: float | None = None
    fleet_time: datetime | None = None
    pumps_online: int = 0
    pumps_reporting: int = 0
    open_by_priority: dict[str, int] = field(default_factory=dict)
    newest: list[asyncpg.Record] = field(default_factory=list)
    dead_letters: int = 0
    quarantined: int = 0


def received_total(metrics_text: str) -> float | None:
    """`pumpfleet_ingest_messages_received_total` from a /metrics page (summed over labels)."""
    values = [float(v) for v in _RECEIVED.findall(metrics_text)]
    return sum(values) if values else None


class Watcher:
    """Reads one snapshot at a time; keeps the counter history for the rate."""

    def __init__(self, conn: asyncpg.Connection, metrics_url: str) -> None:
        self.conn = conn
        self.metrics_url = metrics_url
        self._samples: list[tuple[float, float]] = []  # (monotonic, received_total)
        self._http = httpx.AsyncClient(timeout=2.0)

    async def close(self) -> None:
        await self._http.aclose()

    async def _received(self) -> float | None:
        try:
            resp = await self._http.get(self.metrics_url)
        except httpx.HTTPError:
            return None
        return received_total(resp.text)

    def _rate(self, now: float, total: float) -> float | None:
        self._samples.append((now, total))
        self._samples = [s for s in self._samples if now - s[0] <= 2.0]  # a 2 s window
        t0, v0 = self._samples[0]
        return (total - v0) / (now - t0) if now - t0 >= 0.4 else None

    async def snapshot(self) -> Snapshot:
        s = Snapshot()
        total = await self._received()
        if total is not None:
            s.received_total = total
            s.msg_per_s = self._rate(time.monotonic(), total)
        conn = self.conn
        to = datetime.now(UTC)
        clinics = sorted({r[0] for r in await conn.fetch(SQL["var.clinic"].sql)} | {"unassigned"})
        row = await conn.fetchrow(
            expand(SQL["fleet.open_alerts"].sql, to - timedelta(days=30), to, {"clinic": clinics})
        )
        if row is not None:
            s.open_by_priority = {
                "high": row["high"],
                "medium": row["medium"],
                "low": row["low"],
                "info": row["standing notices"],
            }
        row = await conn.fetchrow(
            expand(SQL["pipeline.quarantine"].sql, to - timedelta(days=1), to)
        )
        if row is not None:
            s.quarantined = row["quarantined"]
            s.dead_letters = row["dead letters held"]
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM pump_status WHERE online) AS online,"
            " (SELECT count(DISTINCT pump_id) FROM telemetry"
            "  WHERE received_at > now() - interval '10 seconds') AS reporting,"
            " (SELECT max(time) FROM telemetry) AS fleet_time"
        )
        if row is not None:
            s.pumps_online, s.pumps_reporting = row["online"], row["reporting"]
            s.fleet_time = row["fleet_time"]
        s.newest = await conn.fetch(
            "SELECT started_at, priority, pump_id, rule, summary FROM alerts"
            " WHERE ended_at IS NULL AND priority <> 'info' ORDER BY alert_id DESC LIMIT $1",
            NEWEST,
        )
        return s


def render(s: Snapshot, title: str, elapsed_s: float) -> Panel:
    head = Table.grid(padding=(0, 3))
    for _ in range(4):
        head.add_column()
    rate = f"{s.msg_per_s:,.0f}" if s.msg_per_s is not None else "-"
    fleet = f"{s.fleet_time:%Y-%m-%d %H:%M}Z" if s.fleet_time else "-"
    head.add_row(
        Text.assemble(("messages/s ", "bold"), rate),
        Text.assemble(("received ", "bold"), f"{s.received_total or 0:,.0f}"),
        Text.assemble(("pumps online ", "bold"), f"{s.pumps_online}"),
        Text.assemble(("reporting (10 s) ", "bold"), f"{s.pumps_reporting}"),
    )
    head.add_row(
        Text.assemble(("fleet clock ", "bold"), fleet),
        Text.assemble(("dead letters ", "bold"), f"{s.dead_letters}"),
        Text.assemble(("quarantined ", "bold"), f"{s.quarantined}"),
        Text.assemble(("wall ", "bold"), f"{elapsed_s:.0f} s"),
    )
    counts = Text("open alerts  ")
    for priority in ("high", "medium", "low", "info"):
        label = "standing notices" if priority == "info" else priority
        counts.append(f"{s.open_by_priority.get(priority, 0)} {label}", STYLE[priority])
        counts.append("   ")
    newest = Table(box=None, show_header=False, padding=(0, 1), expand=True)
    newest.add_column(no_wrap=True)
    newest.add_column(no_wrap=True)
    newest.add_column(no_wrap=True)
    newest.add_column(no_wrap=True)
    newest.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
    for a in s.newest:
        newest.add_row(
            f"{a['started_at']:%m-%d %H:%M}",
            Text(a["priority"], STYLE.get(a["priority"], "")),
            a["pump_id"],
            a["rule"],
            Text(a["summary"]),
        )
    return Panel(Group(head, Text(""), counts, newest), title=title, title_align="left")


def plain(s: Snapshot, elapsed_s: float) -> str:
    rate = f"{s.msg_per_s:,.0f}" if s.msg_per_s is not None else "-"
    fleet = f"{s.fleet_time:%Y-%m-%d %H:%M}Z" if s.fleet_time else "-"
    o = s.open_by_priority
    return (
        f"   {elapsed_s:5.0f} s  fleet {fleet}  {rate} msg/s  {s.pumps_online} pumps online  "
        f"open alerts {o.get('high', 0)} high {o.get('medium', 0)} medium {o.get('low', 0)} low "
        f"{o.get('info', 0)} notices  dead letters {s.dead_letters} (quarantined {s.quarantined})"
    )


async def watch(
    dsn: str, metrics_url: str, done: Callable[[], bool], title: str, console: Console
) -> Snapshot:
    """Show the view until `done()`; returns the last snapshot."""
    conn = await asyncpg.connect(dsn)
    watcher = Watcher(conn, metrics_url)
    started = time.monotonic()
    last_plain = 0.0
    snap = Snapshot()
    try:
        if console.is_terminal:
            with Live(render(snap, title, 0), console=console, auto_refresh=False) as live:
                while not done():
                    snap = await watcher.snapshot()
                    live.update(render(snap, title, time.monotonic() - started), refresh=True)
                    await asyncio.sleep(REFRESH_S)
        else:
            while not done():
                snap = await watcher.snapshot()
                elapsed = time.monotonic() - started
                if elapsed - last_plain >= PLAIN_EVERY_S:
                    print(plain(snap, elapsed), flush=True)
                    last_plain = elapsed
                await asyncio.sleep(REFRESH_S)
        return await watcher.snapshot()
    finally:
        await watcher.close()
        await conn.close()
