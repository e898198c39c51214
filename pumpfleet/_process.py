"""Local server processes (mosquitto, PostgreSQL, Alertmanager): start one with its log file,
wait until it answers, stop it with SIGTERM and then SIGKILL. One helper for the stack and the
Alertmanager runner.

Servers run in a session of their own, so Ctrl-C in the caller's terminal does not reach them
and the stack outlives the command that started it; they are therefore stopped by pid (a later
`pumpfleet stack down` reads it from the state file), not through the object that started them.
That, and PostgreSQL running as another user when we are root, is why this is not mirakuru,
whose executors own the process they start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tenacity import (
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_fixed,
)

__all__ = [
    "ExitedEarly",
    "StackError",
    "accepts_tcp",
    "alive",
    "free_port",
    "poll_until",
    "port_free",
    "spawn",
    "start_on_free_port",
    "stop",
    "wait_ready",
]

T = TypeVar("T")

KILL_WAIT_S = 10.0
"""How long a SIGKILLed process may take to be gone."""

# Servers started by this process: polled so they are reaped, not left as zombies that still
# answer os.kill(pid, 0).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(Exception):
    """A problem the user can fix; the message is one line that says how."""


class ExitedEarly(StackError):
    """The server exited while starting, often because another process took its port."""


def free_port(host: str) -> int:
    """A port nobody listens on right now; another process may still take it before we do."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind `port`. SO_REUSEADDR like the servers themselves: only a
    listener, not TIME_WAIT, blocks them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def accepts_tcp(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on `port`."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def spawn(
    argv: list[str],
    log: Path,
    cwd: Path,
    *,
    env: Mapping[str, str] | None = None,
    user: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session, its output appended to `log`; `user` is (uid, gid)."""
    extra: dict[str, Any] = {}
    if user is not None:
        extra = {"user": user[0], "group": user[1], "extra_groups": []}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            **extra,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    name: str,
    log: Path,
    timeout: float,
    poll_s: float = 0.05,
) -> None:
    """Until `ready()` says yes while `proc` still runs, for at most `timeout` seconds.

    Raises ExitedEarly if the server exits first, StackError if the deadline passes."""

    def probe() -> bool:
        if proc.poll() is not None:
            _CHILDREN.pop(proc.pid, None)
            raise ExitedEarly(
                f"{name} exited with status {proc.returncode} while starting; read {log}"
            )
        return ready() and proc.poll() is None  # not someone else answering on our port

    if not poll_until(probe, timeout, poll_s):
        raise StackError(f"{name} did not become ready within {timeout:.0f}s; read {log}")


def poll_until(condition: Callable[[], bool], timeout: float, poll_s: float = 0.05) -> bool:
    """Ask `condition` every `poll_s` until it says yes (True) or `timeout` passes (False).
    An exception from `condition` ends the wait at once."""
    polling = Retrying(
        stop=stop_after_delay(max(0.0, timeout)),
        wait=wait_fixed(poll_s),
        retry=retry_if_result(lambda ok: not ok),
        retry_error_callback=lambda _state: False,
    )
    done: bool = polling(condition)
    return done


def start_on_free_port(
    start: Callable[[int], T],
    host: str,
    *,
    preferred: int | None = None,
    avoid: int | None = None,
    attempts: int = 3,
) -> tuple[int, T]:
    """`start(port)` on `preferred` if it is free, else on a fresh port. Between our look and
    the server's bind another process may take the port: that lost race (the server exited
    and the port is taken now) is tried again on a fresh port; any other early exit is not."""
    tried: list[int] = []

    def next_port() -> int:
        if not tried and preferred and preferred != avoid and port_free(host, preferred):
            return preferred
        while True:
            port = free_port(host)
            if port != avoid and port not in tried:
                return port

    def attempt() -> tuple[int, T]:
        port = next_port()
        tried.append(port)
        return port, start(port)

    def lost_race(exc: BaseException) -> bool:
        return isinstance(exc, ExitedEarly) and not port_free(host, tried[-1])

    starting = Retrying(
        stop=stop_after_attempt(attempts), retry=retry_if_exception(lost_race), reraise=True
    )
    return starting(attempt)


def alive(pid: int | None, name: str) -> bool:
    """Whether `pid` is a live `name` process; a stale state file may name a reused pid."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():
        return True  # no procfs: trust the pid
    try:
        status_line = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    if status_line.rpartition(")")[2].split()[0] in ("Z", "X"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return name.encode() in cmdline


def stop(pid: int | None, name: str, timeout: float) -> None:
    """SIGTERM, then SIGKILL (to its whole session, so no child is left) if it has not gone by
    the deadline."""
    if pid is None or not alive(pid, name):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, name, timeout):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # a session leader from `spawn`: its children go too
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, name, KILL_WAIT_S)


def _wait_gone(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    child = _CHILDREN.get(pid)
    if child is not None:  # our own child: wait() reaps it as well
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
    return poll_until(lambda: not alive(pid, name), deadline - time.monotonic(), 0.02)
