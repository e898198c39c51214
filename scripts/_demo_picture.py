"""The demo's picture of the fleet: the alert timeline and, for every pump that alerted, its
reservoir against the programmed projection with the alert's start, acknowledgement and end.

Drawn from the dashboards' own SQL (`pumpfleet.schema.panels`: `alerts.history` and
`pump.reservoir`, expanded as Grafana expands them), so the PNG shows what the alerts and pump
detail dashboards show for the same range. `draw()` returns what it plotted, so a test can hold
it against the database.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg
import matplotlib

matplotlib.use("Agg")  # no display: a file, in CI as on a laptop

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pumpfleet.schema.panels import RAW_MAX, SQL, expand

PRIORITIES = ("high", "medium", "low", "info")
COLOURS = {"high": "#d62728", "medium": "#ff7f0e", "low": "#e6c229", "info": "#9e9e9e"}
MAX_PUMP_PANELS = 28
"""More pumps than this that alerted: the first ones by pump id get a reservoir panel."""
COLUMNS = 4


@dataclass(frozen=True)
class Transition:
    """One row of `alerts.history`: an alert started, escalated, was acknowledged, ended."""

    time: datetime
    alert_id: int
    pump_id: str
    rule: str
    phase: str
    priority: str
    actor: str


@dataclass(frozen=True)
class Reading:
    """One row of `pump.reservoir`."""

    time: datetime
    reservoir_ml: float
    projection_ml: float | None


@dataclass
class Picture:
    """What `draw` plotted, with where."""

    path: Path
    time_from: datetime
    time_to: datetime
    history: list[Transition] = field(default_factory=list)
    """Every transition in the range, oldest first (the timeline draws those not `info`)."""
    reservoir: dict[str, list[Reading]] = field(default_factory=dict)
    """Per pump with a reservoir panel, its readings, oldest first."""
    alerted: list[str] = field(default_factory=list)
    """Pumps with an alert above `info` in the range, by pump id."""


async def _clinics(conn: asyncpg.Connection, time_from: datetime, time_to: datetime) -> list[str]:
    rows = await conn.fetch(expand(SQL["var.clinic"].sql, time_from, time_to))
    # An alert on a pump with no registry row (a quarantined one) counts as 'unassigned'.
    return sorted({r[0] for r in rows} | {"unassigned"})


async def fetch(
    dsn: str, time_from: datetime, time_to: datetime
) -> tuple[list[Transition], dict[str, list[Reading]], list[str]]:
    """The history of the range, the pumps that alerted and their reservoir series."""
    conn = await asyncpg.connect(dsn)
    try:
        variables: dict[str, str | Sequence[str]] = {
            "clinic": await _clinics(conn, time_from, time_to),
            "priority": list(PRIORITIES),
        }
        sql = expand(SQL["alerts.history"].sql, time_from, time_to, variables)
        history = [
            Transition(
                r["time"], r["alert"], r["pump"], r["rule"], r["phase"], r["priority"], r["actor"]
            )
            for r in reversed(await conn.fetch(sql))  # the panel lists the newest first
        ]
        alerted = sorted({t.pump_id for t in history if t.priority != "info"})
        # The pump detail panel reads raw telemetry for up to RAW_MAX; beyond, hourly buckets.
        reservoir_from = max(time_from, time_to - RAW_MAX)
        reservoir: dict[str, list[Reading]] = {}
        for pump in alerted[:MAX_PUMP_PANELS]:
            sql = expand(
                SQL["pump.reservoir"].sql, reservoir_from, time_to, {**variables, "pump": pump}
            )
            rows = await conn.fetch(sql)
            if rows:  # a quarantined pump has no readings to draw
                reservoir[pump] = [
                    Reading(r["time"], r["reservoir"], r["programmed projection"]) for r in rows
                ]
        return history, reservoir, alerted
    finally:
        await conn.close()


async def draw(dsn: str, out: Path, time_from: datetime, time_to: datetime) -> Picture:
    """Write the picture of [time_from, time_to] to `out` (PNG) and return what it plotted."""
    history, reservoir, alerted = await fetch(dsn, time_from, time_to)
    picture = Picture(Path(out), time_from, time_to, history, reservoir, alerted)
    _render(picture)
    return picture


def _segments(
    history: list[Transition], time_to: datetime
) -> dict[int, list[tuple[datetime, datetime, str]]]:
    """Per alert, its (from, to, priority) spans: a new span at each change of priority."""
    spans: dict[int, list[tuple[datetime, datetime, str]]] = {}
    current: dict[int, tuple[datetime, str]] = {}
    for t in history:
        if t.phase == "ack":
            continue
        if t.alert_id in current:
            since, priority = current.pop(t.alert_id)
            spans.setdefault(t.alert_id, []).append((since, t.time, priority))
        if t.phase != "end":
            current[t.alert_id] = (t.time, t.priority)
    for alert_id, (since, priority) in current.items():
        spans.setdefault(alert_id, []).append((since, time_to, priority))
    return spans


def _x(when: datetime) -> float:
    """A time as matplotlib's date number (its axes take datetimes, its type stubs do not)."""
    return float(mdates.date2num(when))


