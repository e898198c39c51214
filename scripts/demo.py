"""`make demo`: the pipeline end to end on this machine, security on, with real mosquitto and
PostgreSQL.

1. a clean local stack (`pumpfleet stack up`: no anonymous client, a TLS listener with a
   development CA), the migrations, the `faults` scenario's pumps registered as their clinic
   would, a Prometheus Alertmanager; three pumps provisioned (`pumpfleet pumps provision`: a
   broker account and a credentials file each);
2. the ingester (its own database login and the ingest account) and the alerting service;
3. by hand, on the fleet account: a malformed, a spoofed and an out-of-range message, and a
   valid reading from a pump nobody provisioned (quarantined: `unprovisioned_device`);
4. the `faults` scenario's 36 pumps (one fault or clinic action each) among a fleet of
   FLEET_PUMPS (the rest healthy pumps of mixed families), two simulated days in a minute, on
   the fleet account, and beside it the three agents over TLS with their own
   credentials, their device clocks set to the fleet's (see `agent_start`); a live view;
5. one pump revoked (`pumpfleet pumps revoke`): the broker cuts its agent off;
6. a summary (alerts raised against the faults injected, anything missed or unexpected, the
   agents' own alerts) and a PNG of the fleet drawn from the dashboards' SQL.
The stack stays up afterwards so you can look around; `pumpfleet stack down` stops it.
Ctrl-C stops every process the demo started (the stack is left, as at the end).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import _demo_picture
import _demo_view
import asyncpg
from rich.console import Console

from pumpfleet import alertmanager, contract, schema, stack
from pumpfleet.broker import BrokerOptions
from pumpfleet.schema import registry
from sim_fleet import Scenario, build_run, load_scenario, with_fleet_size
from sim_fleet import _check as checking

RUN_DIR = Path(os.environ.get("PUMPFLEET_RUN_DIR", ".pumpfleet"))
CREDENTIALS = RUN_DIR / "credentials"
AGENTS_STATE = RUN_DIR / "agents"
PUMPS = ["AG-000001", "AG-000002", "AG-000003"]
REVOKED = "AG-000003"
UNPROVISIONED = "AG-000099"
SPEED = 2880.0  # the faults scenario's two simulated days in a minute
FLEET_PUMPS = 300  # the faults scenario's 36, then healthy pumps of the default mix


def demo_scenario() -> Scenario:
    """The faults scenario in a fleet of FLEET_PUMPS (`pumpfleet sim run faults --pumps N`)."""
    return with_fleet_size(load_scenario("faults"), FLEET_PUMPS)


AGENT_INTERVAL_S = 7200
"""The agents report every 2 simulated hours (2.5 wall seconds). Their clocks start a process
start-up behind the fleet's (at 2880x, a second is 48 simulated minutes), and silence is judged
against 3 of the pump's own intervals: 6 h leaves room for a slow start on a busy machine."""
PICTURE = RUN_DIR / "demo-fleet.png"
GRAFANA = "http://localhost:3000"

console = Console()


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


