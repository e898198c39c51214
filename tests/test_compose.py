"""docker-compose.yml cannot run here (no Docker engine); check what can be checked: the file is
a valid compose file in structure (services, start order, health checks, volumes), every file it
mounts exists, every pumpfleet command it runs parses with the real CLI, no secret is in clear
beyond the local-development defaults, Grafana gets the provisioning the dashboards expect, the
Alertmanager config passes amtool, and the script that makes Grafana's database login works."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

import dashboards
from pumpfleet import schema
from pumpfleet import stack as stack_mod
from pumpfleet.cli import command

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ONE_SHOT = {"migrate", "sim-register", "sim", "broker-accounts", "broker-certs", "agent-provision"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _depends(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _parses(argv: list[str]) -> bool:
    """The words name a pumpfleet command and its options parse; nothing runs."""
    cmd: Any = command()
    words = list(argv)
    while hasattr(cmd, "commands"):  # a group: the next word names one of its commands
        if not words or words[0] not in cmd.commands:
            return False
        cmd = cmd.commands[words.pop(0)]
    cmd.make_context(cmd.name, words)  # a bad option or value raises
    return True


def test_compose_mounts_exist_and_commands_parse() -> None:
    services = _services()
    assert {
        "timescaledb",
        "mosquitto",
        "migrate",
        "ingest",
        "alerting",
        "alertmanager",
        "prometheus",
        "grafana",
        "sim",
    } <= set(services)
    assert "timescaledb" in services["timescaledb"]["image"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        if svc.get("build") == ".":
            assert _parses(svc["command"]), f"{name}: {svc['command']} is no pumpfleet command"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for part in ("pumpfleet", "device_agent", "ingest", "sim_fleet", "dashboards"):
        assert f"COPY {part} ./{part}" in dockerfile


def test_start_order_health_checks_and_volumes() -> None:
    doc = _compose()
    services = _services()
    declared = set(doc.get("volumes", {}))
    for name, svc in services.items():
        for dep, condition in _depends(svc).items():
            assert dep in services, f"{name} depends on {dep}, which is not a service"
            assert condition in CONDITIONS, f"{name}: {condition}"
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully", f"{name} -> {dep}"
            elif condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check"
        if name not in ONE_SHOT:
            assert "healthcheck" in svc or "profiles" in svc, f"{name} has no health check"
            assert svc.get("restart") == "unless-stopped", f"{name} does not come back"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses an undeclared volume {source}"
        for config in svc.get("configs", []):
            assert config["source"] in doc["configs"], f"{name}: {config}"
    # The schema before anything that reads or writes it; no cycle.
    for name in ("ingest", "alerting", "grafana", "sim-register"):
        assert _depends(services[name]).get("migrate") == "service_completed_successfully"
    assert _depends(services["migrate"]) == {"timescaledb": "service_healthy"}

    def reach(name: str, seen: tuple[str, ...] = ()) -> None:
        assert name not in seen, f"dependency cycle: {' -> '.join((*seen, name))}"
        for dep in _depends(services[name]):
            reach(dep, (*seen, name))

    for name in services:
        reach(name)
    # Alerting runs apart from the ingesters, active and standby.
    assert services["alerting"]["command"] == ["alerting"]
    assert services["alerting"].get("deploy", {}).get("replicas", 1) >= 2
    # The simulated fleet only with --profile sim.
    assert {n for n, s in services.items() if "sim" in s.get("profiles", [])} >= {"sim", "agent"}


_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)
_DEFAULTED = re.compile(r"^\$\{[A-Z0-9_]+:-[\w.-]*local-dev\}$")


def _environments() -> list[tuple[str, str, str]]:
    out = []
    for name, svc in _services().items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        out += [(name, str(k), str(v)) for k, v in env.items()]
    return out


def test_no_secret_in_clear_beyond_local_development_defaults() -> None:
    for service, key, value in _environments():
        if _SECRET_KEY.search(key):
            assert _DEFAULTED.match(value), f"{service}: {key} is not ${{VAR:-...local-dev}}"
        for password in re.findall(r"://[^:/@]+:([^@]+)@", value):
            assert _DEFAULTED.match(password), f"{service}: {key} has a password in clear"
    # Wherever a secret's variable is used, its default says it is for local development.
    for var, default in re.findall(r"\$\{(\w+):-([^}]*)\}", COMPOSE.read_text()):
        if _SECRET_KEY.search(var):
            assert "local-dev" in default, f"{var} defaults to {default!r}"


def test_grafana_gets_the_provisioning_the_dashboards_expect() -> None:
    services = _services()
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    assert mounts[dashboards.GRAFANA_PROVISIONING] == "./deploy/grafana/provisioning"
    assert mounts[dashboards.GRAFANA_DASHBOARDS] == "./deploy/grafana/dashboards"
    env = grafana["environment"]
    assert set(dashboards.ENVIRONMENT) <= set(env), "Grafana lacks a variable provisioning uses"
    host, port = env["PUMPFLEET_GRAFANA_DB_HOST"].split(":")
    assert host in services and port == "5432"
    assert (
        env["PUMPFLEET_GRAFANA_DB_USER"]
        == services["timescaledb"]["environment"]["PUMPFLEET_GRAFANA_DB_USER"]
    )
    assert (
        env["PUMPFLEET_GRAFANA_DB_USER"] != services["timescaledb"]["environment"]["POSTGRES_USER"]
    ), "Grafana must not read as the owner"
    prometheus = env["PUMPFLEET_GRAFANA_PROMETHEUS_URL"].split("//")[1].split(":")[0]
    assert prometheus in services
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    relative = home.removeprefix(dashboards.GRAFANA_DASHBOARDS + "/")
    assert f"dashboards/{relative}" in {b.path for b in dashboards.BOARDS}
    # Prometheus scrapes the services whose metrics the pipeline dashboard shows.
    scrape = yaml.safe_load(_compose()["configs"]["prometheus"]["content"])
    targets = {
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert {"ingest:9108", "alerting:9465"} <= targets
    assert "PUMPFLEET_INGEST__METRICS_HOST" in services["ingest"]["environment"]


def test_alertmanager_config_is_valid_and_routes_by_priority() -> None:
    amtool = shutil.which("amtool")
    assert amtool, "amtool not found: install it with `apt-get install prometheus-alertmanager`"
    path = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
    done = subprocess.run(
        [amtool, "check-config", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(path.read_text())
    routes = {tuple(r["matchers"]): r["receiver"] for r in config["route"]["routes"]}
    assert routes[('priority="high"',)] == "on-call"
    services = _services()
    url = services["alerting"]["environment"]["PUMPFLEET_ALERTS__ALERTMANAGER_URL"]
    assert url.split("//")[1].split(":")[0] == "alertmanager"


@pytest.mark.integration
def test_the_grafana_login_can_read_the_dashboards_and_nothing_more(
    stack: stack_mod.StackInfo, database_url: str
) -> None:
    """The init script, then the migrations, as the container runs them; then Grafana's login."""
    user = f"grafana_{uuid.uuid4().hex[:8]}"
    database = database_url.rsplit("/", 1)[1]
    env = {
        **os.environ,
        "PGHOST": stack.pg_host,
        "PGPORT": str(stack.pg_port),
        "POSTGRES_USER": stack.pg_user,
        "POSTGRES_DB": database,
        "PUMPFLEET_GRAFANA_DB_USER": user,
        "PUMPFLEET_GRAFANA_DB_PASSWORD": "test-only",
    }
    script = ROOT / "deploy" / "grafana" / "initdb" / "10-grafana-reader.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    asyncio.run(schema.migrate(database_url))

    async def as_grafana() -> None:
        conn = await asyncpg.connect(
            host=stack.pg_host, port=stack.pg_port, user=user, database=database
        )
        try:
            for table in ("pumps", "telemetry", "telemetry_hourly", "alerts", "alert_outbox"):
                await conn.fetch(f"SELECT * FROM {table} LIMIT 1")
            await conn.fetch("SELECT id, reason, topic FROM dead_letter LIMIT 1")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT payload FROM dead_letter LIMIT 1")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("INSERT INTO pumps (pump_id) VALUES ('X-1')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM alerts")
        finally:
            await conn.close()

    asyncio.run(as_grafana())
    # Idempotent: migrating again (another database of the same cluster too) keeps the role.
    assert asyncio.run(schema.migrate(database_url)) == []


