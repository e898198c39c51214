"""`pumpfleet sim run --check`: did the pipeline raise the alerts the scenario expects?

After a run, the alerts the pipeline stored are read from the database and handed to
`SimRun.check`. The reads and the registry write are the core's (`pumpfleet.schema.alerts`,
`pumpfleet.schema.registry`), which say which rows count: only alerts created after the run
started (`alert_id` above the highest one before it), on the run's pumps, so earlier runs of
the same scenario in the same database do not count; each at every priority it reached.

Times: `SimRun.check` works in simulated time. The alert lifecycle stamps alerts with the
device time of the message that decided them (`pumpfleet.findings.Finding.at`), which equals the
simulated time except on a pump whose clock the scenario skews (by minutes, inside every
deadline's slack). So the stored times are used as they are.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from pumpfleet.findings import NOTICES
from pumpfleet.schema import alerts, registry
from sim_fleet._scenario import ExpectedAlert, RaisedAlert, SimRun

__all__ = [
    "CheckError",
    "CheckResult",
    "alert_baseline",
    "evaluate",
    "fetch_raised",
    "register_pumps",
    "wait_for_alerts",
]


class CheckError(Exception):
    """The database cannot answer (no alerts table, unreachable); one line says how to fix it."""


@dataclass
class CheckResult:
    outcomes: list[tuple[ExpectedAlert, RaisedAlert | None]]
    unexpected: list[RaisedAlert]
    strict: bool
    problems: list[str]
    """`SimRun.check`'s verdict: empty means the run passed."""
    raised: int
    waited_s: float

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        met = sum(1 for _, a in self.outcomes if a is not None)
        out = [
            f"check: {met}/{len(self.outcomes)} expected alerts met, "
            f"{len(self.unexpected)} unexpected{'' if self.strict else ' (not strict)'}, "
            f"{self.raised} alert transitions read after {self.waited_s:.0f} s"
        ]
        notices: Counter[str] = Counter()
        for e, a in self.outcomes:
            if a is not None and e.rule in NOTICES:
                notices[e.rule] += 1  # one per pump that cannot be watched fully: summed below
                continue
            if a is None:
                out.append(
                    f"  MISSED      {e.pump_id} {e.rule} ({e.priority}) between "
                    f"{_t(e.after)} and {_t(e.due)}  [{e.cause}]"
                )
            else:
                late = (a.time - e.after).total_seconds()
                out.append(
                    f"  met         {e.pump_id} {e.rule} ({e.priority}) at {_t(a.time)}, "
                    f"{_duration(late)} after {_t(e.after)}  [{e.cause}]"
                )
        for rule, n in sorted(notices.items()):
            out.append(f"  met         {rule} (info) on {n} pumps, as their family or profile says")
        for a in self.unexpected:
            label = "UNEXPECTED " if self.strict else "unexpected "
            out.append(f"  {label} {a.pump_id} {a.rule} ({a.priority}) at {_t(a.time)}")
        out.append(
            "check passed" if self.passed else f"check FAILED: {len(self.problems)} problems"
        )
        return out


def _t(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def evaluate(run: SimRun, raised: Iterable[RaisedAlert], waited_s: float = 0.0) -> CheckResult:
    """The verdict for one set of raised alerts (pure: no database)."""
    raised = list(raised)
    return CheckResult(
        outcomes=run.outcomes(raised),
        unexpected=run.unexpected(raised),
        strict=run.scenario.strict,
        problems=run.check(raised),
        raised=len(raised),
        waited_s=waited_s,
    )


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except (TimeoutError, OSError) as exc:
        raise CheckError(
            f"cannot reach the database ({exc}); is the stack running? "
            "start it with `pumpfleet stack up`, or set PUMPFLEET_DATABASE_URL"
        ) from None


async def register_pumps(dsn: str, run: SimRun) -> int:
    """What the clinic confirmed: a registry row for every pump of the run that has a profile
    (alerting reads the registry at its start and every minute), none for those set up
    `profile: false`, which must get the clinic_data_missing notice. Returns the rows written."""
    pumps = [
        registry.Registration(
            p.pump_id,
            p.spec.clinic,
            p.spec.reservoir_capacity_ml,
            p.spec.concentration_mcg_per_ml,
            p.spec.low_reservoir_alarm_ml,
            p.spec.reporting_interval_s,
            p.spec.high_risk,
        )
        for p in run.pumps
        if run.has_profile(p.pump_id)
    ]
    conn = await _connect(dsn)
    try:
        return await registry.register(conn, pumps)
    finally:
        await conn.close()


async def alert_baseline(dsn: str) -> int:
    """The highest alert id now: alerts above it were raised by what runs next."""
    conn = await _connect(dsn)
    try:
        return await alerts.baseline(conn)
    except asyncpg.UndefinedTableError:
        raise CheckError(
            "the database has no alerts table; apply the schema with `pumpfleet db migrate`"
        ) from None
    finally:
        await conn.close()


async def fetch_raised(dsn: str, since_alert_id: int, pump_ids: Iterable[str]) -> list[RaisedAlert]:
    """Alerts raised on these pumps since the baseline, one per priority they reached."""
    conn = await _connect(dsn)
    try:
        rows = await alerts.raised_since(conn, since_alert_id, pump_ids)
    finally:
        await conn.close()
    out = {RaisedAlert(r.pump_id, r.rule, r.priority, r.at) for r in rows}
    return sorted(out, key=lambda a: (a.time, a.pump_id, a.rule))


async def wait_for_alerts(
    run: SimRun,
    dsn: str,
    since_alert_id: int,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    on_poll: Callable[[CheckResult], None] | None = None,
) -> CheckResult:
    """Poll until every expected alert is met or `timeout_s` passes; the final verdict."""
    pumps = [p.pump_id for p in run.pumps]
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        result = evaluate(run, await fetch_raised(dsn, since_alert_id, pumps), waited)
        if on_poll is not None:
            on_poll(result)
        if all(a is not None for _, a in result.outcomes) or waited >= timeout_s:
            return result
        await asyncio.sleep(min(poll_s, max(0.0, timeout_s - waited)))