class Children:
    """Every process the demo starts, stopped in reverse order however the demo ends."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pumpfleet.cli", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,  # Ctrl-C reaches the demo alone; it stops them in order
            )
        self.procs.append((name, proc))
        return proc

    def stop(self, names: list[str] | None = None, timeout: float = 20.0) -> None:
        chosen = [(n, p) for n, p in reversed(self.procs) if names is None or n in names]
        for _, proc in chosen:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in chosen:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in {timeout:g} s: killed")
                proc.kill()
                proc.wait()
        self.procs = [(n, p) for n, p in self.procs if (n, p) not in chosen]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pumpfleet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def wait_healthy(port: int, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"a service did not become healthy; read {log}")


def publish_by_hand(info: stack.StackInfo) -> None:
    """On the fleet account (a gateway may publish for any pump): three messages the contract
    refuses, and one valid reading from a pump nobody provisioned."""
    now = datetime.now(UTC)

    def reading(pump_id: str) -> bytes:
        return contract.encode(
            contract.Telemetry(
                v=1,
                pump_id=pump_id,
                time=now,
                seq=10**9,
                delivered_ul_per_h=10.4,
                programmed_rate_ul_per_h=10.4,
                programmed_dose_mcg_per_day=500.0,
                reservoir_ml=12.0,
                reservoir_capacity_ml=20.0,
                low_reservoir_alarm_ml=2.0,
                concentration_mcg_per_ml=2000.0,
                battery_pct=90.0,
                battery_eri=False,
                pump_state=contract.PumpState.INFUSING,
            )
        )

    messages = {
        "pumps/AG-000001/telemetry": b'{"v": 1, "pump_id": "AG-000001", "seq": ',  # cut short
        "pumps/AG-000002/telemetry": reading("AG-000003"),  # AG-000003's on AG-000002's topic
        "pumps/AG-000001/event": json.dumps(
            {
                "v": 1,
                "pump_id": "AG-000001",
                "time": now.isoformat(),
                "seq": 10**9,
                "event": "refill",
                "expected_ml": 2.0,
                "withdrawn_ml": -1.5,
                "injected_ml": 20.0,
                "reservoir_after_ml": 20.0,
                "concentration_mcg_per_ml": 2000.0,
            }
        ).encode(),
        f"pumps/{UNPROVISIONED}/telemetry": reading(UNPROVISIONED),  # valid, but whose?
    }
    options = BrokerOptions.from_url(info.mqtt_url_for("fleet"))
    client = options.paho_client("demo-hand")
    client.connect(options.host, options.port)
    client.loop_start()
    try:
        for topic, payload in messages.items():
            say(f"publish {topic}: {payload[:60]!r}...")
            client.publish(topic, payload, qos=1).wait_for_publish(10)
            try:
                contract.decode(topic, payload)
            except contract.ContractError as exc:
                say(f"  the contract says: rejected: {str(exc)[:100]}")
            else:
                say(f"  valid, but {UNPROVISIONED} has no registry row: quarantined")
    finally:
        client.disconnect()
        client.loop_stop()


async def wait_rows(dsn: str, sql: str, n: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            got = int(await conn.fetchval(sql))
            if got >= n or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def fleet_offset(dsn: str, speed: float, timeout: float = 30.0) -> float:
    """The simulator's clock as `device = speed * wall + offset` (epoch seconds), read from its
    first readings. A reading is stored after its device time came due, so
    `time - speed * received_at` is a lower bound of the offset: the estimate is never ahead of
    the simulator's clock, only behind by the ingest latency."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while time.monotonic() < deadline:
            rows = await conn.fetch(
                "SELECT time, received_at FROM telemetry WHERE pump_id LIKE 'P-%' LIMIT 500"
            )
            if rows:
                return max(
                    r["time"].timestamp() - speed * r["received_at"].timestamp() for r in rows
                )
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise SystemExit("the simulator stored no reading in 30 s; read its log")


def agent_start(offset: float, speed: float) -> datetime:
    """Where an agent's device clock starts so that it runs with the fleet's.

    The alerting service judges silence on the fleet clock: the newest device time it has seen.
    An agent whose clock ran days behind the fleet's (the agent's default: 7 days back at high
    speed) looks silent for days once the fleet has moved on. Started at the fleet's clock now,
    at the fleet's speed, an agent stays behind the fleet by its own start-up time only (its
    clock starts when the process is up), and both reach the wall clock together at the end."""
    return datetime.fromtimestamp(speed * time.time() + offset, UTC)


async def ack_some(dsn: str, n: int) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT alert_id FROM alerts WHERE ended_at IS NULL AND acked_at IS NULL"
            " AND priority = 'high' AND pump_id LIKE 'P-%' ORDER BY started_at LIMIT $1",
            n,
        )
    finally:
        await conn.close()
    return [r["alert_id"] for r in rows]


