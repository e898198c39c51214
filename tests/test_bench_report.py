"""The benchmark report: README.md's figures and docs/benchmarks.md come from docs/benchmarks.json
by benchmarks/report.py, never typed by hand; and the report's arithmetic is right."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "benchmarks/report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPO / "docs/benchmarks.json").read_text())
    return data


def test_readme_figures_are_the_reports(report: ModuleType) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(re.escape(report.START) + ".*?" + re.escape(report.END), readme, re.S)
    assert block is not None, "README.md lost its bench: markers"
    assert block[0] == report.readme_block(_data()), "run: python benchmarks/report.py --render"


def test_docs_benchmarks_md_is_rendered_from_the_json(report: ModuleType) -> None:
    text = (REPO / "docs/benchmarks.md").read_text()
    assert text == report.render(_data()), "run: python benchmarks/report.py --render"


def test_the_committed_report_has_three_runs_of_every_repeated_suite(report: ModuleType) -> None:
    data = _data()
    assert set(data["suites"]) == {s.name for s in report.SUITES}
    for suite in report.SUITES:
        runs = data["suites"][suite.name]["runs"]
        assert len(runs) >= (suite.repeats or 3), suite.name
        assert all(runs), f"{suite.name}: a run recorded no figures"


def _fig(key: str, value: float, better: str = "higher") -> dict[str, Any]:
    return {"key": key, "value": value, "unit": "msg/s", "better": better, "what": key}


def test_min_median_max_and_peer_ratio(report: ModuleType) -> None:
    runs = [[_fig("drain.rate", v), _fig("peer.naive", p)] for v, p in ((30, 3), (10, 2), (20, 4))]
    data = {
        "suites": {"ingest": {"args": ["x.py"], "what": "w", "runs": runs, "finished": "t"}},
        "machine": {
            "cpu": "c",
            "cores": 2,
            "memory_gib": 1,
            "os": "o",
            "python": "3",
            "mosquitto": "m",
            "postgresql": "p",
            "node": "n",
            "node-red": "r",
            "packages": {},
            "pumpfleet": "abc",
        },
        "profile": "full",
        "finished": "2026-01-01 00:00 UTC",
    }
    md = report.render(data)
    assert "| drain.rate (`drain.rate`) | 10.0 | 20.0 | 30.0 | msg/s | 3 |" in md
    # ours / peer: the medians' ratio, 20 / 3
    assert "| 20.0 msg/s | 3.00 msg/s | 6.67 |" in md
    assert "| ours / the naive ingester | 6.7x |" in report.readme_block(data)
