"""End to end: the simulator's scenarios through the real broker, ingester (with alerting),
database and Alertmanager. Each scenario must raise exactly the alerts it lists, at the right
priority, within its deadlines, its standing notices included (`pumpfleet sim run --check`
judges that), and Alertmanager must receive, group and resolve them. The clinic's registry
holds a confirmed profile for every pump the scenario gives one (as `simrun.profiles` does in
process), so only pumps set up with `profile: false` get clinic_data_missing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pumpfleet import alertmanager, schema
from pumpfleet import stack as stack_mod
from pumpfleet.testing import Sink
from sim_fleet import build_run, load_scenario, register_pumps

pytestmark = pytest.mark.integration


async def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Pipeline:
    """`pumpfleet ingest` and `pumpfleet alerting` as processes, pointed at a real Alertmanager."""

    def __init__(
        self, info: stack_mod.StackInfo, dsn: str, am_url: str, log: Path, alerting: int = 1
    ) -> None:
        self.port = stack_mod.free_port()
        self.fleet_url = info.mqtt_url_for("fleet")  # the simulator publishes as the fleet
        self.alerting_ports = [stack_mod.free_port() for _ in range(alerting)]
        self.env = {
            **os.environ,
            **info.to_env(),
            "PUMPFLEET_DATABASE_URL": dsn,
            "PUMPFLEET_INGEST__CLIENT_ID": f"e2e-{uuid.uuid4().hex[:8]}",
            "PUMPFLEET_INGEST__METRICS_PORT": str(self.port),
            # The simulation runs thousands of times faster than the wall clock, so the
            # watchdog follows the fleet's device time and looks often.
            "PUMPFLEET_ALERTS__CLOCK": "fleet",
            "PUMPFLEET_ALERTS__TICK_S": "0.1",
            "PUMPFLEET_ALERTS__ALERTMANAGER_URL": am_url,
        }
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []
        self._start("ingest")
        self.alerting = [self._start("alerting", port) for port in self.alerting_ports]

    def _start(self, command: str, port: int | None = None) -> subprocess.Popen[bytes]:
        env = {**self.env, "PUMPFLEET_ALERTS__METRICS_PORT": str(port or 0)}
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pumpfleet.cli", command],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def restart_alerting(self, n: int) -> None:
        self.alerting[n] = self._start("alerting", self.alerting_ports[n])

    async def roles(self) -> list[str | None]:
        """Each alerting instance's role from its /healthz (None: not answering)."""
        out: list[str | None] = []
        async with httpx.AsyncClient() as client:
            for port in self.alerting_ports:
                try:
                    resp = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    out.append(resp.json().get("role"))
                except (httpx.HTTPError, ValueError):
                    out.append(None)
        return out

    async def healthy(self) -> bool:
        try:
            async with httpx.AsyncClient() as client:
                ingest = await client.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
        except httpx.HTTPError:
            return False
        return ingest.status_code == 200 and "active" in await self.roles()

    def sim(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pumpfleet.cli", "sim", "run", *args],
            env={**self.env, "PUMPFLEET_MQTT__URL": self.fleet_url},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[stack_mod.StackInfo]:
    """A broker and database of this test's own: scenarios reuse pump ids, and a broker keeps
    their retained statuses, which a later scenario's ingester would receive as history."""
    with stack_mod.running_stack(tmp_path / "stack", purge=True) as info:
        yield info


async def register_profiles(dsn: str, scenario: str) -> int:
    return await register_pumps(dsn, build_run(load_scenario(scenario)))


@pytest.fixture
async def pipeline(
    request: pytest.FixtureRequest,
    own_stack: stack_mod.StackInfo,
    am: alertmanager.Alertmanager,
    tmp_path: Path,
) -> Any:
    """The pipeline, its registry holding the profiles of the scenario named by the test's
    indirect parameter."""
    dsn = own_stack.database_url
    await schema.migrate(dsn)
    assert await register_profiles(dsn, request.param) > 0
    p = Pipeline(own_stack, dsn, am.url, tmp_path / "ingest.log")
    try:
        await _until(p.healthy, 30, f"a healthy ingester (log: {p.log})")
        yield p
    finally:
        p.stop()


@pytest.mark.parametrize("pipeline", ["faults"], indirect=True)
async def test_fault_scenario_raises_exactly_its_alerts_and_alertmanager_has_them(
    pipeline: Pipeline, am: alertmanager.Alertmanager, sink: Sink
) -> None:
    run = await asyncio.to_thread(
        pipeline.sim,
        "faults",
        "--speed",
        "2880",
        "--check",
        "--check-timeout",
        "60",
        timeout=400,
    )
    assert run.returncode == 0, f"sim run --check failed:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    assert "check passed" in run.stdout.lower() or "0 unexpected" in run.stdout

    async def am_has() -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{am.url}/api/v2/alerts")
        listed = {(a["labels"]["alertname"], a["labels"]["pump_id"]) for a in resp.json()}
        return resp.json() if ("pocket_fill", "P-000008") in listed else []

    alerts = await _until(am_has, 30, "Alertmanager to list the scenario's alerts")
    pocket = next(a for a in alerts if a["labels"]["alertname"] == "pocket_fill")
    assert pocket["labels"]["priority"] == "high"
    assert pocket["annotations"]["summary"]
    # P-000008 is measured (its sensor saw the pocket fill); P-000031, its calculated twin,
    # carries the standing notice that says its flow is not independently observable.
    listed = {(a["labels"]["alertname"], a["labels"]["pump_id"]) for a in alerts}
    assert ("flow_not_observable", "P-000031") in listed
    assert ("flow_not_observable", "P-000008") not in listed
    assert not any(name == "clinic_data_missing" for name, _ in listed)

    async def grouped_and_resolved() -> bool:
        bodies = sink.bodies
        firing = [b for b in bodies if b.get("status") == "firing" and b.get("groupLabels")]
        resolved = [a for b in bodies for a in b.get("alerts", []) if a["status"] == "resolved"]
        return bool(firing) and bool(resolved)

    await _until(grouped_and_resolved, 30, "Alertmanager to notify a group and a resolution")
    grouped = [b for b in sink.bodies if len(b.get("alerts", [])) > 1]
    assert grouped, "Alertmanager never grouped two alerts into one notification"


@pytest.mark.parametrize("pipeline", ["healthy"], indirect=True)
async def test_healthy_fleet_raises_nothing_but_the_notices(pipeline: Pipeline) -> None:
    run = await asyncio.to_thread(
        pipeline.sim,
        "healthy",
        "--speed",
        "max",
        "--check",
        "--check-timeout",
        "20",
        timeout=400,
    )
    assert run.returncode == 0, f"sim run --check failed:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"


@pytest.fixture
async def ha_pipeline(
    own_stack: stack_mod.StackInfo, am: alertmanager.Alertmanager, tmp_path: Path
) -> Any:
    """The pipeline with two alerting instances, the faults scenario's profiles registered."""
    dsn = own_stack.database_url
    await schema.migrate(dsn)
    assert await register_profiles(dsn, "faults") > 0
    p = Pipeline(own_stack, dsn, am.url, tmp_path / "pipeline.log", alerting=2)
    try:
        await _until(p.healthy, 30, f"a healthy pipeline (log: {p.log})")
        yield p
    finally:
        p.stop()


SEED = int(os.environ.get("PUMPFLEET_TEST_SEED", uuid.uuid4().int % 10_000))


async def test_killing_and_freezing_the_active_alerting_loses_and_doubles_nothing(
    ha_pipeline: Pipeline, am: alertmanager.Alertmanager, own_stack: stack_mod.StackInfo
) -> None:
    """Mid-scenario, at seeded moments: SIGKILL the active instance (the standby takes over
    within 10 s; the killed one comes back as standby), then freeze the new active one with
    SIGSTOP past its lease and wake it (it must stand down, writing nothing). The scenario's
    alerts are still exactly right, no transition is recorded twice and no notification is
    queued twice."""
    import random
    import signal

    rng = random.Random(SEED)
    p = ha_pipeline
    sim = asyncio.create_task(
        asyncio.to_thread(
            p.sim, "faults", "--speed", "2880", "--check", "--check-timeout", "60", timeout=400
        )
    )
    await asyncio.sleep(rng.uniform(5, 25))  # a seeded moment of the fault scenario
    roles = await p.roles()
    first = roles.index("active")
    p.alerting[first].send_signal(signal.SIGKILL)
    p.alerting[first].wait(10)
    killed_at = asyncio.get_running_loop().time()

    async def other_active() -> bool:
        return (await p.roles())[1 - first] == "active"

    await _until(other_active, 10, f"the standby to take over (seed {SEED})")
    takeover_s = asyncio.get_running_loop().time() - killed_at
    p.restart_alerting(first)

    await asyncio.sleep(rng.uniform(2, 10))
    second = 1 - first
    frozen = p.alerting[second]
    frozen.send_signal(signal.SIGSTOP)
    try:

        async def first_active_again() -> bool:
            return (await p.roles())[first] == "active"

        await _until(first_active_again, 20, f"the restarted one to take over (seed {SEED})")
    finally:
        frozen.send_signal(signal.SIGCONT)

    async def stood_down() -> bool:
        return (await p.roles())[second] == "standby"

    await _until(stood_down, 20, "the frozen instance to stand down once awake")

    run = await sim
    assert run.returncode == 0, (
        f"seed {SEED}: sim run --check failed:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    )
    assert takeover_s < 10
    conn = await asyncpg.connect(own_stack.database_url)
    try:
        doubled = await conn.fetch(
            "SELECT alert_id, phase, count(*) FROM alert_history WHERE phase IN ('start', 'end')"
            " GROUP BY alert_id, phase HAVING count(*) > 1"
        )
        twice = await conn.fetch(
            "SELECT receiver, alert_id, action, event, count(*) FROM alert_outbox"
            " GROUP BY receiver, alert_id, action, event HAVING count(*) > 1"
        )
        epochs = await conn.fetchval("SELECT epoch FROM alerting_lease")
    finally:
        await conn.close()
    assert not doubled, f"seed {SEED}: transitions recorded twice: {doubled}"
    assert not twice, f"seed {SEED}: notifications queued twice: {twice}"
    assert epochs >= 3  # first holder, the takeover after the kill, the one after the freeze
