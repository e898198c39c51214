"""The dashboards without a Grafana server.

- Every panel's query (and every annotation and variable query) is expanded as Grafana would
  expand it (macros, variables, a time range) and run, as the read-only role Grafana uses, on a
  database the simulator's `faults` scenario filled through the real broker, ingester and alert
  rules; each result has the columns its panel type needs and figures that make sense (the
  stalled pump shows as stalled, the nearly empty one is first in the closest-to-empty list, a
  measured pump that over-infuses falls below its programmed projection).
- The generated JSON parses with Grafana's own dashboard models (grafana-foundation-sdk) and
  keeps every key through them; uids, datasource references and panel types agree with the
  provisioning files; the committed files equal what `pumpfleet dashboards build` writes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from grafana_foundation_sdk.cog import plugins as sdk_plugins
from grafana_foundation_sdk.cog import runtime as sdk_runtime
from grafana_foundation_sdk.cog.encoder import JSONEncoder as SdkEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard as SdkDashboard

import dashboards
from device_agent import BrokerOptions
from ingest.alerts import acknowledge, resolve
from pumpfleet import contract, schema
from pumpfleet import stack as stack_mod
from pumpfleet.cli import command
from pumpfleet.cli import main as cli_main
from pumpfleet.schema.panels import PROMQL, SQL, ExpandError, expand, interval_for
from pumpfleet.testing import wait_until
from sim_fleet import RunOptions, SimRun, build_run, load_scenario, register_pumps, run_scenario

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "deploy" / "grafana"
READER = "pumpfleet_reader"


# The generated files, parsed --------------------------------------------------------------------


@functools.cache
def _files() -> dict[str, str]:
    return dashboards.render()


def _boards() -> dict[str, dict[str, Any]]:
    files = _files()
    return {b.uid: json.loads(files[b.path]) for b in dashboards.BOARDS}


def _panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Use:
    """One query as a dashboard uses it."""

    board: str
    where: str  # panel title, "annotation NAME" or "variable NAME"
    kind: str  # the panel type, "annotation" or "variable"
    name: str  # its name in pumpfleet.schema.panels.SQL
    format: str
    max_data_points: int = 1000


_BY_TEXT = {q.sql: name for name, q in SQL.items()}


@functools.cache
def _uses() -> list[Use]:
    out = []
    for uid, board in _boards().items():
        for panel in _panels(board):
            for target in panel.get("targets", []):
                if "rawSql" in target:
                    name = _BY_TEXT[target["rawSql"]]
                    out.append(
                        Use(
                            uid,
                            panel["title"],
                            panel["type"],
                            name,
                            target["format"],
                            panel.get("maxDataPoints", 1000),
                        )
                    )
        for ann in board["annotations"]["list"]:
            name = _BY_TEXT[ann["target"]["rawSql"]]
            out.append(Use(uid, f"annotation {ann['name']}", "annotation", name, "table"))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                name = _BY_TEXT[var["query"]]
                out.append(Use(uid, f"variable {var['name']}", "variable", name, "table"))
    return out


# A database filled by the faults scenario -------------------------------------------------------


@dataclass
class Fleet:
    dsn: str
    run: SimRun
    metrics: str
    """The ingester's /metrics text at the end."""
    clinics: list[str]
    acked_alert: int
    resolved_alert: int

    @property
    def start(self) -> datetime:
        return self.run.start

    @property
    def end(self) -> datetime:
        return self.run.end


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def _scrape(port: int) -> str:
    return _get(port, "/metrics")


def _has_command(name: str) -> bool:
    return name in command().commands


def _bad_messages() -> list[tuple[str, bytes]]:
    spoofed = contract.MotorStall(
        v=2, pump_id="P-000005", time=datetime.now(UTC), seq=1, event="motor_stall"
    )
    unprovisioned = contract.Status(
        v=2, pump_id="P-009999", time=datetime.now(UTC), seq=0, online=True
    )
    return [
        # Not JSON at all.
        ("pumps/P-000003/telemetry", b"{not json"),
        # A valid event naming another pump than its topic: spoofing, quarantined.
        ("pumps/P-000004/event", contract.encode(spoofed)),
        # A pump the clinic never provisioned: quarantined.
        ("pumps/P-009999/status", contract.encode(unprovisioned)),
    ]


