"""`pumpfleet sim ...`: the commands end to end, and one-line errors for what a user gets wrong."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pumpfleet.cli import main
from pumpfleet.stack import StackInfo, free_port

SMALL = """
name: small
seed: 3
duration: 2h
speed: 14400
fleet: {n: 3, mix: {reporting_interval_s: 300}}
timeline:
  - {pump: 1, at: 30m, type: message_loss, params: {duration_h: 1, share: 1.0}}
"""


def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings pointing at a broker and a database nobody runs."""
    monkeypatch.setenv("PUMPFLEET_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("PUMPFLEET_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PUMPFLEET_MQTT__URL", f"mqtt://127.0.0.1:{free_port()}")
    monkeypatch.setenv("PUMPFLEET_DATABASE_URL", f"postgresql://x@127.0.0.1:{free_port()}/x")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "no-such-scenario"], "no scenario file 'no-such-scenario'; give a path or one of"),
        (["run", "faults"], "cannot connect to the MQTT broker at mqtt://127.0.0.1"),
        (["run", "faults", "--check"], "cannot reach the database"),
        (["register", "faults"], "cannot reach the database"),
        (["register", "nosuch"], "no scenario file"),
        (["run", "faults", "--inflight", "70000"], "--inflight in 1..65535"),
        (["load", "--inflight", "70000"], "--inflight must be in 1..65535"),
        (["load", "--pumps", "2", "--processes", "2", "--connections", "2"], "more connections"),
        (["load", "--pumps", "5", "--rate", "100", "--duration", "1"], "cannot connect"),
    ],
)
def test_user_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    message: str,
) -> None:
    offline(monkeypatch, tmp_path)
    assert main(["sim", *argv]) == 2
    *logs, error = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("pumpfleet: ") and message in error
    assert all(line.startswith("ts=") for line in logs), logs  # log lines, no traceback


def command(broker: StackInfo, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUMPFLEET_")}
    env.update(
        PUMPFLEET_MQTT__URL=broker.mqtt_url_for("fleet"),
        PUMPFLEET_CONFIG=str(tmp_path / "none.toml"),
        PUMPFLEET_RUN_DIR=str(tmp_path),
    )
    return subprocess.run(
        [sys.executable, "-m", "pumpfleet.cli", "sim", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def number(label: str, text: str) -> int:
    match = re.search(rf"^{label}\s+([\d,]+)", text, re.M)
    assert match, f"no {label!r} line in:\n{text}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.integration
def test_sim_run_command_reports_what_it_sent(broker: StackInfo, tmp_path: Path) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    done = command(broker, tmp_path, "run", str(scenario))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "sim run small: 3 pumps" in out and "(2h) at 14400x" in out
    observations, published = number("observations", out), number("published", out)
    assert number("acknowledged", out) == published > 0
    lost = int(re.search(r"lost on purpose (\d+)", out).group(1))  # type: ignore[union-attr]
    assert lost >= 10 and published == observations - lost
    assert 'event="sim run starting"' in done.stderr


@pytest.mark.integration
def test_sim_load_command_acknowledges_everything_it_sent(
    broker: StackInfo, tmp_path: Path
) -> None:
    prefix = f"LC{uuid.uuid4().hex[:6]}"
    done = command(
        broker, tmp_path, "load", "--pumps", "20", "--rate", "500", "--duration", "1",
        "--processes", "1", "--connections", "1", "--id-prefix", prefix,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert number("sent", out) == 500 and number("acknowledged", out) == 500
    assert number("failed", out) == 0 and "latency       publish -> PUBACK p50" in out
    assert "us per simulated pump per second" in out and "B per pump" in out
