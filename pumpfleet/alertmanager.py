"""A real Prometheus Alertmanager run from Debian's binary, for tests and the demo.

`start(directory, webhook_url)` writes a config that routes every alert to one webhook receiver
(so a test's small HTTP server sees what Alertmanager groups and sends), starts Alertmanager on
a free loopback port with clustering off, and waits until `/-/ready` answers. `stop()` ends it;
`running()` does both around a block. Processes go through `pumpfleet._process`, as the stack's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pumpfleet import _process
from pumpfleet._process import ExitedEarly, StackError
from pumpfleet.stack import HOST

BINARY_NAMES = ("prometheus-alertmanager", "alertmanager")
_HINT = (
    "prometheus-alertmanager not found: install it with `apt-get install prometheus-alertmanager`"
)
_SEARCH = ("/usr/bin", "/usr/local/bin", "/usr/sbin")
_NAME = "alertmanager"
"""In the binary's command line either way it is installed (for telling our pid from a reuse)."""


class AlertmanagerError(StackError):
    """A problem the user can fix (binary missing, did not start); one line."""


class _ExitedEarly(AlertmanagerError, ExitedEarly):
    """Alertmanager exited while starting (a lost port race is tried again on a fresh port)."""


@dataclass(frozen=True)
class Alertmanager:
    """A running Alertmanager: where it listens and how to stop it."""

    url: str
    port: int
    directory: Path
    pid: int
    _proc: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.directory / "alertmanager.log"


def find_binary() -> Path:
    for name in BINARY_NAMES:
        found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SEARCH))
        if found:
            return Path(found)
    raise AlertmanagerError(_HINT)


def config(
    webhook_url: str,
    *,
    group_by: Sequence[str] = ("clinic", "priority"),
    group_wait: str = "1s",
    group_interval: str = "1s",
    repeat_interval: str = "4h",
    resolve_timeout: str = "5m",
) -> str:
    """An Alertmanager config routing every alert to `webhook_url`, resolved ones included."""
    doc = {
        "global": {"resolve_timeout": resolve_timeout},
        "route": {
            "receiver": "pumpfleet",
            "group_by": list(group_by),
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        },
        "receivers": [
            {
                "name": "pumpfleet",
                "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
            }
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def start(
    directory: Path,
    webhook_url: str,
    *,
    timeout: float = 30.0,
    **route: Any,
) -> Alertmanager:
    """Start Alertmanager in `directory` (config, data, log) and wait until it is ready."""
    binary = find_binary()
    directory = Path(directory).absolute()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    conf = directory / "alertmanager.yml"
    conf.write_text(config(webhook_url, **route))
    log = directory / "alertmanager.log"

    def start_on(port: int) -> Alertmanager:
        url = f"http://{HOST}:{port}"
        argv = [
            str(binary),
            f"--config.file={conf}",
            f"--storage.path={directory / 'data'}",
            f"--web.listen-address={HOST}:{port}",
            "--cluster.listen-address=",
            f"--web.external-url={url}",
            "--log.level=warn",
        ]
        proc = _process.spawn(argv, log, directory)
        try:
            _process.wait_ready(proc, lambda: _ready(url), _NAME, log, timeout)
        except _process.ExitedEarly as exc:
            raise _ExitedEarly(str(exc)) from None
        except BaseException as exc:
            _process.stop(proc.pid, _NAME, 10.0)
            if isinstance(exc, StackError):
                raise AlertmanagerError(str(exc)) from None
            raise
        return Alertmanager(url=url, port=port, directory=directory, pid=proc.pid, _proc=proc)

    # Another process may take the free port before Alertmanager binds it: then a fresh one.
    _, am = _process.start_on_free_port(start_on, HOST)
    return am


def stop(am: Alertmanager, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not gone by the deadline."""
    _process.stop(am.pid, _NAME, timeout)


@contextlib.contextmanager
def running(directory: Path, webhook_url: str, **route: Any) -> Iterator[Alertmanager]:
    """An Alertmanager for the duration of a block, stopped however the block ends."""
    am = start(directory, webhook_url, **route)
    try:
        yield am
    finally:
        stop(am)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False