def _publish_bad(mqtt_url: str) -> None:
    options = BrokerOptions.from_url(mqtt_url)
    client = options.paho_client(f"dash-bad-{uuid.uuid4().hex[:8]}")
    client.connect(options.host, options.port)
    client.loop_start()
    try:
        for info in [client.publish(t, p, qos=1) for t, p in _bad_messages()]:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def _fill(info: stack_mod.StackInfo, tmp: Path) -> Fleet:
    dsn = info.database_url
    await schema.migrate(dsn)
    scenario = load_scenario("faults").model_copy(update={"speed": "max"})
    run = build_run(scenario)
    assert await register_pumps(dsn, run) > 0
    port = stack_mod.free_port()
    env = {
        **os.environ,
        **info.to_env(),
        "PUMPFLEET_DATABASE_URL": dsn,
        "PUMPFLEET_INGEST__CLIENT_ID": f"dash-{uuid.uuid4().hex[:8]}",
        "PUMPFLEET_INGEST__METRICS_PORT": str(port),
        "PUMPFLEET_ALERTS__CLOCK": "fleet",
        "PUMPFLEET_ALERTS__TICK_S": "0.1",
        # Nothing listens there: notifications stay in the outbox, retried, with their error.
        "PUMPFLEET_ALERTS__ALERTMANAGER_URL": f"http://127.0.0.1:{stack_mod.free_port()}",
        "PUMPFLEET_ALERTS__RETRY_MIN_S": "0.2",
    }
    # Alerting runs as its own service where the CLI has one, else inside the ingester.
    commands = ["ingest", *(["alerting"] if _has_command("alerting") else [])]
    alerting_port = stack_mod.free_port()
    if "alerting" in commands:
        env["PUMPFLEET_ALERTS__METRICS_PORT"] = str(alerting_port)
    log = tmp / "pipeline.log"
    with log.open("ab") as out:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "pumpfleet.cli", command],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            for command in commands
        ]
    try:
        wait_until(lambda: "pumpfleet_ingest_up 1.0" in _scrape(port), 30, f"ingester ({log})")
        if "alerting" in commands:
            wait_until(
                lambda: '"active"' in _get(alerting_port, "/healthz"),
                30,
                f"the active alerting instance ({log})",
            )
        _publish_bad(info.mqtt_url_for("fleet"))
        stats = await asyncio.to_thread(
            run_scenario, run, BrokerOptions.from_url(info.mqtt_url_for("fleet")), RunOptions()
        )
        assert stats.acked == stats.published, stats
        expected = stats.published + len(_bad_messages())
        wait_until(
            lambda: _metric(_scrape(port), "pumpfleet_ingest_messages_received_total") >= expected,
            60,
            f"the ingester to commit {expected} messages ({log})",
        )
        conn = await asyncpg.connect(dsn)
        try:
            # The rules have seen every stored message (the alerting service's feed is empty,
            # where there is one), and the notifier has tried to deliver.
            feed = await conn.fetchval("SELECT to_regclass('alert_feed') IS NOT NULL")

            async def settled() -> bool:
                if feed and await conn.fetchval("SELECT EXISTS (SELECT 1 FROM alert_feed)"):
                    return False
                return bool(
                    await conn.fetchval("SELECT count(*) FROM alert_outbox WHERE attempts > 0")
                )

            deadline = time.monotonic() + 30
            while not await settled():
                assert time.monotonic() < deadline, f"alerting did not settle ({log})"
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        metrics = _scrape(port)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    conn = await asyncpg.connect(dsn)
    try:
        # An on-call person acknowledged the stall 7 minutes in, and ended another by hand.
        stall = await conn.fetchval(
            "SELECT alert_id FROM alerts WHERE pump_id = 'P-000001' "
            "AND rule = 'critical_pump_alarm' AND ended_at IS NULL"
        )
        started = await conn.fetchval("SELECT started_at FROM alerts WHERE alert_id = $1", stall)
        await acknowledge(
            conn, stall, "dr.oncall", note="on my way", now=started + timedelta(minutes=7)
        )
        other = await conn.fetchval(
            "SELECT alert_id FROM alerts WHERE pump_id = 'P-000011' "
            "AND rule = 'noncritical_pump_alarm' AND ended_at IS NULL"
        )
        started = await conn.fetchval("SELECT started_at FROM alerts WHERE alert_id = $1", other)
        await resolve(conn, other, "dr.oncall", note="seen", now=started + timedelta(minutes=30))
        clinics = [r[0] for r in await conn.fetch(SQL["var.clinic"].sql)]
    finally:
        await conn.close()
    return Fleet(dsn, run, metrics, clinics, stall, other)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Its own broker and database: the session broker keeps other tests' retained statuses,
    which the ingester would register as pumps of this fleet."""
    tmp = tmp_path_factory.mktemp("dashboards")
    with stack_mod.running_stack(tmp / "stack", purge=True) as info:
        yield asyncio.run(_fill(info, tmp))


# Running the queries ----------------------------------------------------------------------------


@dataclass
class Result:
    columns: list[str]
    rows: list[dict[str, Any]]

    def column(self, name: str) -> list[Any]:
        return [r[name] for r in self.rows]


async def _run(dsn: str, sqls: Mapping[str, str]) -> dict[str, Result]:
    conn = await asyncpg.connect(dsn)
    out = {}
    try:
        await conn.execute(f"SET ROLE {READER}")
        for key, text in sqls.items():
            stmt = await conn.prepare(text)
            rows = await stmt.fetch()
            out[key] = Result(
                [a.name for a in stmt.get_attributes()], [dict(r.items()) for r in rows]
            )
    finally:
        await conn.close()
    return out


def _variables(fleet: Fleet, pump: str = "P-000001") -> dict[str, str | Sequence[str]]:
    return {"clinic": fleet.clinics, "pump": pump, "priority": ["high", "medium", "low", "info"]}


def _min_interval() -> timedelta:
    """The PostgreSQL datasource's minimum interval (jsonData.timeInterval, e.g. 1m)."""
    doc = yaml.safe_load(_files()[dashboards.DATASOURCES_FILE])
    text = next(d for d in doc["datasources"] if d["uid"] == dashboards.POSTGRES["uid"])
    value = text["jsonData"]["timeInterval"]
    assert value.endswith("m")
    return timedelta(minutes=int(value[:-1]))