def wait_log(log: Path, pattern: str, after: int, timeout: float = 15.0) -> tuple[str, int]:
    """The first line of `log` past offset `after` that matches, as `event: error`, and the
    offset past it; ("", after) if none came in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        at = after
        for line in text[after:].splitlines(keepends=True):
            at += len(line)
            if re.search(pattern, line):
                fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
                said = ": ".join(fields[k].strip('"') for k in ("event", "error") if k in fields)
                return said, at
        time.sleep(0.2)
    return "", after


async def confirm_profiles(dsn: str) -> None:
    """The clinic's profile of the agents' pumps: `pumps provision` registers the 10-minute
    default interval, and these pumps report every AGENT_INTERVAL_S. Until a pump's first
    reading says its own interval, the rules judge silence by this one."""
    conn = await asyncpg.connect(dsn)
    try:
        await registry.register(
            conn,
            [
                registry.Registration(
                    pump, "unassigned", 20.0, 2000.0, 2.0, AGENT_INTERVAL_S, False
                )
                for pump in PUMPS
            ],
        )
    finally:
        await conn.close()


async def summary(
    dsn: str, run_start: datetime, baseline: int, sim_log: Path
) -> tuple[datetime, datetime]:
    """What reached the database, the check against the injected faults, the agents' alerts."""
    scenario = demo_scenario().model_copy(update={"speed": SPEED, "start": run_start})
    run = build_run(scenario)
    raised = await checking.fetch_raised(dsn, baseline, [p.pump_id for p in run.pumps])
    result = checking.evaluate(run, raised)
    conn = await asyncpg.connect(dsn)
    try:
        counts = {
            t: await conn.fetchval(f"SELECT count(*) FROM {t}")
            for t in ("telemetry", "events", "pump_status", "dead_letter", "alerts")
        }
        reasons = await conn.fetch(
            "SELECT pump_id, topic, reason FROM dead_letter ORDER BY id LIMIT 20"
        )
        agents = await conn.fetch(
            "SELECT pump_id, rule, priority, started_at, ended_at, summary FROM alerts"
            " WHERE pump_id LIKE 'AG-%' ORDER BY pump_id, alert_id"
        )
        per_agent = await conn.fetch(
            "SELECT pump_id, count(*) AS n, min(time) AS first, max(time) AS last"
            " FROM telemetry WHERE pump_id LIKE 'AG-%' GROUP BY pump_id ORDER BY pump_id"
        )
    finally:
        await conn.close()

    step("summary")
    say(
        "stored: "
        + ", ".join(f"{n:,} {t.replace('_', ' ')}" for t, n in counts.items() if t != "alerts")
    )
    say(
        f"faults scenario: {len(scenario.timeline)} faults and clinic actions on "
        f"{len({p.pump_id for p in run.pumps})} pumps, {len(run.expected)} alerts expected "
        f"(standing notices included), {counts['alerts']:,} alerts in the book"
    )
    for line in result.lines():
        say(line)
    if result.passed:
        say("nothing missed, nothing unexpected")
    say("dead letters (kept whole, with the reason):")
    for r in reasons:
        say(f"  {r['topic']}: {r['reason'][:100]}")
    say("the agents' own pumps (device clock next to the fleet's):")
    for r in per_agent:
        behind = (run.end - r["last"]).total_seconds() / 60
        say(
            f"  {r['pump_id']}: {r['n']} readings {r['first']:%m-%d %H:%M} to "
            f"{r['last']:%m-%d %H:%M}Z, last one {behind:.0f} simulated min before the fleet's"
        )
    by_rule = Counter((a["rule"], a["priority"]) for a in agents)
    say(
        "  their alerts: "
        + (", ".join(f"{n} {rule} ({p})" for (rule, p), n in sorted(by_rule.items())) or "none")
    )
    silent = [a for a in agents if a["rule"] in ("telemetry_silence", "sequence_gap")]
    say(
        "  silence or communication alerts on them: "
        + (
            "none"
            if not silent
            else "; ".join(f"{a['pump_id']} {a['rule']}: {a['summary']}" for a in silent)
        )
    )
    return run.start, max(run.end, datetime.now(UTC))


def show_alertmanager(url: str) -> None:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
        alerts = json.load(resp)
    by_priority = Counter(a["labels"].get("priority", "?") for a in alerts)
    say(
        f"Alertmanager {url} holds {len(alerts)} firing alerts: "
        + ", ".join(f"{n} {p}" for p, n in sorted(by_priority.items()))
    )


