"""`make sbom`: a valid CycloneDX SBOM of the shipped environment, naming every runtime
dependency pyproject.toml declares with the version installed, and no dev tool."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_make_sbom_lists_the_runtime_dependencies_and_no_dev_tools(tmp_path: Path) -> None:
    out = tmp_path / "sbom.json"
    run = subprocess.run(
        [str(ROOT / "scripts" / "sbom"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    bom = json.loads(out.read_text())
    assert bom["bomFormat"] == "CycloneDX"
    assert bom["metadata"]["component"]["name"] == "pumpfleet"
    names = {c["name"].lower().replace("_", "-"): c for c in bom["components"]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    assert runtime <= names.keys(), f"missing from the SBOM: {sorted(runtime - names.keys())}"
    for name in runtime:
        assert names[name]["version"] and names[name]["purl"].startswith("pkg:pypi/")
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    assert not (dev - runtime) & names.keys(), "dev tools are not shipped"
    assert "components" in run.stderr  # it says where the file is and what it holds