def test_every_broker_login_has_an_account_and_none_is_anonymous() -> None:
    services = _services()
    for name, svc in services.items():
        url = svc.get("environment", {}).get("PUMPFLEET_MQTT__URL")
        if url is not None:
            assert re.match(r"mqtts?://pumpfleet-(ingest|fleet):\$\{", url), f"{name}: {url}"
    assert services["sim"]["environment"]["PUMPFLEET_MQTT__URL"].startswith(
        "mqtt://pumpfleet-fleet:"
    )
    assert services["ingest"]["environment"]["PUMPFLEET_MQTT__URL"].startswith(
        "mqtt://pumpfleet-ingest:"
    )
    agent = services["agent"]["command"]
    assert "--credentials" in agent and "--pump-id" not in agent
    assert _depends(services["agent"]) == {"agent-provision": "service_completed_successfully"}
    assert _depends(services["mosquitto"]) == {
        "broker-accounts": "service_completed_successfully",
        "broker-certs": "service_completed_successfully",
    }
    assert {"1883", "8883", "8884"} <= {p.split(":")[-1] for p in services["mosquitto"]["ports"]}


@pytest.mark.integration
def test_the_ingest_and_alerting_logins_do_their_jobs_and_nothing_more(
    stack: stack_mod.StackInfo, database_url: str
) -> None:
    """The service-logins init script, then the migrations, as the container runs them; then
    each service's login, as compose's ingester and alerting connect."""
    suffix = uuid.uuid4().hex[:8]
    users = {"ingest": f"ingest_{suffix}", "alerting": f"alerting_{suffix}"}
    database = database_url.rsplit("/", 1)[1]
    env = {
        **os.environ,
        "PGHOST": stack.pg_host,
        "PGPORT": str(stack.pg_port),
        "POSTGRES_USER": stack.pg_user,
        "POSTGRES_DB": database,
        "PUMPFLEET_INGEST_DB_USER": users["ingest"],
        "PUMPFLEET_INGEST_DB_PASSWORD": "test-only",
        "PUMPFLEET_ALERTING_DB_USER": users["alerting"],
        "PUMPFLEET_ALERTING_DB_PASSWORD": "test-only",
    }
    script = ROOT / "deploy" / "postgres" / "initdb" / "20-service-logins.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    asyncio.run(schema.migrate(database_url))
    services = _services()
    for service, group in (("ingest", "ingest"), ("alerting", "alerting")):
        url = services[service]["environment"]["PUMPFLEET_DATABASE_URL"]
        assert url.startswith(f"postgresql://pumpfleet_{group}_svc:"), url

    async def check() -> None:
        def connect(role: str) -> Any:
            return asyncpg.connect(
                host=stack.pg_host, port=stack.pg_port, user=users[role], database=database
            )

        ingest = await connect("ingest")
        try:
            await ingest.fetch("SELECT pump_id FROM pumps LIMIT 1")
            await ingest.execute(
                "INSERT INTO dead_letter (topic, payload, reason) VALUES ('t', 'x', 'test')"
            )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await ingest.execute("INSERT INTO pumps (pump_id) VALUES ('X-1')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await ingest.fetch("SELECT * FROM alerts LIMIT 1")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await ingest.execute("CREATE TABLE evil (x int)")
        finally:
            await ingest.close()
        alerting = await connect("alerting")
        try:
            await alerting.fetch("SELECT * FROM alerts LIMIT 1")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await alerting.execute("DELETE FROM alert_history")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await alerting.execute("INSERT INTO pumps (pump_id) VALUES ('X-2')")
        finally:
            await alerting.close()

    asyncio.run(check())