def _interval(name: str, time_from: datetime, time_to: datetime) -> timedelta:
    """$__interval as Grafana computes it for the panel that runs the query."""
    points = next((u.max_data_points for u in _uses() if u.name == name), 1000)
    return interval_for(time_from, time_to, points, _min_interval())


def _expand(fleet: Fleet, name: str, frm: datetime, to: datetime, pump: str) -> str:
    return expand(SQL[name].sql, frm, to, _variables(fleet, pump), _interval(name, frm, to))


def query(
    fleet: Fleet, name: str, time_from: datetime, time_to: datetime, pump: str = "P-000001"
) -> Result:
    text = _expand(fleet, name, time_from, time_to, pump)
    return asyncio.run(_run(fleet.dsn, {name: text}))[name]


def _ranges(fleet: Fleet) -> dict[str, tuple[datetime, datetime]]:
    now = datetime.now(UTC)
    return {
        # The default: the last day, raw telemetry.
        "last day": (now - timedelta(days=1), now),
        # Three days: the hourly aggregate.
        "long": (fleet.start - timedelta(days=1), now),
        # Looking back: the fleet as it was 14 hours into the scenario.
        "past": (fleet.start + timedelta(hours=8), fleet.start + timedelta(hours=14)),
    }


_NUMBER = (int, float, Decimal)
_PUMP_FOR = {"pump.": "P-000020"}  # pump detail: the pump with a refill and its discrepancy


def _pump(name: str) -> str:
    return next((p for prefix, p in _PUMP_FOR.items() if name.startswith(prefix)), "P-000001")


