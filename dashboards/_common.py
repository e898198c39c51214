"""What every dashboard shares: the datasource references, query targets, a grid that places
panels, the template variables, and the step that turns grafanalib's objects into the JSON Grafana
reads today."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import grafanalib.core as g
from grafanalib._gen import DashboardEncoder

from pumpfleet.schema.panels import PROMQL, SQL

POSTGRES_UID = "pumpfleet-db"
PROMETHEUS_UID = "pumpfleet-prometheus"
POSTGRES: dict[str, str] = {"type": "grafana-postgresql-datasource", "uid": POSTGRES_UID}
"""The pumpfleet database, read as the read-only role (migration 0005_reader_role)."""
PROMETHEUS: dict[str, str] = {"type": "prometheus", "uid": PROMETHEUS_UID}
"""Prometheus scraping the ingesters' /metrics."""
MAX_DATA_POINTS = 500
"""Points a time series asks for: Grafana's $__interval is the range over this, rounded."""
SCHEMA_VERSION = 39
"""Grafana 11's dashboard schema; Grafana migrates older versions on load, and grafanalib's
default (12) would send these dashboards through every migration since Grafana 4."""

PRIORITY_COLORS = {"high": "red", "medium": "orange", "low": "yellow", "info": "blue"}
PUMP_DETAIL_UID = "pumpfleet-pump"

Json = dict[str, Any]


# Targets ----------------------------------------------------------------------------------------


def sql(name: str, ref: str = "A") -> Json:
    """A target running the named query of pumpfleet.schema.panels as written (raw SQL)."""
    query = SQL[name]
    return {
        "refId": ref,
        "datasource": POSTGRES,
        "editorMode": "code",
        "format": query.format,
        "rawQuery": True,
        "rawSql": query.sql,
    }


def prom(name: str, legend: str, ref: str = "A") -> Json:
    return {
        "refId": ref,
        "datasource": PROMETHEUS,
        "editorMode": "code",
        "expr": PROMQL[name],
        "legendFormat": legend,
        "range": True,
    }


# Layout -----------------------------------------------------------------------------------------


