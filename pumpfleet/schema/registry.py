"""The pump registry as a clinic confirms it: per pump, the profile the rules judge it by.

The alerting service reads the registry at its start and every minute; a pump without a row
gets the clinic_data_missing notice. Tools outside the pipeline (`pumpfleet sim run --check`,
which registers the pumps of its run) write it with `register`, so the SQL lives here once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import astuple, dataclass

import asyncpg

__all__ = ["REGISTER", "Registration", "register"]


@dataclass(frozen=True, slots=True)
class Registration:
    """One pump's confirmed profile (the `pumps` columns of the same names)."""

    pump_id: str
    clinic: str
    reservoir_capacity_ml: float
    concentration_mcg_per_ml: float
    low_reservoir_alarm_ml: float
    reporting_interval_s: int
    high_risk: bool


REGISTER = """
INSERT INTO pumps (pump_id, clinic, reservoir_capacity_ml, concentration_mcg_per_ml,
                   low_reservoir_alarm_ml, reporting_interval_s, high_risk, registered_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'operator')
ON CONFLICT (pump_id) DO UPDATE SET
    clinic = EXCLUDED.clinic,
    reservoir_capacity_ml = EXCLUDED.reservoir_capacity_ml,
    concentration_mcg_per_ml = EXCLUDED.concentration_mcg_per_ml,
    low_reservoir_alarm_ml = EXCLUDED.low_reservoir_alarm_ml,
    reporting_interval_s = EXCLUDED.reporting_interval_s,
    high_risk = EXCLUDED.high_risk,
    registered_by = 'operator'
"""
"""Insert or confirm one pump; a row the ingester registered on first sight becomes the
operator's."""


async def register(conn: asyncpg.Connection, pumps: Iterable[Registration]) -> int:
    """Write every pump's profile; returns the rows written."""
    rows = [astuple(p) for p in pumps]
    await conn.executemany(REGISTER, rows)
    return len(rows)