def _render(p: Picture) -> None:
    shown = [t for t in p.history if t.priority != "info"]
    alerts: dict[int, Transition] = {}
    for t in shown:
        alerts.setdefault(t.alert_id, t)
    order = sorted(alerts.values(), key=lambda t: (t.time, t.alert_id))
    rows = {a.alert_id: i for i, a in enumerate(order)}
    notices = len({t.alert_id for t in p.history if t.priority == "info"})
    pumps = list(p.reservoir)
    grid_rows = -(-len(pumps) // COLUMNS)
    timeline_h = max(2.5, 0.24 * len(order) + 1.2)
    fig = plt.figure(figsize=(18, timeline_h + 2.6 * grid_rows + 0.6), layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[timeline_h, max(2.6 * grid_rows, 0.01)])
    ax = fig.add_subplot(outer[0])
    spans = _segments(shown, p.time_to)
    for alert_id, row in rows.items():
        for start, end, priority in spans.get(alert_id, []):
            ax.barh(row, _x(end) - _x(start), left=_x(start), height=0.6, color=COLOURS[priority])
    acks = [t for t in shown if t.phase == "ack"]
    ax.scatter(
        [_x(t.time) for t in acks], [rows[t.alert_id] for t in acks], marker="D", color="k", s=24
    )
    ax.set_yticks(range(len(order)), [f"{a.pump_id} {a.rule}" for a in order], fontsize=7)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(_x(p.time_from), _x(p.time_to))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(
        f"Alerts {p.time_from:%Y-%m-%d %H:%M} to {p.time_to:%Y-%m-%d %H:%M} UTC (device time): "
        f"{len(order)} above info; {notices} standing notices (info) not drawn"
    )
    ax.legend(
        handles=[Patch(color=COLOURS[k], label=k) for k in PRIORITIES[:3]]
        + [Line2D([], [], marker="D", color="black", ls="", label="acknowledged")],
        loc="lower right",
        fontsize=8,
    )
    if pumps:
        grid = outer[1].subgridspec(grid_rows, COLUMNS)
        for i, pump in enumerate(pumps):
            sub = fig.add_subplot(grid[i // COLUMNS, i % COLUMNS])
            _reservoir_panel(sub, p, pump)
            if i == 0:
                sub.legend(fontsize=6, loc="lower left")
    notes = []
    if no_readings := [x for x in p.alerted[:MAX_PUMP_PANELS] if x not in p.reservoir]:
        notes.append(f"no readings (quarantined or never reported): {', '.join(no_readings)}")
    if past := p.alerted[MAX_PUMP_PANELS:]:
        notes.append(f"{len(past)} more pumps alerted: {', '.join(past)}")
    if notes:
        fig.suptitle("; ".join(notes), fontsize=9)
    fig.savefig(p.path, dpi=80)
    plt.close(fig)


def _reservoir_panel(ax: plt.Axes, p: Picture, pump: str) -> None:
    readings = p.reservoir[pump]
    times = [_x(r.time) for r in readings]
    ax.plot(times, [r.reservoir_ml for r in readings], lw=1.4, label="reservoir")
    ax.plot(
        times,
        [math.nan if r.projection_ml is None else r.projection_ml for r in readings],
        lw=1,
        ls="--",
        color="grey",
        label="programmed projection",
    )
    for t in p.history:
        if t.pump_id != pump or t.priority == "info" or t.phase == "continue":
            continue
        if t.phase == "ack":
            ax.axvline(_x(t.time), color="black", lw=1, ls=":")
        elif t.phase == "end":
            ax.axvline(_x(t.time), color=COLOURS[t.priority], lw=1, ls="--")
        else:  # start, escalate, de-escalate
            ax.axvline(_x(t.time), color=COLOURS[t.priority], lw=1.6)
    rules = sorted({t.rule for t in p.history if t.pump_id == pump and t.priority != "info"})
    ax.set_title(f"{pump}: {', '.join(rules)}", fontsize=8)
    ax.set_ylabel("mL", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%d %H:%M"))
    ax.set_xlim(_x(p.time_from), _x(p.time_to))