def _check_shape(use: Use, result: Result) -> None:
    where = f"{use.board} / {use.where} ({use.name})"
    cols = result.columns
    if use.kind == "variable":
        assert len(cols) == 1, f"{where}: a variable query returns one column, got {cols}"
    elif use.kind == "annotation":
        assert {"time", "text", "tags"} <= set(cols), f"{where}: annotation columns {cols}"
        assert all(r["time"] is not None for r in result.rows), where
    elif use.format == "time_series":
        assert cols[0] == "time", f"{where}: a time series starts with its time column: {cols}"
        times = result.column("time")
        assert times == sorted(times), f"{where}: rows not sorted by time"
        long = "metric" in cols
        if long:
            assert len(cols) == 3 and cols[1] == "metric", f"{where}: time, metric, value: {cols}"
        for row in result.rows:
            for col in cols[2:] if long else cols[1:]:
                value = row[col]
                assert value is None or isinstance(value, _NUMBER), f"{where}: {col}={value!r}"
    elif use.kind == "stat":
        assert len(result.rows) <= 1, f"{where}: a stat query returns one row"
        assert (
            any(isinstance(v, _NUMBER) for r in result.rows for v in r.values()) or not result.rows
        ), f"{where}: a stat needs a number"
    else:
        assert use.kind == "table", f"{where}: unexpected panel type {use.kind}"
        assert cols, where


@dataclass
class Ran:
    """Every query of every dashboard, expanded for each range and run."""

    uses: list[Use]
    ranges: dict[str, tuple[datetime, datetime]]
    results: dict[tuple[str, str], Result]

    def __call__(self, name: str, label: str) -> Result:
        return self.results[(name, label)]


@pytest.fixture(scope="module")
def ran(fleet: Fleet) -> Ran:
    uses = _uses()
    ranges = _ranges(fleet)
    names = sorted({u.name for u in uses})
    texts = {
        f"{name}@{label}": _expand(fleet, name, frm, to, _pump(name))
        for name in names
        for label, (frm, to) in ranges.items()
    }
    out = asyncio.run(_run(fleet.dsn, texts))
    results = {tuple(key.split("@")): result for key, result in out.items()}
    return Ran(uses, ranges, results)  # type: ignore[arg-type]


pytestmark = pytest.mark.integration


def test_every_query_runs_as_the_reader_role_with_the_columns_its_panel_needs(ran: Ran) -> None:
    names = {u.name for u in ran.uses}
    assert names == set(SQL), f"queries no dashboard uses: {set(SQL) - names}"
    empty = []
    for use in ran.uses:
        per_range = [ran(use.name, label) for label in ran.ranges]
        for result in per_range:
            _check_shape(use, result)
        if not any(r.rows for r in per_range):
            empty.append(use.name)
    assert not empty, f"the faults fleet gives these queries nothing in any range: {empty}"


def _one(result: Result) -> dict[str, Any]:
    assert len(result.rows) == 1, result.rows
    return result.rows[0]


def _by_pump(result: Result) -> dict[str, dict[str, Any]]:
    return {r["pump"]: r for r in result.rows}


def test_fleet_overview_shows_the_faults(ran: Ran) -> None:
    # The pump whose rotor stopped for good is stalled, first among those not infusing; the one
    # whose stall recovered after an hour is infusing again.
    stopped = ran("fleet.not_infusing", "last day")
    assert stopped.rows[0]["state"] == "stalled"
    assert _by_pump(stopped)["P-000001"]["state"] == "stalled"
    assert "motor_stall" in _by_pump(stopped)["P-000001"]["alarms"]
    assert "P-000025" not in _by_pump(stopped)
    assert _by_pump(stopped)["P-000021"]["state"] == "stopped"  # ran dry

    # The nearly empty pump is first in the closest-to-empty list, at its alarm volume.
    closest = ran("fleet.closest_to_empty", "last day").rows
    assert closest[0]["pump"] == "P-000021"
    assert closest[0]["days to alarm volume"] == 0
    assert closest[0]["reservoir (mL)"] <= closest[0]["alarm at (mL)"]
    days = [r["days to alarm volume"] for r in closest]
    assert days == sorted(days) and all(d > 7 for d in days[1:])
    due = ran("fleet.refills_due", "last day").rows
    assert [r["pump"] for r in due] == ["P-000021"]
    assert due[0]["refill_due alert"] == "high"

    # 14 hours in, the pump that went silent at +2 h is the one silent pump; now it reports.
    assert _one(ran("fleet.reporting", "past"))["silent"] == 1
    silent = ran("fleet.silent", "past").rows
    assert [r["pump"] for r in silent] == ["P-000012"]
    assert 11.9 < silent[0]["silent for (h)"] < 12.1
    assert ran("fleet.silent", "last day").rows == []
    assert _one(ran("fleet.reporting", "last day")) == {
        "reporting": 36,
        "silent": 0,
        "offline (last will)": 0,
    }

    # Batteries: EOS reached, about 8 days left (ERI 80 days before +2 h), about 88 days left.
    battery = ran("fleet.battery", "last day").rows
    assert [r["pump"] for r in battery] == ["P-000019", "P-000018", "P-000017"]
    assert battery[0]["days to EOS"] == 0
    assert 7.5 < battery[1]["days to EOS"] < 8.5
    assert 87.5 < battery[2]["days to EOS"] < 88.5

    # Calculated pumps are listed as not independently observable, measured ones are not.
    blind = _by_pump(ran("fleet.flow_not_observable", "last day"))
    assert "P-000031" in blind and "P-000008" not in blind  # pocket-fill twins
    assert "P-000004" not in blind  # measured, over-infusing
    assert {r["reservoir volume"] for r in blind.values()} == {"calculated"}
    assert blind["P-000031"]["notice open"] is True

    alerts = _one(ran("fleet.open_alerts", "last day"))
    assert alerts["high"] >= 10 and alerts["standing notices"] >= 1


