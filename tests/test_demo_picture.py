"""The demo's picture (scripts/_demo_picture.py) from a small database filled here: a valid PNG,
and what it plotted is what the database holds."""

from __future__ import annotations

import asyncio
import struct
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from pumpfleet import schema
from pumpfleet.schema import registry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import _demo_picture

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, tzinfo=UTC)


async def _fill(dsn: str) -> None:
    await schema.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await registry.register(
            conn,
            [
                registry.Registration(p, "north", 20.0, 2000.0, 2.0, 600, False)
                for p in ("P-000001", "P-000002")
            ],
        )
        rows = []
        for pump, ml_per_h in (("P-000001", 0.0104), ("P-000002", 0.0104)):
            for i in range(12):  # two hours of 10-minute readings; P-000001 stops at 1 h
                reservoir = 15.0 - ml_per_h * min(i, 6 if pump == "P-000001" else i) / 6
                rows.append((T0 + timedelta(minutes=10 * i), pump, i + 1, reservoir))
        await conn.executemany(
            "INSERT INTO telemetry (time, pump_id, seq, delivered_ul_per_h,"
            " programmed_rate_ul_per_h, programmed_dose_mcg_per_day, reservoir_ml,"
            " reservoir_capacity_ml, low_reservoir_alarm_ml, concentration_mcg_per_ml,"
            " battery_pct, battery_eri, pump_state, reservoir_source, reporting_interval_s,"
            " scheduled_ul_per_h)"
            " VALUES ($1, $2, $3, 10.4, 10.4, 500, $4, 20, 2, 2000, 90, false, 'infusing',"
            " 'measured', 600, 10.4)",
            rows,
        )
        start, ack, end = (T0 + timedelta(minutes=m) for m in (70, 80, 100))
        high = await conn.fetchval(
            "INSERT INTO alerts (pump_id, rule, priority, phase, summary, started_at, updated_at,"
            " ended_at, acked_at, acked_by) VALUES ('P-000001', 'under_infusion', 'high', 'end',"
            " 'no flow', $1, $3, $3, $2, 'nurse') RETURNING alert_id",
            start,
            ack,
            end,
        )
        notice = await conn.fetchval(
            "INSERT INTO alerts (pump_id, rule, priority, phase, summary, started_at, updated_at)"
            " VALUES ('P-000002', 'flow_not_observable', 'info', 'start', 'notice', $1, $1)"
            " RETURNING alert_id",
            T0,
        )
        await conn.executemany(
            "INSERT INTO alert_history (alert_id, at, phase, priority, actor)"
            " VALUES ($1, $2, $3, $4, $5)",
            [
                (notice, T0, "start", "info", "rules"),
                (high, start, "start", "high", "rules"),
                (high, ack, "ack", "high", "nurse"),
                (high, end, "end", "high", "rules"),
            ],
        )
    finally:
        await conn.close()


async def _readings(dsn: str, pump: str) -> list[tuple[datetime, float]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT time, reservoir_ml FROM telemetry WHERE pump_id = $1 ORDER BY time", pump
        )
    finally:
        await conn.close()
    return [(r["time"], r["reservoir_ml"]) for r in rows]


def test_picture_plots_what_the_database_holds(database_url: str, tmp_path: Path) -> None:
    asyncio.run(_fill(database_url))
    out = tmp_path / "fleet.png"
    time_from, time_to = T0, T0 + timedelta(hours=2)

    picture = asyncio.run(_demo_picture.draw(database_url, out, time_from, time_to))

    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert 600 <= width <= 4000 and 300 <= height <= 8000
    assert len(data) > 10_000  # something was drawn, not a blank canvas

    # Only the pump with an alert above info gets a reservoir panel; the notice's pump does not.
    assert picture.alerted == ["P-000001"]
    assert list(picture.reservoir) == ["P-000001"]
    plotted = [(r.time, r.reservoir_ml) for r in picture.reservoir["P-000001"]]
    assert plotted == asyncio.run(_readings(database_url, "P-000001"))
    # The projection starts at the first reading and falls by the programmed 10.4 uL/h.
    first = picture.reservoir["P-000001"][0]
    last = picture.reservoir["P-000001"][-1]
    assert first.projection_ml == pytest.approx(first.reservoir_ml)
    assert last.projection_ml == pytest.approx(first.reservoir_ml - 0.0104 * 110 / 60, rel=1e-6)

    phases = [(t.pump_id, t.rule, t.phase, t.time) for t in picture.history]
    assert phases == [
        ("P-000002", "flow_not_observable", "start", T0),
        ("P-000001", "under_infusion", "start", T0 + timedelta(minutes=70)),
        ("P-000001", "under_infusion", "ack", T0 + timedelta(minutes=80)),
        ("P-000001", "under_infusion", "end", T0 + timedelta(minutes=100)),
    ]
