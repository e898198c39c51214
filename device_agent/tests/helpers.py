"""Test-side tools: a one-pump subscriber, a scripted driver, an agent process or thread, a
mosquitto of a test's own (with an ACL).

Waiting with deadlines, `Received` and `telemetry_fields` come from `pumpfleet.testing`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from device_agent import Agent, Observation
from pumpfleet import contract
from pumpfleet.stack import free_port
from pumpfleet.testing import RecordingSubscriber, wait_until


class ScriptedDriver:
    """Hands out a fixed list of observations as the agent's clock passes their times."""

    def __init__(self, pump_id: str, observations: list[Observation], interval_s: float = 60.0):
        self.pump_id = pump_id
        self.reporting_interval_s = interval_s
        self._pending = sorted(observations, key=lambda o: o.time)

    def advance(self, until: datetime) -> list[Observation]:
        out = [o for o in self._pending if o.time <= until]
        self._pending = self._pending[len(out) :]
        return out

    @property
    def remaining(self) -> int:
        return len(self._pending)


class Subscriber(RecordingSubscriber):
    """Records every message on one pump's topics, decoded with the contract (which must pass).

    `persistent` keeps a broker session (clean_start False), so messages published while this
    subscriber is away (e.g. the broker restarting) are queued for it and arrive later.
    """

    def __init__(
        self, mqtt_url: str, pump_id: str, *, persistent: bool = True, name: str = ""
    ) -> None:
        self.pump_id = pump_id
        super().__init__(
            mqtt_url,
            f"{contract.TOPIC_ROOT}/{pump_id}/#",
            persistent=persistent,
            client_id=f"test-sub-{name}" if name else None,
        )


@contextmanager
def subscriber(mqtt_url: str, pump_id: str, **kw: Any) -> Iterator[Subscriber]:
    """`mqtt_url` carries a reading account, e.g. a stack's `mqtt_url_for("ingest")`."""
    sub = Subscriber(mqtt_url, pump_id, **kw)
    try:
        yield sub
    finally:
        sub.close()


@contextmanager
def agent_thread(agent: Agent, flush_timeout_s: float = 5.0) -> Iterator[threading.Thread]:
    """Run an agent in a thread; stop it cleanly when the block ends (errors re-raised)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            agent.run(poll_s=0.05, flush_timeout_s=flush_timeout_s)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"agent-{agent.pump_id}", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        agent.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "agent thread did not stop"
    if errors:
        raise errors[0]


class AgentProcess:
    """`pumpfleet agent` as a child process, so it can be SIGKILLed like a crashing device."""

    def __init__(self, mqtt_url: str, pump_id: str, state_dir: Path, *args: str) -> None:
        self.state_dir = state_dir
        self.log = state_dir / f"agent-{pump_id}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUMPFLEET_")}
        env.update(
            PUMPFLEET_MQTT__URL=mqtt_url,
            PUMPFLEET_CONFIG=str(state_dir / "none.toml"),
            PUMPFLEET_RUN_DIR=str(state_dir),
        )
        argv = [sys.executable, "-m", "pumpfleet.cli", "--log-level", "DEBUG", "agent"]
        argv += ["--pump-id", pump_id, "--state-dir", str(state_dir), *args]
        state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=state_dir)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def queued_seqs(db: Path) -> list[int]:
    """The seqs in an agent's outbox, read without taking the agent's lock."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return [r[0] for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
        except sqlite3.OperationalError:  # schema not created yet
            return []


def past(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


OWN_USER, OWN_PASSWORD = "agent-test", "agent-test-password"


@contextmanager
def own_broker(tmp_path: Path, acl: str, *conf: str) -> Iterator[int]:
    """A mosquitto of this test's own on a free port, with `acl` as the ACL of its one account
    (OWN_USER / OWN_PASSWORD, no anonymous access) and `conf` as further config lines (no
    persistence); yields its port."""
    port = free_port()
    (tmp_path / "acl").write_text(f"user {OWN_USER}\n{acl}")
    passwd = tmp_path / "passwd"
    made = subprocess.run(
        [
            shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd",
            "-b",
            "-c",
            str(passwd),
            OWN_USER,
            OWN_PASSWORD,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {tmp_path / 'acl'}",
    ]
    lines += [*conf, *(["user root"] if os.geteuid() == 0 else [])]
    (tmp_path / "mosquitto.conf").write_text("\n".join(lines) + "\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with open(tmp_path / "mosquitto.log", "ab") as out:
        proc = subprocess.Popen(
            [binary, "-c", str(tmp_path / "mosquitto.conf")], stdout=out, stderr=out
        )

    def accepting() -> bool:
        assert proc.poll() is None, (tmp_path / "mosquitto.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            return False

    try:
        wait_until(accepting, 10, "mosquitto to accept connections")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
