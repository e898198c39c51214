"""A local mosquitto + PostgreSQL stack run from the installed binaries, without Docker.

Used by `pumpfleet stack up|down|status`, the test fixtures, benchmarks and the demo. Both servers
run detached (their own session, started and stopped through `pumpfleet._process`) so the stack
outlives the command that started it; `stack.json` in the run directory records where they are,
and `pumpfleet.settings` reads it to find them. Mosquitto's configuration is
pumpfleet/deploy/mosquitto.conf, shipped in the package (deploy/mosquitto.conf links to it), the
file docker-compose mounts, with this stack's ports and paths put in.

Authentication is on, as everywhere: the broker runs mosquitto's dynamic-security plugin with
the service accounts of `pumpfleet.brokerauth` (passwords made at the first `up`, kept 0600 in
`broker-accounts.json`), and pumps get accounts of their own through `pumpfleet pumps provision`.
Next to the plain loopback listener there is a TLS listener and one that also requires a client
certificate, both with a development CA made in `tls/` (`pumpfleet.devca`). PostgreSQL has a
login per service (`<group>_local`, e.g. `pumpfleet_ingest_local`), in the groups the migrations
grant; `StackInfo.env_for(service)` gives a service its own database login and broker account.

PostgreSQL refuses to run as root. As root we run it as the `postgres` user; when that user cannot
reach the run directory (e.g. under pytest's 0700 `/tmp/pytest-of-root`), its data directory lives
in a separate directory owned by it, and `postgres.location` in the run directory points there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import grp
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pumpfleet import _process, brokerauth, devca
from pumpfleet._process import StackError

__all__ = [
    "ServiceStatus",
    "StackError",
    "StackInfo",
    "StackStatus",
    "create_database",
    "down",
    "drop_database",
    "free_port",
    "load",
    "running_stack",
    "start_broker",
    "start_database",
    "status",
    "stop_broker",
    "stop_database",
    "up",
]

DEFAULT_RUN_DIR = Path(".pumpfleet")
HOST = "127.0.0.1"
PG_USER = "pumpfleet"
PG_DATABASE = "pumpfleet"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0

_STATE_FILE = "stack.json"
_LOCK_FILE = "stack.lock"
_PG_LOCATION_FILE = "postgres.location"
_MOSQUITTO_CONF = "mosquitto.conf"
_MOSQUITTO_LOG = "mosquitto.log"
_MOSQUITTO_DATA = "mosquitto"
_POSTGRES_LOG = "postgres.log"
_POSTGRES_DATA = "postgres"
_ACCOUNTS_FILE = "broker-accounts.json"
_DYNSEC_FILE = "dynamic-security.json"
_TLS_DIR = "tls"
_STATE_VERSION = 2

SERVICES = {
    # service -> (broker account or None, database group or None: the owner)
    "ingest": ("ingest", "pumpfleet_ingest"),
    "alerting": (None, "pumpfleet_alerting"),
    "fleet": ("fleet", None),
    "reader": (None, "pumpfleet_reader"),
    "admin": ("admin", None),
}
"""What each service of the local stack logs in as."""

# Looked in after PATH: Debian keeps mosquitto in sbin and the server binaries of PostgreSQL out
# of PATH. Module attributes so tests can hide them.
_MOSQUITTO_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
_PG_BIN_GLOBS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
)
_PG_TOOLS = ("initdb", "postgres", "pg_ctl", "pg_isready", "psql")
_MOSQUITTO_HINT = "mosquitto not found: install it with `apt-get install mosquitto`"
_POSTGRES_HINT = (
    "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found: "
    "install them with `apt-get install postgresql`"
)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_MOSQUITTO_TEMPLATE = Path(__file__).resolve().parent / "deploy" / "mosquitto.conf"
"""The broker's one configuration, shipped in the package: docker-compose mounts it (through the
link deploy/mosquitto.conf), the local stack renders it."""


@dataclass(frozen=True)
class StackInfo:
    """Where a running stack listens; enough to connect, nothing about processes."""

    run_dir: Path
    mqtt_host: str
    mqtt_port: int
    pg_host: str
    pg_port: int
    pg_user: str
    pg_database: str
    mqtts_port: int = 0
    mqtt_mtls_port: int = 0
    mqtt_passwords: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def mqtt_url(self) -> str:
        """Where the broker listens, without credentials (it admits no anonymous client)."""
        return f"mqtt://{self.mqtt_host}:{self.mqtt_port}"

    @property
    def mqtts_url(self) -> str:
        """The TLS listener; verify it with `tls_ca`."""
        return f"mqtts://localhost:{self.mqtts_port}"

    @property
    def mqtt_mtls_url(self) -> str:
        """The TLS listener that also requires a client certificate from the `tls_ca`."""
        return f"mqtts://localhost:{self.mqtt_mtls_port}"

    @property
    def tls_ca(self) -> Path:
        return self.run_dir / _TLS_DIR / "ca.crt"

    @property
    def dev_ca(self) -> devca.DevCA:
        return devca.DevCA(self.run_dir / _TLS_DIR)

    def mqtt_url_for(self, account: str, *, tls: bool = False) -> str:
        """The broker URL with a service account's credentials (`brokerauth.ACCOUNTS`)."""
        try:
            user = brokerauth.ACCOUNTS[account]
            password = self.mqtt_passwords[account]
        except KeyError:
            raise StackError(
                f"no broker account {account!r} in {self.run_dir}; "
                f"the stack has {', '.join(sorted(self.mqtt_passwords)) or 'none'}"
            ) from None
        where = self.mqtts_url if tls else self.mqtt_url
        scheme, rest = where.split("://", 1)
        return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{rest}"

    def database_login(self, service: str) -> str:
        """The database login of a service (the owner for one without a group)."""
        group = SERVICES[service][1]
        return f"{group}_local" if group else self.pg_user

    def database_url_as(self, service: str, database: str | None = None) -> str:
        login = self.database_login(service)
        return f"postgresql://{login}@{self.pg_host}:{self.pg_port}/{database or self.pg_database}"

    def env_for(self, service: str, database: str | None = None) -> dict[str, str]:
        """Variables for a service's process: its own database login and broker account."""
        if service not in SERVICES:
            raise StackError(f"no service {service!r}: use one of {', '.join(SERVICES)}")
        account, _ = SERVICES[service]
        env = {"PUMPFLEET_DATABASE_URL": self.database_url_as(service, database)}
        env["PUMPFLEET_MQTT__URL"] = self.mqtt_url_for(account) if account else self.mqtt_url
        return env

    @property
    def database_url(self) -> str:
        return self.database_url_for(self.pg_database)

    def database_url_for(self, database: str) -> str:
        return f"postgresql://{self.pg_user}@{self.pg_host}:{self.pg_port}/{database}"

    def to_env(self) -> dict[str, str]:
        """Variables for an operator's child processes, spelled as `pumpfleet.settings` reads
        them: the database owner and the ingest account (tests, benchmarks). A service of the
        demo or the soak gets `env_for(service)` instead, its own logins."""
        return {
            "PUMPFLEET_DATABASE_URL": self.database_url,
            "PUMPFLEET_MQTT__URL": self.mqtt_url_for("ingest"),
        }


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    port: int | None
    url: str | None
    log: Path

    def line(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "stopped"
        where = self.url or "-"
        return f"{self.name:<11} {state:<22} {where}  log {self.log}"


@dataclass(frozen=True)
class StackStatus:
    run_dir: Path
    mqtt: ServiceStatus
    postgres: ServiceStatus

    @property
    def running(self) -> bool:
        return self.mqtt.running and self.postgres.running

    def lines(self) -> list[str]:
        return [self.mqtt.line(), self.postgres.line(), f"{'run dir':<11} {self.run_dir}"]

    def to_dict(self) -> dict[str, Any]:
        def service(s: ServiceStatus) -> dict[str, Any]:
            return {
                "running": s.running,
                "pid": s.pid,
                "port": s.port,
                "url": s.url,
                "log": str(s.log),
            }

        return {
            "run_dir": str(self.run_dir),
            "running": self.running,
            "mqtt": service(self.mqtt),
            "postgres": service(self.postgres),
        }


# public API -------------------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now; another process may still take it before we do."""
    return _process.free_port(host)


def up(run_dir: Path = DEFAULT_RUN_DIR, *, timeout: float = START_TIMEOUT_S) -> StackInfo:
    """Start what is not running and return where it listens; a running stack is left alone.

    A server that is not running restarts on its recorded port when that is free, so URLs that
    were handed out stay valid; otherwise it gets a fresh port.
    """
    run_dir = Path(run_dir).absolute()
    mosquitto = _find_mosquitto()
    pg_bin = _find_pg_bin()
    account = _postgres_account()
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir):
        state = _read_state(run_dir) or {}
        mqtt_alive = _process.alive(state.get("mqtt_pid"), "mosquitto")
        pg_alive = _process.alive(state.get("pg_pid"), "postgres")
        if state and mqtt_alive and pg_alive:
            return _info(state)
        data_dir = _pg_data_dir(run_dir, account, state.get("pg_data_dir"))
        started: list[Callable[[], None]] = []
        try:
            if not pg_alive:
                port, pid = _process.start_on_free_port(
                    lambda p: _start_postgres(pg_bin, data_dir, run_dir, p, account, timeout),
                    HOST,
                    preferred=state.get("pg_port"),
                )
                state.update(pg_port=port, pg_pid=pid)
                started.append(
                    functools.partial(_stop_postgres, pg_bin, data_dir, pid, account, timeout)
                )
                _ensure_database(pg_bin, port, PG_DATABASE)
                _ensure_logins(pg_bin, port)
            if not mqtt_alive:
                _ensure_broker_files(run_dir)
                tls_ports = _tls_ports(state, avoid={state["pg_port"]})
                port, pid = _process.start_on_free_port(
                    lambda p: _start_mosquitto(mosquitto, run_dir, (p, *tls_ports), timeout),
                    HOST,
                    preferred=state.get("mqtt_port"),
                    avoid=state["pg_port"],
                )
                state.update(
                    mqtt_port=port,
                    mqtt_pid=pid,
                    mqtts_port=tls_ports[0],
                    mqtt_mtls_port=tls_ports[1],
                )
                started.append(functools.partial(_process.stop, pid, "mosquitto", timeout))
        except BaseException:
            for stop in reversed(started):
                with contextlib.suppress(Exception):
                    stop()
            raise
        state.update(
            version=_STATE_VERSION,
            run_dir=str(run_dir),
            mqtt_host=HOST,
            pg_host=HOST,
            pg_user=PG_USER,
            pg_database=PG_DATABASE,
            pg_data_dir=str(data_dir),
            pg_bin_dir=str(pg_bin),
            mosquitto_bin=str(mosquitto),
            mosquitto_log=str(run_dir / _MOSQUITTO_LOG),
            postgres_log=str(run_dir / _POSTGRES_LOG),
        )
        _write_state(run_dir, state)
        return _info(state)


