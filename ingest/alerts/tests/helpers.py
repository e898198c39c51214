"""Test helpers: Findings and registry rows (the HTTP receiver and deadlines are
`pumpfleet.testing`'s: `Sink`, `until`)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from pumpfleet.findings import Finding, Priority

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
"""Device time of the tests' first Finding; in the past, as real device times are."""


def finding(
    pump_id: str = "P-1",
    rule: str = "low_reservoir",
    *,
    active: bool = True,
    priority: Priority = "medium",
    minutes: float = 0,
    seq: int | None = None,
    summary: str | None = None,
    **details: Any,
) -> Finding:
    return Finding(
        pump_id=pump_id,
        rule=rule,
        active=active,
        priority=priority,
        at=T0 + timedelta(minutes=minutes),
        summary=summary or f"{rule} on {pump_id}",
        details=details,
        seq=seq,
    )


async def add_pumps(conn: asyncpg.Connection, pumps: Iterable[tuple[str, str]]) -> None:
    await conn.executemany("INSERT INTO pumps (pump_id, clinic) VALUES ($1, $2)", list(pumps))
