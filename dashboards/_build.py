"""Rendering every generated file, writing them, and checking a directory against them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dashboards import _alerts, _fleet, _pipeline, _pump
from dashboards._common import Json
from dashboards._provisioning import CLINIC, FOLDERS, OPERATIONS, Folder, datasources, providers

DEFAULT_OUT = Path("deploy/grafana")
"""Where `pumpfleet dashboards build` writes, relative to the working directory; the committed
copy that docker-compose.yml mounts."""
DATASOURCES_FILE = "provisioning/datasources/pumpfleet.yaml"
PROVIDERS_FILE = "provisioning/dashboards/pumpfleet.yaml"


@dataclass(frozen=True)
class Board:
    uid: str
    folder: Folder
    filename: str
    make: Callable[[], Json]

    @property
    def path(self) -> str:
        """The file, relative to the output directory."""
        return f"dashboards/{self.folder.directory}/{self.filename}"


BOARDS: tuple[Board, ...] = (
    Board(_fleet.UID, CLINIC, "fleet-overview.json", _fleet.build),
    Board(_pump.UID, CLINIC, "pump-detail.json", _pump.build),
    Board(_alerts.UID, CLINIC, "alerts.json", _alerts.build),
    Board(_pipeline.UID, OPERATIONS, "pipeline-health.json", _pipeline.build),
)


def render() -> dict[str, str]:
    """Every generated file's text by its path relative to the output directory (no I/O)."""
    files = {DATASOURCES_FILE: datasources(), PROVIDERS_FILE: providers()}
    for board in BOARDS:
        files[board.path] = json.dumps(board.make(), indent=2, ensure_ascii=False) + "\n"
    return files


def _stale(out: Path, files: dict[str, str]) -> list[Path]:
    """Dashboard files in our folders that the code no longer makes (a renamed dashboard)."""
    found = []
    for folder in FOLDERS:
        directory = out / "dashboards" / folder.directory
        if directory.is_dir():
            found += [
                p for p in sorted(directory.glob("*.json")) if str(p.relative_to(out)) not in files
            ]
    return found


def build(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write every file under `out`, remove stale dashboards there; return what was written."""
    files = render()
    written = []
    for relative, content in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    for path in _stale(out, files):
        path.unlink()
    return written


def check(out: Path = DEFAULT_OUT) -> list[str]:
    """What in `out` differs from what `build` would write: one line per file (empty: none)."""
    files = render()
    problems = []
    for relative, content in files.items():
        path = out / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.read_text(encoding="utf-8") != content:
            problems.append(f"{relative}: differs")
    problems += [f"{p.relative_to(out)}: no longer generated" for p in _stale(out, files)]
    return problems