def main() -> None:
    step("starting a clean mosquitto and PostgreSQL (pumpfleet stack up)")
    if stack.load(RUN_DIR) is not None or (RUN_DIR / "stack.json").exists():
        say(f"removing the previous demo's stack in {RUN_DIR} first")
        stack.down(RUN_DIR, purge=True)
    for old in (CREDENTIALS, AGENTS_STATE):  # the previous demo's pumps and their queues
        shutil.rmtree(old, ignore_errors=True)
    info = stack.up(RUN_DIR)
    say(f"mosquitto  {info.mqtt_url} (accounts only), {info.mqtts_url} (TLS, CA {info.tls_ca})")
    say(f"postgresql {info.database_url}")

    step("applying migrations (pumpfleet db migrate)")
    applied = asyncio.run(schema.migrate(info.database_url))
    say(f"{len(applied)} applied now: {', '.join(m.name for m in applied) or 'up to date'}")

    step("registering the faults scenario's pumps as their clinic would (pumpfleet sim register)")
    faults = build_run(demo_scenario())
    n = asyncio.run(checking.register_pumps(info.database_url, faults))
    # Every pump of the scenario has a profile (none is set up `profile: false`), so every one
    # is registered and the ingesters' default, quarantine for a pump with no registry row,
    # holds back none of the scenario's data: no `unknown_pumps=register` lab opt-in is needed.
    say(f"{n} pumps with a clinic profile; {len(faults.pumps) - n} left without one")

    # The demo's children see this stack only: no connection settings of the user's.
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("PUMPFLEET_DATABASE_URL", "PUMPFLEET_MQTT__", "PUMPFLEET_PROVISIONING__")
        )
    }
    base["PUMPFLEET_RUN_DIR"] = str(RUN_DIR)
    children = Children()
    am = None
    try:
        step(f"provisioning the agents' pumps (pumpfleet pumps provision PUMP --out {CREDENTIALS})")
        provisioning = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pumpfleet.cli",
                    "pumps",
                    "provision",
                    pump,
                    "--out",
                    str(CREDENTIALS),
                ],
                env=base,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for pump in PUMPS  # 20 mL and the 2 mL alarm: what the agents' pump model reports
        ]
        for pump, proc in zip(PUMPS, provisioning, strict=True):
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise SystemExit(f"provisioning {pump} failed: {out.strip()}")
            say(out.strip().splitlines()[0])
        asyncio.run(confirm_profiles(info.database_url))
        say(f"their clinic profile: 20 mL, alarm at 2 mL, a reading every {AGENT_INTERVAL_S} s")

        step("starting Prometheus Alertmanager")
        am = alertmanager.start(RUN_DIR / "alertmanager", "http://127.0.0.1:9/none")
        say(am.url)

        alerting_env = {
            "PUMPFLEET_ALERTS__ALERTMANAGER_URL": am.url,
            # The simulated fleet runs thousands of times faster than the wall clock: the
            # watchdog follows the fleet's device time (the newest reading it has seen).
            "PUMPFLEET_ALERTS__CLOCK": "fleet",
            "PUMPFLEET_ALERTS__TICK_S": "0.1",
        }
        port, alerting_port = stack.free_port(), stack.free_port()
        ingest_log, alerting_log = RUN_DIR / "ingest.log", RUN_DIR / "alerting.log"
        step(
            f"starting the ingester on the ingest account (logs {ingest_log}, "
            f"metrics http://127.0.0.1:{port}/metrics) and the alerting service"
        )
        children.start(
            "ingester",
            ["ingest", "--metrics-port", str(port)],
            {**base, **info.env_for("ingest"), **alerting_env},
            ingest_log,
        )
        children.start(
            "alerting",
            ["alerting", "--metrics-port", str(alerting_port)],
            {**base, **info.env_for("alerting"), **alerting_env},
            alerting_log,
        )
        wait_healthy(port, ingest_log)
        wait_healthy(alerting_port, alerting_log)
        say("healthy")

        step("publishing by hand on the fleet account: three bad messages, one unknown pump")
        publish_by_hand(info)
        got = asyncio.run(wait_rows(info.database_url, "SELECT count(*) FROM dead_letter", 4))
        say(f"{got} dead letters stored")

        baseline = asyncio.run(checking.alert_baseline(info.database_url))
        sim_log = RUN_DIR / "sim.log"
        sim_log.unlink(missing_ok=True)
        step(
            f"running the faults scenario in a fleet of {len(faults.pumps)} pumps (two simulated "
            f"days in about a minute; log {sim_log}) and {len(PUMPS)} agents over TLS beside it"
        )
        sim_env = {
            **base,
            **info.env_for("reader"),  # --check reads the alerts table
            "PUMPFLEET_MQTT__URL": info.mqtt_url_for("fleet"),
        }
        sim_args = ["sim", "run", "faults", "--pumps", str(FLEET_PUMPS), "--speed", f"{SPEED:g}"]
        sim = children.start(
            "sim",
            [*sim_args, "--check", "--check-timeout", "60"],
            sim_env,
            sim_log,
        )
        offset = asyncio.run(fleet_offset(info.database_url, SPEED))
        for pump in PUMPS:
            start = agent_start(offset, SPEED)
            children.start(
                pump,
                [
                    "agent",
                    "--credentials",
                    str(CREDENTIALS / f"{pump}.json"),
                    "--speed",
                    f"{SPEED:g}",
                    "--interval-s",
                    str(AGENT_INTERVAL_S),
                    "--start",
                    start.isoformat(),
                    "--state-dir",
                    str(AGENTS_STATE),
                ],
                base,
                RUN_DIR / f"agent-{pump}.log",
            )
        say(f"agents' device clocks start at the fleet's: {start:%Y-%m-%d %H:%M}Z")
        asyncio.run(
            _demo_view.watch(
                info.database_url,
                f"http://127.0.0.1:{port}/metrics",
                lambda: sim.poll() is not None,
                "pumpfleet demo: the faults scenario and three agents",
                console,
            )
        )
        lines = sim_log.read_text(errors="replace").splitlines()
        say(f"sim run exited with status {sim.returncode}: {lines[-1] if lines else ''}")
        match = re.search(r"sim run starting.* start=(\S+)", "\n".join(lines))
        if match is None:
            raise SystemExit(f"the simulator's log {sim_log} has no start")
        run_start = datetime.fromisoformat(match[1].strip("\"'"))

        step("on-call acknowledges the two oldest open high alerts (pumpfleet alerts ack)")
        for alert_id in asyncio.run(ack_some(info.database_url, 2)):
            done = cli("alerts", "ack", str(alert_id), "--by", "demo-oncall", env=base)
            say((done.stdout or done.stderr).strip().splitlines()[0])

        step(f"revoking {REVOKED} (pumpfleet pumps revoke): the broker cuts its agent off")
        agent_log = RUN_DIR / f"agent-{REVOKED}.log"
        seen = len(agent_log.read_text(errors="replace"))
        done = cli("pumps", "revoke", REVOKED, env=base)
        say((done.stdout or done.stderr).strip())
        cut, seen = wait_log(agent_log, r"level=(warning|error)", seen)
        say(f"its agent: {cut}" if cut else "its agent logged nothing yet")
        again, _ = wait_log(agent_log, r"level=(warning|error)", seen)
        say(f"its agent, reconnecting: {again}" if again else "its agent has not retried yet")
        children.stop(PUMPS)

        picture_from, picture_to = asyncio.run(
            summary(info.database_url, run_start, baseline, sim_log)
        )
        picture = asyncio.run(
            _demo_picture.draw(info.database_url, PICTURE, picture_from, picture_to)
        )
        step("the picture")
        say(
            f"{picture.path.absolute()}: the alert timeline ({len(picture.alerted)} pumps alerted) "
            f"and reservoir against programmed projection for {len(picture.reservoir)} of them, "
            "alert start (solid), acknowledgement (dotted) and end (dashed) marked"
        )
        say(
            "The same figures in Grafana: `docker compose up -d` (README.md, Dashboards) and "
            f"{GRAFANA} (admin / admin-local-dev), dashboards Alerts and Pump detail, for "
            "compose's own stack (`--profile sim` adds a faulty fleet); or point a Grafana "
            "of your own at `pumpfleet dashboards build --out DIR` and this stack's "
            f"read-only login {info.database_url_as('reader')}"
        )
        show_alertmanager(am.url)
    except KeyboardInterrupt:
        print("\n   interrupted: stopping every process the demo started", flush=True)
        raise SystemExit(130) from None
    finally:
        children.stop()
        if am is not None:
            alertmanager.stop(am)
    step(
        "done. The stack is still running: `.venv/bin/pumpfleet stack status`, "
        "`.venv/bin/pumpfleet stack down` to stop it"
    )


if __name__ == "__main__":
    main()