def down(
    run_dir: Path = DEFAULT_RUN_DIR, *, purge: bool = False, timeout: float = STOP_TIMEOUT_S
) -> None:
    """Stop both servers and forget the state file; `purge` also deletes broker and database data.

    Mosquitto gets SIGTERM so it writes its persistence file; PostgreSQL a fast shutdown.
    """
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        return
    with _locked(run_dir):
        state = _read_state(run_dir) or {}
        _process.stop(state.get("mqtt_pid"), "mosquitto", timeout)
        data_dir = _known_pg_data_dir(run_dir, state)
        pg_bin = Path(state["pg_bin_dir"]) if "pg_bin_dir" in state else _find_pg_bin_or_none()
        if data_dir is not None and pg_bin is not None:
            _stop_postgres(pg_bin, data_dir, state.get("pg_pid"), _postgres_account(), timeout)
        else:
            _process.stop(state.get("pg_pid"), "postgres", timeout)
        (run_dir / _STATE_FILE).unlink(missing_ok=True)
        if purge:
            if data_dir is not None:
                shutil.rmtree(data_dir, ignore_errors=True)
            for name in (_MOSQUITTO_DATA, _POSTGRES_DATA):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            shutil.rmtree(run_dir / _TLS_DIR, ignore_errors=True)
            for name in (
                _PG_LOCATION_FILE,
                _MOSQUITTO_CONF,
                _MOSQUITTO_LOG,
                _POSTGRES_LOG,
                _ACCOUNTS_FILE,
            ):
                (run_dir / name).unlink(missing_ok=True)
    if purge:
        (run_dir / _LOCK_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if nothing else of the user's is in it


def status(run_dir: Path = DEFAULT_RUN_DIR) -> StackStatus:
    """What runs, from the state file checked against the live processes."""
    run_dir = Path(run_dir).absolute()
    state = _read_state(run_dir) or {}
    mqtt_pid, pg_pid = state.get("mqtt_pid"), state.get("pg_pid")
    mqtt_port, pg_port = state.get("mqtt_port"), state.get("pg_port")
    info = _info(state) if state else None
    return StackStatus(
        run_dir=run_dir,
        mqtt=ServiceStatus(
            name="mosquitto",
            running=_process.alive(mqtt_pid, "mosquitto"),
            pid=mqtt_pid,
            port=mqtt_port,
            url=info.mqtt_url if info else None,
            log=run_dir / _MOSQUITTO_LOG,
        ),
        postgres=ServiceStatus(
            name="postgresql",
            running=_process.alive(pg_pid, "postgres"),
            pid=pg_pid,
            port=pg_port,
            url=info.database_url if info else None,
            log=run_dir / _POSTGRES_LOG,
        ),
    )


def load(run_dir: Path = DEFAULT_RUN_DIR) -> StackInfo | None:
    """The running stack in `run_dir`, or None when there is none or a server has died."""
    state = _read_state(Path(run_dir).absolute())
    if not state:
        return None
    if _process.alive(state.get("mqtt_pid"), "mosquitto") and _process.alive(
        state.get("pg_pid"), "postgres"
    ):
        return _info(state)
    return None


@contextlib.contextmanager
def running_stack(run_dir: Path, *, purge: bool = False) -> Iterator[StackInfo]:
    """A stack for the duration of a block, stopped however the block ends: a SIGTERM to a
    process that left SIGTERM at its default (a benchmark script, `timeout`, a CI runner) ends
    the block like Ctrl-C does, so the stack goes down with it instead of staying behind."""
    restore = _sigterm_as_exit()
    try:
        info = up(run_dir)
        try:
            yield info
        finally:
            down(run_dir, purge=purge)
    finally:
        restore()


def _sigterm_as_exit() -> Callable[[], None]:
    """SIGTERM raises SystemExit(143) (cleanup runs) while the returned callable is not called;
    a no-op off the main thread or where the process handles SIGTERM itself."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    def _restore() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, _exit)
    return _restore


def stop_broker(info: StackInfo, *, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop mosquitto cleanly (it saves queued messages), keeping the rest of the stack."""
    with _locked(info.run_dir):
        state = _require_state(info)
        _process.stop(state.get("mqtt_pid"), "mosquitto", timeout)
        state["mqtt_pid"] = None
        _write_state(info.run_dir, state)


def start_broker(info: StackInfo, *, timeout: float = START_TIMEOUT_S) -> None:
    """Start mosquitto again on the same port with the same persistence file."""
    with _locked(info.run_dir):
        state = _require_state(info)
        if _process.alive(state.get("mqtt_pid"), "mosquitto"):
            return
        _require_free(info.mqtt_port, "mosquitto", info.run_dir / _MOSQUITTO_LOG)
        mosquitto = Path(state.get("mosquitto_bin") or _find_mosquitto())
        ports = (info.mqtt_port, info.mqtts_port, info.mqtt_mtls_port)
        state["mqtt_pid"] = _start_mosquitto(mosquitto, info.run_dir, ports, timeout)
        _write_state(info.run_dir, state)


def stop_database(info: StackInfo, *, timeout: float = STOP_TIMEOUT_S, mode: str = "fast") -> None:
    """Stop PostgreSQL, keeping its data and the broker: `fast` cuts open sessions and
    checkpoints; `immediate` is a crash (no checkpoint, recovery at the next start)."""
    if mode not in ("fast", "immediate"):
        raise ValueError(f"shutdown mode {mode!r}: use 'fast' or 'immediate'")
    with _locked(info.run_dir):
        state = _require_state(info)
        _stop_postgres(
            Path(state["pg_bin_dir"]),
            Path(state["pg_data_dir"]),
            state.get("pg_pid"),
            _postgres_account(),
            timeout,
            mode,
        )
        state["pg_pid"] = None
        _write_state(info.run_dir, state)


def start_database(info: StackInfo, *, timeout: float = START_TIMEOUT_S) -> None:
    """Start PostgreSQL again on the same port and data directory."""
    with _locked(info.run_dir):
        state = _require_state(info)
        if _process.alive(state.get("pg_pid"), "postgres"):
            return
        _require_free(info.pg_port, "postgres", info.run_dir / _POSTGRES_LOG)
        state["pg_pid"] = _start_postgres(
            Path(state["pg_bin_dir"]),
            Path(state["pg_data_dir"]),
            info.run_dir,
            info.pg_port,
            _postgres_account(),
            timeout,
        )
        _write_state(info.run_dir, state)


def pause_database(info: StackInfo) -> list[int]:
    """SIGSTOP the postmaster and every backend (a host frozen, not a server down): sockets
    stay open and nothing answers. Returns the paused pids; `resume_database` undoes it."""
    with _locked(info.run_dir):
        pid = _require_state(info).get("pg_pid")
    if not _process.alive(pid, "postgres"):
        raise StackError("PostgreSQL is not running; start it with `pumpfleet stack up`")
    assert pid is not None
    pids = [pid, *_children(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    return pids


def resume_database(pids: list[int]) -> None:
    """SIGCONT what `pause_database` stopped."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (PostgreSQL's backends are the postmaster's)."""
    found = []
    for proc_stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = proc_stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(proc_stat.parent.name))
    return found


def create_database(info: StackInfo, name: str) -> str:
    """Create an empty database (e.g. one per test) and return its URL."""
    _check_identifier(name)
    _psql(_pg_bin_for(info), info.pg_port, f'CREATE DATABASE "{name}"')
    return info.database_url_for(name)


def drop_database(info: StackInfo, name: str) -> None:
    """Drop a database even while clients are still connected to it."""
    _check_identifier(name)
    _psql(_pg_bin_for(info), info.pg_port, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# binaries and accounts --------------------------------------------------------------------------


def _find_mosquitto() -> Path:
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path=os.pathsep.join(_MOSQUITTO_DIRS)
    )
    if not found:
        raise StackError(_MOSQUITTO_HINT)
    return Path(found)


def _has_pg_tools(directory: Path) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in _PG_TOOLS)


def _find_pg_bin_or_none() -> Path | None:
    # PATH first (a deliberate choice of version), then the newest installed major version.
    on_path = shutil.which("initdb")
    if on_path and _has_pg_tools(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    candidates: list[Path] = []
    for pattern in _PG_BIN_GLOBS:
        root = Path(pattern).anchor
        candidates += [p for p in Path(root).glob(pattern.lstrip("/")) if _has_pg_tools(p)]

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", str(path))) or (0,)

    return max(candidates, key=version, default=None)


def _find_pg_bin() -> Path:
    found = _find_pg_bin_or_none()
    if found is None:
        raise StackError(_POSTGRES_HINT)
    return found


def _pg_bin_for(info: StackInfo) -> Path:
    state = _read_state(info.run_dir) or {}
    return Path(state["pg_bin_dir"]) if "pg_bin_dir" in state else _find_pg_bin()


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int
    home: str


def _postgres_account() -> _Account | None:
    """The user PostgreSQL runs as, or None to run it as ourselves (it refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "PostgreSQL will not run as root and there is no `postgres` user: run as a normal "
            "user, or create it with `apt-get install postgresql`"
        ) from None
    return _Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def _can_traverse(path: Path, account: _Account) -> bool:
    """Whether `account` can reach `path`: each directory on the way needs its x bit."""
    gids = {account.gid} | {g.gr_gid for g in grp.getgrall() if account.name in g.gr_mem}
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _known_pg_data_dir(run_dir: Path, state: dict[str, Any]) -> Path | None:
    if "pg_data_dir" in state:
        return Path(state["pg_data_dir"])
    pointer = run_dir / _PG_LOCATION_FILE
    if pointer.is_file():
        return Path(pointer.read_text().strip())
    local = run_dir / _POSTGRES_DATA
    return local if local.is_dir() else None


def _pg_data_dir(run_dir: Path, account: _Account | None, recorded: str | None) -> Path:
    """Where PostgreSQL keeps its data: in the run dir when its user can reach it, else beside.

    A separate directory (recorded in `postgres.location`) beats loosening the permissions of
    directories we do not own, such as /root or pytest's 0700 base directory.
    """
    pointer = run_dir / _PG_LOCATION_FILE
    if recorded:
        data = Path(recorded)
    elif pointer.is_file():
        data = Path(pointer.read_text().strip())
    elif account is None or _can_traverse(run_dir.resolve(), account):
        data = run_dir / _POSTGRES_DATA
    else:
        bases = [tempfile.gettempdir(), "/var/tmp", "/tmp"]
        base = next((b for b in bases if _can_traverse(Path(b).resolve(), account)), None)
        if base is None:
            raise StackError(
                f"user {account.name} cannot reach {run_dir} nor a temporary directory: "
                "use a run directory every user can traverse"
            )
        data = Path(tempfile.mkdtemp(prefix="pumpfleet-pgdata-", dir=base))
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(f"{data}\n")
        tmp.replace(pointer)
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if account is not None:
        os.chown(data, account.uid, account.gid)
    data.chmod(0o700)
    return data


# processes --------------------------------------------------------------------------------------


def _clean_env(account: _Account | None = None) -> dict[str, str]:
    # libpq and the server read PG* variables; a developer's own settings must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    if account is not None:
        env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
    return env


def _run(
    argv: list[str], account: _Account | None, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    extra: dict[str, Any] = {}
    if account is not None:
        extra = {"user": account.uid, "group": account.gid, "extra_groups": []}
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_clean_env(account),
        timeout=timeout,
        check=False,
        **extra,
    )


def _require_free(port: int, name: str, log: Path) -> None:
    if not _process.port_free(HOST, port):
        raise StackError(f"cannot start {name}: port {port} on {HOST} is in use (log: {log})")


# mosquitto --------------------------------------------------------------------------------------


_DYNSEC_PLUGINS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)


def _dynsec_plugin() -> str:
    for path in _DYNSEC_PLUGINS:
        if Path(path).is_file():
            return path
    raise StackError(
        "mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) not found: "
        "install Debian's mosquitto 2.x with `apt-get install mosquitto`"
    )


def _mosquitto_conf(run_dir: Path, ports: tuple[int, int, int]) -> str:
    """deploy/mosquitto.conf (what docker-compose runs, and why each setting) with this stack's
    listeners, plugin, certificates, persistence directory and log file in place of the
    container's. Each value replaced is replaced in order (three `listener` lines: plain, TLS,
    TLS with client certificates)."""
    try:
        template = _MOSQUITTO_TEMPLATE.read_text()
    except OSError:
        raise StackError(
            f"{_MOSQUITTO_TEMPLATE} not found: reinstall pumpfleet (the package ships it)"
        ) from None
    ca = devca.DevCA(run_dir / _TLS_DIR)
    local: dict[str, list[str]] = {
        "listener": [f"{ports[0]} {HOST}", f"{ports[1]} {HOST}", f"{ports[2]} {HOST}"],
        "cafile": [str(ca.ca_cert)] * 2,
        "certfile": [str(ca.server_cert)] * 2,
        "keyfile": [str(ca.server_key)] * 2,
        "plugin": [_dynsec_plugin()],
        "plugin_opt_config_file": [str(run_dir / _MOSQUITTO_DATA / _DYNSEC_FILE)],
        "persistence_location": [f"{run_dir / _MOSQUITTO_DATA}/"],
        "log_dest": [f"file {run_dir / _MOSQUITTO_LOG}"],
    }
    lines = [
        f"# Written by `pumpfleet stack up` from {_MOSQUITTO_TEMPLATE}; rewritten on every start."
    ]
    for line in template.splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() else ""
        if local.get(key):
            line = f"{key} {local[key].pop(0)}"
        lines.append(line)
    left = [key for key, values in local.items() if values]
    if left:
        raise StackError(
            f"{_MOSQUITTO_TEMPLATE} lacks {', '.join(left)}: restore it from version control"
        )
    if os.geteuid() == 0:
        # As root mosquitto switches to user `mosquitto`, which cannot write to our run dir.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def _tls_ports(state: dict[str, Any], avoid: set[int]) -> tuple[int, int]:
    """The TLS listeners' ports: the recorded ones while free, else fresh ones."""
    chosen: list[int] = []
    for key in ("mqtts_port", "mqtt_mtls_port"):
        port = state.get(key)
        if not port or port in avoid or port in chosen or not _process.port_free(HOST, port):
            port = free_port()
            while port in avoid or port in chosen:
                port = free_port()
        chosen.append(port)
    return chosen[0], chosen[1]


def _ensure_broker_files(run_dir: Path) -> None:
    """The service accounts' passwords, the plugin's file and the development CA, made once."""
    accounts = run_dir / _ACCOUNTS_FILE
    passwords = _read_json(accounts)
    if set(passwords) != set(brokerauth.ACCOUNTS):
        passwords = {account: brokerauth.new_password() for account in brokerauth.ACCOUNTS}
        _write_private(accounts, passwords)
        (run_dir / _MOSQUITTO_DATA / _DYNSEC_FILE).unlink(missing_ok=True)
    data = run_dir / _MOSQUITTO_DATA
    data.mkdir(exist_ok=True)
    dynsec = data / _DYNSEC_FILE
    if not dynsec.is_file():
        _write_private(dynsec, brokerauth.config(passwords))
    try:
        devca.ensure_ca(run_dir / _TLS_DIR)
    except devca.DevCAError as exc:
        raise StackError(str(exc)) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_private(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def _start_mosquitto(
    mosquitto: Path, run_dir: Path, ports: tuple[int, int, int], timeout: float
) -> int:
    (run_dir / _MOSQUITTO_DATA).mkdir(exist_ok=True)
    conf = run_dir / _MOSQUITTO_CONF
    conf.write_text(_mosquitto_conf(run_dir, ports))
    log = run_dir / _MOSQUITTO_LOG
    proc = _process.spawn([str(mosquitto), "-c", str(conf)], log, run_dir, env=_clean_env())
    try:
        _process.wait_ready(
            proc,
            lambda: all(_process.accepts_tcp(HOST, p) for p in ports),
            "mosquitto",
            log,
            timeout,
        )
    except BaseException:
        _process.stop(proc.pid, "mosquitto", 5.0)
        raise
    return proc.pid


# postgres ---------------------------------------------------------------------------------------

_PG_CONF = f"""
# --- pumpfleet stack (appended by `pumpfleet stack up`) ---
listen_addresses = '{HOST}'
unix_socket_directories = ''   # TCP only: no socket path length or permission trouble
max_connections = 200
shared_buffers = 256MB
synchronous_commit = on
"""


def _initdb(pg_bin: Path, data: Path, log: Path, account: _Account | None, timeout: float) -> None:
    if (data / "PG_VERSION").exists():
        return
    argv = [
        str(pg_bin / "initdb"),
        "-D",
        str(data),
        "-U",
        PG_USER,
        "--auth=trust",  # pg_hba only admits loopback; listen_addresses is 127.0.0.1 as well
        "--encoding=UTF8",
        "--locale=C",
    ]
    result = _run(argv, account, data, timeout)
    with open(log, "a") as out:
        out.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise StackError(f"initdb failed in {data} (exit {result.returncode}); read {log}")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(_PG_CONF)


def _start_postgres(
    pg_bin: Path, data: Path, run_dir: Path, port: int, account: _Account | None, timeout: float
) -> int:
    log = run_dir / _POSTGRES_LOG
    _initdb(pg_bin, data, log, account, timeout)
    proc = _process.spawn(
        [str(pg_bin / "postgres"), "-D", str(data), "-p", str(port)],
        log,
        data,
        env=_clean_env(account),
        user=(account.uid, account.gid) if account is not None else None,
    )

    def accepting() -> bool:
        argv = [str(pg_bin / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "1"]
        return _run([*argv, "-U", PG_USER, "-d", "postgres"], None, run_dir, 10).returncode == 0

    try:
        _process.wait_ready(proc, accepting, "postgres", log, timeout)
    except BaseException:
        _stop_postgres(pg_bin, data, proc.pid, account, 10.0)
        raise
    return proc.pid


def _stop_postgres(
    pg_bin: Path,
    data: Path,
    pid: int | None,
    account: _Account | None,
    timeout: float,
    mode: str = "fast",
) -> None:
    """pg_ctl's shutdown (it finds the server from postmaster.pid, even one we lost)."""
    if (data / "postmaster.pid").exists():
        argv = [str(pg_bin / "pg_ctl"), "stop", "-D", str(data), "-m", mode, "-w"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run([*argv, "-t", str(int(timeout))], account, data, timeout + 5)
    if pid is not None:
        _process.stop(pid, "postgres", timeout)


def _psql(pg_bin: Path, port: int, sql: str, database: str = "postgres") -> str:
    argv = [str(pg_bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    argv += ["-h", HOST, "-p", str(port), "-U", PG_USER, "-d", database, "-c", sql]
    result = _run(argv, None, Path("/"), 60)
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StackError(f"psql failed on port {port}: {error}")
    return result.stdout.strip()


def _ensure_logins(pg_bin: Path, port: int) -> None:
    """A login per service group (`<group>_local`), the groups made as the migrations make them
    (roles are cluster-wide; the migrations then find them and grant their tables)."""
    for group in sorted({g for _, g in SERVICES.values() if g}):
        login = f"{group}_local"
        _psql(
            pg_bin,
            port,
            f"""DO $$ BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{group}') THEN
                    CREATE ROLE {group} NOLOGIN;
                END IF;
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{login}') THEN
                    CREATE ROLE {login} LOGIN IN ROLE {group};
                END IF;
            END $$""",
        )


def _ensure_database(pg_bin: Path, port: int, name: str) -> None:
    _check_identifier(name)
    if not _psql(pg_bin, port, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"):
        _psql(pg_bin, port, f'CREATE DATABASE "{name}"')


def _check_identifier(name: str) -> None:
    if not _IDENTIFIER.fullmatch(name):
        raise StackError(f"bad database name {name!r}: use letters, digits and _ (at most 63)")


# state ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One stack operation at a time per run dir (e.g. parallel test workers calling up)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / _LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((run_dir / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    # Replaced atomically: settings.py and other shells read it at any moment.
    tmp = run_dir / f".{_STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(run_dir / _STATE_FILE)


def _require_state(info: StackInfo) -> dict[str, Any]:
    state = _read_state(info.run_dir)
    if not state:
        raise StackError(f"no stack in {info.run_dir}: start it with `pumpfleet stack up`")
    return state


def _info(state: dict[str, Any]) -> StackInfo:
    return StackInfo(
        run_dir=Path(state["run_dir"]),
        mqtt_host=state["mqtt_host"],
        mqtt_port=int(state["mqtt_port"]),
        pg_host=state["pg_host"],
        pg_port=int(state["pg_port"]),
        pg_user=state["pg_user"],
        pg_database=state["pg_database"],
        mqtts_port=int(state.get("mqtts_port") or 0),
        mqtt_mtls_port=int(state.get("mqtt_mtls_port") or 0),
        mqtt_passwords=_read_json(Path(state["run_dir"]) / _ACCOUNTS_FILE),
    )
