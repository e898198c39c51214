"""The short chaos soak (`pumpfleet soak --short`): a minute of load on a stack of its own while
every kind of fault hits it at seeded random moments, counted from the database.

The seed is random per run and printed on failure; PUMPFLEET_SOAK_SEED replays one.
`make soak` runs the full profile (10 minutes, outages up to 2 minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pumpfleet import soak

pytestmark = pytest.mark.integration


def test_short_soak_loses_nothing_doubles_nothing_and_never_ends_the_ingester(
    tmp_path: Path,
) -> None:
    seed = os.environ.get("PUMPFLEET_SOAK_SEED")
    lines: list[str] = []
    cfg = soak.SoakConfig(
        seconds=60,
        seed=int(seed) if seed else None,
        short=True,
        run_dir=tmp_path,
        hostile_per_min=40,
        progress=lines.append,
    )
    report = soak.run(cfg)
    table = report.table()
    kinds = {r.kind for r in report.faults}
    # The run met every kind of fault and carried real load, or it proves nothing.
    assert kinds == {k.name for k in soak.SHORT_FAULTS}, table
    assert report.published > 10_000, table
    assert sum(report.hostile.values()) >= 10, table
    assert report.passed, (
        f"{table}\n\nreplay: PUMPFLEET_SOAK_SEED={report.seed}\n"
        + "\n".join(lines)
        + f"\ningester log: {tmp_path / 'ingest.log'}"
    )
