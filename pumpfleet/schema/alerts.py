"""The alerts a run raised, read back from the alerting tables (`alerts`, `alert_history`).

Whoever checks the pipeline from outside (`pumpfleet sim run --check`, and through it the
end-to-end tests and the demo) reads here rather than writing its own SQL against the alerting
service's tables: first `baseline` before the run, then `raised_since` that baseline.

Which rows count as raised: only alerts created after the baseline (`alert_id` above it), on
the given pumps; each at its priority when it started (history phase `start`, at `started_at`)
and at every priority it was escalated or de-escalated to (phases `escalate` / `de-escalate`, at
the history row's `at`); without history rows, at the alert's current priority at `started_at`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

__all__ = ["BASELINE", "RAISED_SINCE", "Raised", "baseline", "raised_since"]

BASELINE = "SELECT coalesce(max(alert_id), 0) FROM alerts"
"""The highest alert id now: alerts above it were raised by what runs next."""

RAISED_SINCE = """
SELECT a.pump_id, a.rule,
       coalesce(h.priority, a.priority) AS priority,
       CASE WHEN h.phase IS NULL OR h.phase = 'start' THEN a.started_at ELSE h.at END AS at
FROM alerts a
LEFT JOIN alert_history h
       ON h.alert_id = a.alert_id AND h.phase IN ('start', 'escalate', 'de-escalate')
WHERE a.alert_id > $1 AND a.pump_id = ANY($2::text[])
ORDER BY at
"""
"""$1: the baseline alert id, $2: the pump ids."""


@dataclass(frozen=True, slots=True)
class Raised:
    """An alert reaching `priority` on a pump at `at` (device time of the deciding message)."""

    pump_id: str
    rule: str
    priority: str
    at: datetime


async def baseline(conn: asyncpg.Connection) -> int:
    """The highest alert id now (0 for none). Raises asyncpg.UndefinedTableError on a database
    without the alerting schema."""
    return int(await conn.fetchval(BASELINE))


async def raised_since(
    conn: asyncpg.Connection, alert_id: int, pump_ids: Iterable[str]
) -> list[Raised]:
    """Alerts raised on these pumps after `alert_id`, one per priority they reached, by time."""
    rows = await conn.fetch(RAISED_SINCE, alert_id, list(pump_ids))
    seen = dict.fromkeys(Raised(r["pump_id"], r["rule"], r["priority"], r["at"]) for r in rows)
    return list(seen)