def test_the_clinic_variable_filters_the_fleet(fleet: Fleet) -> None:
    now = datetime.now(UTC)
    clinic = "C-02"
    text = expand(
        SQL["fleet.reporting"].sql,
        now - timedelta(days=1),
        now,
        {"clinic": [clinic]},
    )
    pumps = expand(SQL["var.pump"].sql, now, now, {"clinic": [clinic]})
    out = asyncio.run(_run(fleet.dsn, {"reporting": text, "pumps": pumps}))
    listed = out["pumps"].column("pump_id")
    assert listed and len(listed) < 36
    assert _one(out["reporting"])["reporting"] == len(listed)
    every = asyncio.run(
        _run(fleet.dsn, {"all": expand(SQL["var.pump"].sql, now, now, _variables(fleet))})
    )
    assert len(every["all"].rows) == 36


def _last(result: Result, column: str) -> float:
    values = [r[column] for r in result.rows if r[column] is not None]
    assert values, f"no {column}"
    return float(values[-1])


def test_pump_detail_reservoir_against_the_programmed_projection(fleet: Fleet) -> None:
    two_days = (fleet.start, fleet.end)  # raw readings (up to 2 days)
    three_days = (fleet.start - timedelta(days=1), fleet.end)  # the hourly aggregate
    for frm, to in (two_days, three_days):
        # A measured pump over-infusing by 25 % since +2 h falls below its projection (about
        # 0.12 mL after 46 h at 0.25 mL/day)...
        over = query(fleet, "pump.reservoir", frm, to, "P-000004")
        gap = _last(over, "programmed projection") - _last(over, "reservoir")
        assert 0.08 < gap < 0.2, gap
        # ...a calculated pump under-infusing by 30 % does not: its volume is its counts.
        blind = query(fleet, "pump.reservoir", frm, to, "P-000036")
        gap = _last(blind, "programmed projection") - _last(blind, "reservoir")
        assert abs(gap) < 0.03, gap
    raw = query(fleet, "pump.reservoir", *two_days, "P-000004")
    hourly = query(fleet, "pump.reservoir", *three_days, "P-000004")
    assert len(raw.rows) > 250  # readings every 10 minutes
    assert 40 <= len(hourly.rows) <= 50  # one per hour
    assert abs(_last(raw, "reservoir") - _last(hourly, "reservoir")) < 0.01


