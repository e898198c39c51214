"""`make demo`: the pipeline end to end on this machine, with real mosquitto and PostgreSQL.

1. starts a clean local stack (`pumpfleet stack up`), applies the migrations, registers the
   scenario's pumps as their clinic would, and starts a Prometheus Alertmanager;
2. starts the ingester with alerting;
3. runs a few pump agents on simulated pumps at high clock speed;
4. publishes a malformed, a spoofed and an out-of-range message by hand;
5. runs the `faults` scenario (36 pumps of three families, two simulated days, one fault or
   control per pump) through the broker and checks that exactly the expected alerts were
   raised, the standing notices of the pumps that cannot be watched fully among them;
6. shows what reached the database (rows, newest readings, dead letters with their reasons), the
   open alerts as on-call sees them, and what Alertmanager holds.
The stack stays up afterwards so you can look around; `pumpfleet stack down` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pumpfleet import alertmanager, contract, schema, stack
from sim_fleet import build_run, load_scenario
from sim_fleet import check as checking

RUN_DIR = Path(os.environ.get("PUMPFLEET_RUN_DIR", ".pumpfleet"))
PUMPS = ["AG-000001", "AG-000002", "AG-000003"]
AGENT_SECONDS = 8


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def pumpfleet(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pumpfleet.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(port: int, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the ingester did not become healthy; read {log}")


def publish_by_hand(info: stack.StackInfo) -> None:
    valid_for_p3 = contract.encode(
        contract.Telemetry(
            v=1,
            pump_id="AG-000003",
            time=datetime.now(UTC),
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
    bad = {
        "pumps/AG-000001/telemetry": b'{"v": 1, "pump_id": "AG-000001", "seq": ',  # cut short
        "pumps/AG-000002/telemetry": valid_for_p3,  # AG-000003's reading on AG-000002's topic
        "pumps/AG-000001/event": json.dumps(
            {
                "v": 1,
                "pump_id": "AG-000001",
                "time": datetime.now(UTC).isoformat(),
                "seq": 10**9,
                "event": "refill",
                "expected_ml": 2.0,
                "withdrawn_ml": -1.5,
                "injected_ml": 20.0,
                "reservoir_after_ml": 20.0,
                "concentration_mcg_per_ml": 2000.0,
            }
        ).encode(),
    }
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="demo-hand",
        protocol=mqtt.MQTTv5,
    )
    client.connect(info.mqtt_host, info.mqtt_port)
    client.loop_start()
    for topic, payload in bad.items():
        print(f"   publish {topic}: {payload[:70]!r}...")
        client.publish(topic, payload, qos=1).wait_for_publish(10)
        try:
            contract.decode(topic, payload)
        except contract.ContractError as exc:
            print(f"   `pumpfleet contract validate` would say: rejected: {exc}")
    client.disconnect()
    client.loop_stop()


async def report(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in ("pumps", "telemetry", "events", "pump_status", "dead_letter"):
            n = await conn.fetchval(f"SELECT count(*) FROM {table}")
            print(f"   {table:<12} {n:>6} rows")
        print("\n   newest reading per pump:")
        rows = await conn.fetch(
            "SELECT DISTINCT ON (pump_id) pump_id, time, seq, reservoir_ml, battery_pct, "
            "pump_state FROM telemetry ORDER BY pump_id, time DESC"
        )
        for r in rows:
            print(
                f"   {r['pump_id']}  {r['time']:%Y-%m-%d %H:%M}  seq {r['seq']:>4}  "
                f"reservoir {r['reservoir_ml']:6.2f} mL  battery {r['battery_pct']:5.1f} %  "
                f"{r['pump_state']}"
            )
        print("\n   dead letters (kept whole, with the reason):")
        for r in await conn.fetch("SELECT topic, reason FROM dead_letter ORDER BY id"):
            print(f"   {r['topic']}: {r['reason'][:110]}")
    finally:
        await conn.close()


async def wait_dead_letters(dsn: str, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while time.monotonic() < deadline:
            if await conn.fetchval("SELECT count(*) FROM dead_letter") >= n:
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def show_alertmanager(url: str) -> None:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
        alerts = json.load(resp)
    by_priority: dict[str, int] = {}
    for a in alerts:
        by_priority[a["labels"].get("priority", "?")] = (
            by_priority.get(a["labels"].get("priority", "?"), 0) + 1
        )
    print(
        f"   Alertmanager {url} holds {len(alerts)} firing alerts: "
        + ", ".join(f"{n} {p}" for p, n in sorted(by_priority.items()))
    )


def main() -> None:
    step("starting a clean mosquitto and PostgreSQL (pumpfleet stack up)")
    if stack.load(RUN_DIR) is not None or (RUN_DIR / "stack.json").exists():
        print(f"   removing the previous demo's stack in {RUN_DIR} first")
        stack.down(RUN_DIR, purge=True)
    info = stack.up(RUN_DIR)
    print(
        f"   mosquitto  {info.mqtt_url}\n   postgresql {info.database_url}\n   run dir    {RUN_DIR}"
    )

    step("applying migrations (pumpfleet db migrate)")
    applied = asyncio.run(schema.migrate(info.database_url))
    print(f"   {len(applied)} applied now: {', '.join(m.name for m in applied) or 'up to date'}")

    step("registering the faults scenario's pumps as their clinic would (pumpfleet sim register)")
    faults = build_run(load_scenario("faults"))
    n = asyncio.run(checking.register_pumps(info.database_url, faults))
    unregistered = len(faults.pumps) - n
    print(f"   {n} pumps with a clinic profile; {unregistered} left without one on purpose")

    step("starting Prometheus Alertmanager")
    am = alertmanager.start(RUN_DIR / "alertmanager", "http://127.0.0.1:9/none")
    print(f"   {am.url}")

    env = {
        **os.environ,
        **info.to_env(),
        "PUMPFLEET_ALERTS__ALERTMANAGER_URL": am.url,
        # The simulated fleet runs thousands of times faster than the wall clock: the watchdog
        # follows the fleet's device time.
        "PUMPFLEET_ALERTS__CLOCK": "fleet",
        "PUMPFLEET_ALERTS__TICK_S": "0.1",
        # A lab: the demo's agents (AG-...) publish before any clinic provisioned them.
        "PUMPFLEET_INGEST__UNKNOWN_PUMPS": "register",
    }
    port = stack.free_port()
    ingest_log = RUN_DIR / "ingest.log"
    step(f"starting the ingester (logs: {ingest_log}, metrics: http://127.0.0.1:{port}/metrics)")
    ingester = pumpfleet("ingest", "--metrics-port", str(port), env=env, log=ingest_log)
    alerting_port = stack.free_port()
    alerting_log = RUN_DIR / "alerting.log"
    step(f"starting the alerting service (logs: {alerting_log})")
    alerting = pumpfleet(
        "alerting", "--metrics-port", str(alerting_port), env=env, log=alerting_log
    )
    agents: list[subprocess.Popen[bytes]] = []
    try:
        wait_healthy(port, ingest_log)
        wait_healthy(alerting_port, alerting_log)
        print("   healthy")

        step(f"running {len(PUMPS)} pump agents at 3600x clock speed for {AGENT_SECONDS} s")
        for pump in PUMPS:
            agents.append(
                pumpfleet(
                    "agent",
                    "--pump-id",
                    pump,
                    "--speed",
                    "3600",
                    "--interval-s",
                    "600",
                    env=env,
                    log=RUN_DIR / f"agent-{pump}.log",
                )
            )
        for remaining in range(AGENT_SECONDS, 0, -1):
            if sys.stdout.isatty():
                print(f"\r   {remaining:>2} s left", end="", flush=True)
            time.sleep(1)  # the agents run for this long: a duration, not a synchronisation
        print("\r   agents stopping" + " " * 10)
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(30)

        step("publishing a malformed, a spoofed and an out-of-range message by hand")
        publish_by_hand(info)
        asyncio.run(wait_dead_letters(info.database_url, 3))

        step(
            f"running the `faults` scenario: {len(faults.pumps)} pumps, two simulated days in "
            "about a minute"
        )
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pumpfleet.cli",
                "--log-level",
                "WARNING",
                "sim",
                "run",
                "faults",
                "--speed",
                "2880",
                "--check",
                "--check-timeout",
                "60",
            ],
            env=env,
            check=False,
        )
        print(f"   sim run exited with status {run.returncode}")

        step("what the database holds")
        asyncio.run(report(info.database_url))

        step("open alerts, as on-call sees them (pumpfleet alerts list --open)")
        subprocess.run(
            [sys.executable, "-m", "pumpfleet.cli", "alerts", "list", "--open"],
            env=env,
            check=False,
        )
        show_alertmanager(am.url)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
        for service in (ingester, alerting):
            service.send_signal(signal.SIGTERM)
        for service in (ingester, alerting):
            service.wait(30)
        alertmanager.stop(am)
    step(
        "done. The stack is still running: `.venv/bin/pumpfleet stack status`, "
        "`.venv/bin/pumpfleet stack down` to stop it"
    )


if __name__ == "__main__":
    main()