class Grid:
    """Places panels left to right on Grafana's 24-column grid, wrapping to a new row."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0

    def place(self, w: int, h: int) -> Any:
        if self.x + w > 24:
            self.newline()
        pos = g.GridPos(h=h, w=w, x=self.x, y=self.y)
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def newline(self) -> None:
        self.y += self.row_h
        self.x = 0
        self.row_h = 0


# Field options ----------------------------------------------------------------------------------


def steps(*pairs: tuple[float | None, str]) -> list[Json]:
    """Threshold steps, (value, colour); the first value is None (from minus infinity)."""
    return [{"color": color, "value": value} for value, color in pairs]


def by_name(name: str, dotted: Json | None = None, **properties: Any) -> Json:
    """A field override: `properties` by Grafana's property ids (unit, decimals, color...);
    `dotted` for ids with a dot, such as custom.cellOptions."""
    props = {**properties, **(dotted or {})}
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key, "value": value} for key, value in props.items()],
    }


def fixed_color(color: str) -> Json:
    return {"mode": "fixed", "fixedColor": color}


def alert_thresholds(color: str) -> Json:
    """Green at zero, `color` from one: a count that should be zero."""
    return {"mode": "absolute", "steps": steps((None, "green"), (1, color))}


def pump_link(column: str = "pump") -> Json:
    """The pump column opens the pump detail dashboard for that pump, same time range."""
    return {
        "matcher": {"id": "byName", "options": column},
        "properties": [
            {
                "id": "links",
                "value": [
                    {
                        "title": "Pump detail",
                        "url": f"/d/{PUMP_DETAIL_UID}/pump-detail?var-pump=${{__value.raw}}"
                        "&${__url_time_range}",
                    }
                ],
            }
        ],
    }


# Panels -----------------------------------------------------------------------------------------


def stat(
    grid: Grid,
    title: str,
    description: str,
    targets: Sequence[Json],
    *,
    w: int,
    h: int = 4,
    unit: str = "none",
    decimals: int | None = 0,
    thresholds: Json | None = None,
    overrides: Iterable[Json] = (),
    text_fields: bool = False,
    datasource: Json = POSTGRES,
) -> Any:
    """One value per field (one-row queries): the latest, on a coloured background."""
    return g.Stat(
        title=title,
        description=description,
        dataSource=datasource,
        targets=list(targets),
        gridPos=grid.place(w, h),
        format=unit,
        decimals=decimals,
        reduceCalc="lastNotNull",
        graphMode="none",
        colorMode="background" if thresholds or overrides else "value",
        textMode="value_and_name",
        noValue="0" if not text_fields else "-",
        overrides=list(overrides),
        fields="/.*/" if text_fields else "",
        thresholds=(thresholds or {"mode": "absolute", "steps": steps((None, "text"))})["steps"],
    )


def table(
    grid: Grid,
    title: str,
    description: str,
    query: str,
    *,
    w: int,
    h: int = 8,
    overrides: Iterable[Json] = (),
    links_pump: bool = True,
) -> Any:
    over = list(overrides)
    if links_pump:
        over.append(pump_link())
    return g.Table(
        title=title,
        description=description,
        dataSource=POSTGRES,
        targets=[sql(query)],
        gridPos=grid.place(w, h),
        overrides=over,
        filterable=True,
        thresholds=steps((None, "text")),
    )


def timeseries(
    grid: Grid,
    title: str,
    description: str,
    targets: Sequence[Json],
    *,
    w: int,
    h: int = 8,
    unit: str = "none",
    overrides: Iterable[Json] = (),
    bars: bool = False,
    stacked: bool = False,
    datasource: Json = POSTGRES,
) -> Any:
    return g.TimeSeries(
        title=title,
        description=description,
        dataSource=datasource,
        targets=list(targets),
        gridPos=grid.place(w, h),
        unit=unit,
        drawStyle="bars" if bars else "line",
        fillOpacity=60 if bars else 10,
        showPoints="never",
        lineWidth=1 if bars else 2,
        stacking={"mode": "normal", "group": "A"} if stacked else {"mode": "none"},
        legendDisplayMode="list",
        legendCalcs=["lastNotNull"] if not bars else [],
        tooltipMode="multi",
        overrides=list(overrides),
        thresholds=steps((None, "green")),
        maxDataPoints=MAX_DATA_POINTS,
    )


def text(grid: Grid, title: str, content: str, *, w: int, h: int = 4) -> Any:
    return g.Text(title=title, content=content, mode="markdown", gridPos=grid.place(w, h))


# Template variables -----------------------------------------------------------------------------

_ALL: Json = {"selected": True, "text": ["All"], "value": ["$__all"]}


def clinic_variable() -> Json:
    """Clinics, all selected by default; queries filter with `clinic IN ($clinic)`."""
    var = g.Template(
        name="clinic",
        label="Clinic",
        query=SQL["var.clinic"].sql,
        dataSource=POSTGRES,
        type="query",
        multi=True,
        includeAll=True,
        refresh=g.REFRESH_ON_DASHBOARD_LOAD,
        sort=g.SORT_ALPHA_ASC,
    ).to_json_data()
    var["current"] = _ALL
    return dict(var)


def pump_variable() -> Json:
    """One pump of the selected clinics; queries use `${pump:sqlstring}`."""
    var = g.Template(
        name="pump",
        label="Pump",
        query=SQL["var.pump"].sql,
        dataSource=POSTGRES,
        type="query",
        refresh=g.REFRESH_ON_DASHBOARD_LOAD,
        sort=g.SORT_ALPHA_ASC,
    ).to_json_data()
    var.pop("current")  # Grafana selects the first pump
    return dict(var)


def priority_variable() -> Json:
    var = g.Template(
        name="priority",
        label="Priority",
        query=",".join(PRIORITY_COLORS),
        type="custom",
        multi=True,
        includeAll=True,
    ).to_json_data()
    var["current"] = _ALL
    for option in var["options"]:
        option["selected"] = False
    return dict(var)


def annotation(name: str, query: str, color: str) -> Json:
    """Annotations drawn from SQL: columns time, text and tags (comma-separated)."""
    target = sql(query, ref="Anno")
    target.pop("datasource")
    return {
        "name": name,
        "datasource": POSTGRES,
        "enable": True,
        "iconColor": color,
        "target": target,
    }


# The dashboard ----------------------------------------------------------------------------------

# Keys grafanalib still writes that Grafana's dashboard schema no longer has (Grafana ignores
# them; dropping them keeps the files to what Grafana's own models hold).
_LEGACY_DASHBOARD = {"__inputs", "hideControls", "rows", "sharedCrosshair", "style"}
_LEGACY_PANEL = {"editable", "error", "height", "span", "minSpan", "color", "columns", "fontSize"}
_LEGACY_VARIABLE = {"useTags", "tagsQuery", "tagValuesQuery"}


def _drop_nulls(value: Any) -> Any:
    """grafanalib writes every unset option as null; Grafana's schema says absent. A threshold
    step's `value: null` (minus infinity) is meaningful and stays."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None or k == "value"}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _panel(panel: Json) -> Json:
    out = {k: v for k, v in panel.items() if k not in _LEGACY_PANEL}
    if out.get("type") == "table":
        out.pop("mappings", None)  # table v7's top-level mappings; fieldConfig has them now
        out["fieldConfig"]["defaults"]["mappings"] = []
    if out.get("type") == "text":
        out.pop("targets", None)
        out.pop("datasource", None)
        out.pop("fieldConfig", None)
    if not out.get("repeat"):
        out.pop("repeatDirection", None)
        out.pop("maxPerRow", None)
    return out


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: Sequence[Any],
    *,
    variables: Sequence[Json] = (),
    annotations: Sequence[Json] = (),
    time_from: str = "now-24h",
) -> Json:
    """The dashboard's JSON, as the provisioned file holds it."""
    board = g.Dashboard(
        title=title,
        uid=uid,
        description=description,
        tags=["pumpfleet"],
        timezone="browser",
        refresh="1m",
        time=g.Time(time_from, "now"),
        graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        schemaVersion=SCHEMA_VERSION,
        panels=list(panels),
        templating=g.Templating(list=list(variables)),
        annotations=g.Annotations(list=list(annotations)),
        links=[
            g.DashboardLink(
                title="pumpfleet",
                type="dashboards",
                tags=["pumpfleet"],
                asDropdown=True,
                keepTime=True,
                includeVars=False,
            )
        ],
        editable=True,
    ).auto_panel_ids()
    data = _drop_nulls(json.loads(json.dumps(board.to_json_data(), cls=DashboardEncoder)))
    for key in _LEGACY_DASHBOARD:
        data.pop(key, None)
    data["panels"] = [_panel(p) for p in data["panels"]]
    for var in data["templating"]["list"]:
        for key in _LEGACY_VARIABLE:
            var.pop(key, None)
    data["timepicker"].pop("time_options", None)  # gone since Grafana 8's time picker
    data["fiscalYearStartMonth"] = 0
    data["liveNow"] = False
    data["weekStart"] = ""
    return dict(data)