def test_pump_detail_delivery_refills_state_and_annotations(fleet: Fleet) -> None:
    now = datetime.now(UTC)
    day = (now - timedelta(days=1), now)
    three_days = (fleet.start - timedelta(days=1), now)
    # The rotor running at twice the programme, and counting it.
    for frm, to in (day, three_days):
        fast = query(fleet, "pump.delivery", frm, to, "P-000035")
        assert _last(fast, "delivered") / _last(fast, "programmed") > 1.8
        assert _last(fast, "delivered") > _last(fast, "programmed +14.5%")
        normal = query(fleet, "pump.delivery", frm, to, "P-000026")
        ratio = _last(normal, "delivered") / _last(normal, "programmed")
        assert 0.855 < ratio < 1.145

    now_row = _one(query(fleet, "pump.now", *day, "P-000001"))
    assert now_row["state"] == "stalled" and now_row["reservoir volume"] == "calculated"

    # The refill that found 3 mL less than the pump expected, with the alert it raised.
    refills = query(fleet, "pump.refills", *three_days, "P-000020").rows
    assert len(refills) == 1
    assert 2.5 < refills[0]["discrepancy (mL)"] < 3.5
    assert "refill_discrepancy (medium)" in refills[0]["alerts"]

    events = query(fleet, "pump.annotations.events", *three_days, "P-000001")
    assert any(t.startswith("motor_stall") for t in events.column("text"))
    assert all(tags.startswith("event,") for tags in events.column("tags"))
    transitions = query(fleet, "pump.annotations.alerts", *three_days, "P-000001").column("text")
    assert any(t.startswith("critical_pump_alarm start (high)") for t in transitions)
    assert any("ack" in t and "dr.oncall" in t for t in transitions)


def test_alerts_dashboard(ran: Ran, fleet: Fleet) -> None:
    state = _one(ran("alerts.state", "long"))
    assert state["acknowledged"] == 1
    assert state["open, not acknowledged"] > 0 and state["escalated unacknowledged"] > 0
    open_ = ran("alerts.open", "last day").rows
    ranks = [["high", "medium", "low", "info"].index(r["priority"]) for r in open_]
    assert ranks == sorted(ranks)
    stall = next(r for r in open_ if r["alert"] == fleet.acked_alert)
    assert stall["acknowledged by"] == "dr.oncall" and stall["pump"] == "P-000001"
    assert fleet.resolved_alert not in {r["alert"] for r in open_}

    times = {r["priority"]: r for r in ran("alerts.response_times", "long").rows}
    assert times["high"]["acknowledged"] == 1
    assert times["high"]["to acknowledge, median (min)"] == pytest.approx(7.0)
    assert times["high"]["started"] >= times["high"]["ended"]

    why = {(r["pump"], r["rule"], r["why"]) for r in ran("alerts.escalations", "long").rows}
    assert ("P-000003", "post_mri", "condition worsened") in why  # low -> medium -> high
    assert any(w == "not acknowledged in time" for _, _, w in why)
    history = ran("alerts.history", "long").rows
    assert any(
        r["alert"] == fleet.resolved_alert and r["phase"] == "end" and r["actor"] == "dr.oncall"
        for r in history
    )
    started = ran("alerts.started", "long")
    assert set(started.column("metric")) <= {"high", "medium", "low", "info"}
    assert sum(started.column("started")) == sum(t["started"] for t in times.values())


def test_pipeline_health(ran: Ran, fleet: Fleet) -> None:
    classes = set(ran("pipeline.dead_letters", "last day").column("metric"))
    assert {"not JSON", "spoofing", "quarantine"} <= classes
    assert _one(ran("pipeline.quarantine", "last day")) == {
        "quarantined": 2,
        "dead letters in range": 3,
        "dead letters held": 3,
    }
    outbox = _one(ran("pipeline.outbox", "last day"))
    assert outbox["pending"] > 0 and outbox["retrying"] > 0 and outbox["failed"] == 0
    assert {r["last error"] for r in ran("pipeline.outbox_problems", "last day").rows}
    assert _one(ran("pipeline.outbox", "past"))["pending"] == 0  # before anything was queued

    # Stored per second, times the interval, is every row stored in the range.
    frm, to = ran.ranges["last day"]
    step = _interval("pipeline.stored_rate", frm, to).total_seconds()
    rate = ran("pipeline.stored_rate", "last day").rows
    stored = sum(float(r["per second"]) * step for r in rate if r["metric"] == "telemetry")
    counted = asyncio.run(_run(fleet.dsn, {"n": "SELECT count(*) AS n FROM telemetry"}))["n"].rows[
        0
    ]["n"]
    assert stored == pytest.approx(counted)
    for row in ran("pipeline.lag", "last day").rows:
        assert 0 <= row["p50"] <= row["p99"] <= row["max"]


