"""docker-compose.yml cannot run here (no Docker engine); check what can be checked: every file it
mounts exists, and every pumpfleet command it runs parses with the real CLI."""

from __future__ import annotations

from pathlib import Path

import yaml

from pumpfleet.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_compose_mounts_exist_and_commands_parse() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"timescaledb", "mosquitto", "migrate", "ingest"} <= set(services)
    assert "timescaledb" in services["timescaledb"]["image"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        if svc.get("build") == ".":
            args = build_parser().parse_args(svc["command"])
            assert args.handler is not None, f"{name}: {svc['command']} is no pumpfleet command"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for part in ("pumpfleet", "device_agent", "ingest", "sim_fleet", "dashboards"):
        assert f"COPY {part} ./{part}" in dockerfile
