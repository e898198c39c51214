"""The one process helper behind the stack and the Alertmanager runner, and the one mosquitto
configuration: fast tests with small Python processes standing in for the servers."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pumpfleet import _process
from pumpfleet import stack as stack_mod

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent

# A server that takes its port from argv, says it is up and ignores SIGTERM when told to.
_SERVER = """
import signal, socket, sys, time
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
print("up", flush=True)
time.sleep(120)
"""


def _server(tmp_path: Path, port: int, mode: str = "polite") -> list[str]:
    script = tmp_path / "server.py"
    script.write_text(_SERVER)
    return [sys.executable, str(script), str(port), mode]


def test_a_server_is_started_waited_for_and_stopped_with_its_log(tmp_path: Path) -> None:
    port = _process.free_port(HOST)
    log = tmp_path / "server.log"
    proc = _process.spawn(_server(tmp_path, port), log, tmp_path)
    _process.wait_ready(proc, lambda: _process.accepts_tcp(HOST, port), "server", log, 20)
    assert _process.alive(proc.pid, "server.py")
    assert not _process.port_free(HOST, port)
    _process.stop(proc.pid, "server.py", 10)
    assert not _process.alive(proc.pid, "server.py")
    assert proc.poll() is not None, "reaped, not a zombie"
    assert "up" in log.read_text()


def test_one_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    port = _process.free_port(HOST)
    log = tmp_path / "server.log"
    proc = _process.spawn(_server(tmp_path, port, "stubborn"), log, tmp_path)
    _process.wait_ready(proc, lambda: _process.accepts_tcp(HOST, port), "server", log, 20)
    _process.stop(proc.pid, "server.py", 0.3)
    assert proc.poll() == -9
    assert _process.port_free(HOST, port)


def test_a_server_that_exits_while_starting_says_so_in_one_line(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc = _process.spawn([sys.executable, "-c", "raise SystemExit(3)"], log, tmp_path)
    with pytest.raises(_process.ExitedEarly, match=r"^server exited with status 3 while starting"):
        _process.wait_ready(proc, lambda: False, "server", log, 20)


def test_a_server_that_never_answers_fails_at_the_deadline(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc = _process.spawn([sys.executable, "-c", "import time; time.sleep(60)"], log, tmp_path)
    try:
        with pytest.raises(_process.StackError, match="did not become ready within 0s"):
            _process.wait_ready(proc, lambda: False, "server", log, 0.2)
    finally:
        _process.stop(proc.pid, "python", 5)
    assert proc.poll() is not None


def test_a_lost_port_race_is_tried_again_on_a_fresh_port() -> None:
    """Another process binds the port between our look and the server's bind: a fresh port.
    An early exit with the port still free is the server's own fault: not tried again."""
    taken: list[socket.socket] = []
    tried: list[int] = []

    def start(port: int) -> str:
        tried.append(port)
        if len(tried) == 1:
            thief = socket.socket()
            thief.bind((HOST, port))
            thief.listen()
            taken.append(thief)
            raise _process.ExitedEarly("server exited with status 1 while starting")
        return "started"

    try:
        port, result = _process.start_on_free_port(start, HOST)
    finally:
        for sock in taken:
            sock.close()
    assert result == "started" and port == tried[1] != tried[0]

    calls = 0

    def broken(port: int) -> str:
        nonlocal calls
        calls += 1
        raise _process.ExitedEarly("server exited with status 2 while starting")

    with pytest.raises(_process.ExitedEarly, match="status 2"):
        _process.start_on_free_port(broken, HOST)
    assert calls == 1


def test_the_preferred_port_is_used_when_free() -> None:
    preferred = _process.free_port(HOST)
    port, _ = _process.start_on_free_port(lambda p: p, HOST, preferred=preferred)
    assert port == preferred
    port, _ = _process.start_on_free_port(lambda p: p, HOST, preferred=preferred, avoid=preferred)
    assert port != preferred


def _settings(text: str) -> list[tuple[str, str]]:
    """(key, value) in order: a listener's options follow its `listener` line."""
    pairs = (line.split(maxsplit=1) for line in text.splitlines() if line and line[0] != "#")
    return [(key, value) for key, value in pairs]


LOCAL_KEYS = {
    "listener",
    "cafile",
    "certfile",
    "keyfile",
    "plugin",
    "plugin_opt_config_file",
    "persistence_location",
    "log_dest",
}


def test_the_local_broker_runs_deploys_configuration_with_its_own_ports_and_paths(
    tmp_path: Path,
) -> None:
    deployed = _settings((ROOT / "deploy" / "mosquitto.conf").read_text())
    rendered = _settings(stack_mod._mosquitto_conf(tmp_path, (18830, 18831, 18832)))
    rendered = [(k, v) for k, v in rendered if k != "user"]  # `user root` when run as root
    assert [k for k, _ in rendered] == [k for k, _ in deployed]  # same options, same order
    local = dict(rendered)
    assert [v for k, v in rendered if k == "listener"] == [
        f"18830 {HOST}",
        f"18831 {HOST}",
        f"18832 {HOST}",
    ]
    assert local["persistence_location"] == f"{tmp_path / 'mosquitto'}/"
    assert local["log_dest"] == f"file {tmp_path / 'mosquitto.log'}"
    assert local["plugin_opt_config_file"] == str(tmp_path / "mosquitto" / "dynamic-security.json")
    assert Path(local["plugin"]).is_file()
    assert {v for k, v in rendered if k == "certfile"} == {str(tmp_path / "tls" / "server.crt")}
    for (key, value), (_, shipped) in zip(rendered, deployed, strict=True):
        if key not in LOCAL_KEYS:
            assert value == shipped, key  # everything else exactly as deployed
    deployed_settings = dict(deployed)
    assert deployed_settings["allow_anonymous"] == "false"
    assert deployed_settings["max_queued_messages"] == "10000000"  # not mosquitto's 1000