def test_prometheus_panels_use_the_ingesters_metrics(fleet: Fleet) -> None:
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in fleet.metrics.splitlines()
        if line and not line.startswith("#")
    }
    used = set()
    for board in _boards().values():
        for panel in _panels(board):
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == "prometheus":
                    assert target["expr"] in PROMQL.values()
                    used.update(re.findall(r"pumpfleet_\w+", target["expr"]))
    assert used, "no Prometheus panel"
    assert used <= exposed, f"not on the ingester's /metrics: {used - exposed}"
    assert set(re.findall(r"pumpfleet_\w+", " ".join(PROMQL.values()))) == used


# The generated files, without a database --------------------------------------------------------


def _sdk_lost(original: Any, roundtrip: Any, path: str = "") -> list[str]:
    """Keys and values of `original` that did not survive Grafana's models."""
    if isinstance(original, dict):
        if not isinstance(roundtrip, dict):
            return [f"{path}: became {type(roundtrip).__name__}"]
        out = []
        for key, value in original.items():
            if key not in roundtrip:
                out.append(f"{path}.{key}")
            else:
                out += _sdk_lost(value, roundtrip[key], f"{path}.{key}")
        return out
    if isinstance(original, list):
        if not isinstance(roundtrip, list) or len(roundtrip) != len(original):
            return [f"{path}: list changed"]
        return [
            x
            for i, (a, b) in enumerate(zip(original, roundtrip, strict=True))
            for x in _sdk_lost(a, b, f"{path}[{i}]")
        ]
    return [] if original == roundtrip else [f"{path}: {original!r} became {roundtrip!r}"]


@pytest.mark.parametrize("uid", [b.uid for b in dashboards.BOARDS])
def test_dashboard_json_is_grafanas_dashboard_model(uid: str) -> None:
    sdk_plugins.register_default_plugins()
    board = _boards()[uid]
    model = SdkDashboard.from_json(board)
    roundtrip = json.loads(json.dumps(model, cls=SdkEncoder))
    # An annotation's query is the datasource's own (the SDK models only Grafana's built-in
    # annotation target); it is checked against the SQL below.
    original = json.loads(json.dumps(board))
    for ann in original["annotations"]["list"]:
        target = ann.pop("target")
        assert target["rawSql"] in _BY_TEXT and target["format"] == "table"
    for ann in roundtrip["annotations"]["list"]:
        ann.pop("target", None)
    assert _sdk_lost(original, roundtrip) == []
    assert model.uid == uid and model.schema_version == dashboards.SCHEMA_VERSION


