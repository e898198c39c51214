"""How a benchmark script hands its figures to the report (benchmarks/report.py).

Every script prints its figures for a person; beside each, it calls `record(key, value, unit)`.
When the report runs the script it sets PUMPFLEET_BENCH_JSON to a file, and each figure is
appended there as one JSON line; run by hand, the call does nothing. The report runs each
script several times and keeps min/median/max per key.
"""

from __future__ import annotations

import json
import os
from typing import Literal

Better = Literal["higher", "lower"]


def record(key: str, value: float, unit: str, better: Better = "higher", what: str = "") -> None:
    """One figure of this run: `key` is stable (the report and README name figures by it)."""
    path = os.environ.get("PUMPFLEET_BENCH_JSON")
    if not path:
        return
    line = {"key": key, "value": float(value), "unit": unit, "better": better, "what": what}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")