def _refs(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        ref = value.get("datasource")
        if ref is not None:
            yield ref
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def test_uids_datasources_and_panel_types_agree_with_provisioning() -> None:
    files = dashboards.render()
    provisioned = yaml.safe_load(files[dashboards.DATASOURCES_FILE])["datasources"]
    sources = {(d["uid"], d["type"]) for d in provisioned}
    assert len({uid for uid, _ in sources}) == len(provisioned)
    assert (dashboards.POSTGRES["uid"], dashboards.POSTGRES["type"]) in sources
    providers = yaml.safe_load(files[dashboards.PROVIDERS_FILE])["providers"]
    paths = {p["options"]["path"] for p in providers}
    assert len({p["folderUid"] for p in providers}) == len(providers) == len(dashboards.FOLDERS)

    sdk_plugins.register_default_plugins()
    panel_types = set(sdk_runtime.Runtime().panelcfg_variants) | {"row"}
    boards = _boards()
    assert len(boards) == len(dashboards.BOARDS)
    for board in dashboards.BOARDS:
        data = boards[board.uid]
        assert data["uid"] == board.uid and len(board.uid) <= 40
        # The file lands where a provider looks for it.
        folder = f"{dashboards.GRAFANA_DASHBOARDS}/{board.folder.directory}"
        assert (
            folder in paths
            and board.path == f"dashboards/{board.folder.directory}/{board.filename}"
        )
        for ref in _refs(data):
            assert (ref.get("uid"), ref.get("type")) in sources, f"{board.uid}: {ref}"
        for panel in _panels(data):
            assert panel["type"] in panel_types, f"{board.uid}: {panel['type']}"
            assert panel.get("description") or panel["type"] == "text", panel["title"]
            for target in panel.get("targets", []):
                assert ("rawSql" in target) != ("expr" in target)
                if "rawSql" in target:
                    assert target["rawSql"] in _BY_TEXT
                    assert target["format"] == SQL[_BY_TEXT[target["rawSql"]]].format
            links = json.dumps(panel.get("fieldConfig", {}))
            for uid in re.findall(r"/d/([\w-]+)/", links):
                assert uid in boards, f"{board.uid}: a link to a dashboard that is not there: {uid}"
    # Every variable the provisioning files name is one the deployment is told to set.
    named = set(re.findall(r"\$\{(\w+)\}", files[dashboards.DATASOURCES_FILE]))
    assert named == set(dashboards.ENVIRONMENT)


def test_committed_files_are_what_build_writes(tmp_path: Path) -> None:
    assert dashboards.check(COMMITTED) == [], "run `pumpfleet dashboards build` and commit"
    assert cli_main(["dashboards", "build", "--out", str(tmp_path)]) == 0
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [str(p) for p in built] == sorted(dashboards.render())
    for relative in built:
        assert (tmp_path / relative).read_bytes() == (COMMITTED / relative).read_bytes()
    assert cli_main(["dashboards", "build", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / dashboards.PROVIDERS_FILE).write_text("changed")
    stale = tmp_path / "dashboards" / "clinic" / "renamed.json"
    stale.write_text("{}")
    assert dashboards.check(tmp_path) == [
        f"{dashboards.PROVIDERS_FILE}: differs",
        "dashboards/clinic/renamed.json: no longer generated",
    ]
    dashboards.build(tmp_path)
    assert not stale.exists() and dashboards.check(tmp_path) == []


# Expansion as Grafana does it -------------------------------------------------------------------

_FROM = datetime(2018, 4, 12, 18, 0, tzinfo=UTC)
_TO = datetime(2018, 4, 12, 18, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # pkg/tsdb/grafana-postgresql-datasource/macros.go, timescaledb: false
        ("$__time(t)", 't AS "time"'),
        ("$__timeEpoch(t)", 'extract(epoch from t) as "time"'),
        ("$__timeFilter(t)", "t BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"),
        ("$__timeFrom() $__timeTo()", "'2018-04-12T18:00:00Z' '2018-04-12T18:05:00Z'"),
        ("GROUP BY $__timeGroup(t,'5m')", "GROUP BY floor(extract(epoch from t)/300)*300"),
        ("$__timeGroup(t, '5m'), v", 'floor(extract(epoch from t)/300)*300 AS "time", v'),
        ("$__timeGroupAlias(t, 1h)", 'floor(extract(epoch from t)/3600)*3600 AS "time"'),
        ("$__timeGroupAlias(t, $__interval)", 'floor(extract(epoch from t)/60)*60 AS "time"'),
        ("$__unixEpochFilter(e)", "e >= 1523556000 AND e <= 1523556300"),
        ("$__unixEpochFrom() $__unixEpochTo()", "1523556000 1523556300"),
        ("$__interval_ms $__interval", "60000 1m"),
        # Template variables: SQL datasources quote multi-values; sqlstring quotes one.
        ("IN ($clinic)", "IN ('north','o''neil')"),
        ("= ${pump:sqlstring}", "= 'P-1'"),
        ("= '$pump' [[pump]] ${pump}", "= 'P-1' P-1 P-1"),
    ],
)
def test_expand_does_what_grafana_does(sql: str, expected: str) -> None:
    values = {"clinic": ["north", "o'neil"], "pump": "P-1"}
    assert expand(sql, _FROM, _TO, values) == expected


def test_expand_refuses_what_it_cannot_expand() -> None:
    with pytest.raises(ExpandError, match=r"\$nope"):
        expand("SELECT $nope", _FROM, _TO)
    with pytest.raises(ExpandError, match="not supported"):
        expand("$__timeGroup(t, '5m', 0)", _FROM, _TO)
    with pytest.raises(ExpandError, match="not supported"):
        expand("$__whatever(t)", _FROM, _TO)


def test_interval_is_grafanas() -> None:
    day = timedelta(days=1)
    assert interval_for(_FROM, _FROM + day) == timedelta(minutes=1)  # 86 s: 1m, the minimum
    assert interval_for(_FROM, _FROM + 7 * day) == timedelta(minutes=10)
    assert interval_for(_FROM, _FROM + 30 * day) == timedelta(minutes=30)
    assert expand("$__interval", _FROM, _FROM + 90 * day) == "2h"
