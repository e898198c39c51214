"""`pumpfleet sim detect` and `pumpfleet sim year`: what the rules catch on realistic pumps.

`detect` runs one simulated pump per (case, family) straight into the rule engine (no broker:
the engine is pure, and this is about what the rules can see, not about transport) and reports,
per case and pump family, whether the fault was detected, by which rule, at which priority, and
how long after its onset in simulated time. Where a family cannot see a fault the table says so
(and the pump's standing notice is what the clinic gets).

`year` runs a healthy mixed fleet (make_fleet) for a simulated year and counts the alerts by
rule: a healthy fleet raises no alert it does not expect (ERI medium alerts are expected: a
battery reaching ERI is real news; the standing notices are expected on calculated pumps).
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from ingest import PumpProfile, RuleEngine
from pumpfleet.contract import Message
from pumpfleet.findings import NOTICES, Finding
from sim_fleet._fleet import FleetMix, advance_fleet, make_fleet
from sim_fleet._model import (
    BatteryEri,
    CatheterOcclusion,
    ClinicianSuspend,
    Fault,
    MriScan,
    OverInfusion,
    PartialOcclusion,
    PocketFill,
    Pump,
    PumpFamily,
    PumpSpec,
    RefillVisit,
    RotorMismatch,
    SensorDrift,
    TelemetrySilence,
    UnderInfusion,
    continuous_schedule,
)

START = datetime(2026, 1, 5, tzinfo=UTC)
ONSET = START + timedelta(days=2)
"""Two days of normal readings before any fault: every window is full."""
FAMILIES: tuple[PumpFamily, ...] = ("calculated", "measured", "valve")
_TICK = timedelta(minutes=5)

Faults = Callable[[datetime], list[Fault]]


@dataclass(frozen=True)
class Case:
    """One fault on one pump: which rules count as detecting it, and how long to watch."""

    name: str
    rules: tuple[str, ...]
    faults: Faults
    days: float = 4.0
    spec: dict[str, object] = field(default_factory=dict)
    profile: bool = True
    ignore: tuple[str, ...] = ()
    """Rules a side effect may raise without counting (e.g. the low reservoir of a pump that
    runs dry)."""


def _refill_after(days: float) -> Faults:
    """A routine refill `days` after the onset: where a calculated pump shows a fault."""
    return lambda onset: [RefillVisit(onset + timedelta(days=days))]


def _with(*parts: Faults) -> Faults:
    return lambda onset: [f for part in parts for f in part(onset)]


def _fault(make: Callable[..., Fault], **params: object) -> Faults:
    """`make(onset, **params)` at the onset."""
    return lambda onset: [make(onset, **params)]


_FAST = {  # 1 mL/day on a 40 mL pump: a refill 28 days on finds 28 mL infused
    "concentration_mcg_per_ml": 500.0,
    "schedule": continuous_schedule(500.0),
    "initial_reservoir_ml": 38.0,
}
_SIDE = ("low_reservoir", "refill_due")

CASES: tuple[Case, ...] = (
    *(
        Case(
            f"over-infusion +{round(b * 100)} %",
            ("over_infusion", "refill_discrepancy"),
            _with(_fault(OverInfusion, bias=b), _refill_after(28)),
            days=30,
            spec=_FAST,
            ignore=_SIDE,
        )
        for b in (0.20, 0.16)
    ),
    *(
        Case(
            f"under-infusion -{round(b * 100)} %",
            ("under_infusion", "refill_discrepancy"),
            _with(_fault(UnderInfusion, bias=-b), _refill_after(28)),
            days=30,
            spec=_FAST,
            ignore=_SIDE,
        )
        for b in (0.20, 0.16)
    ),
    *(
        Case(
            f"{what} {round(b * 100):+d} %, slow pump (10 uL/h)",
            (rule,),
            _fault(f, bias=b),
            days=3,
        )
        for what, rule, b, f in (
            ("over-infusion", "over_infusion", 0.16, OverInfusion),
            ("under-infusion", "under_infusion", -0.16, UnderInfusion),
        )
    ),
    Case(
        "complete occlusion",
        ("under_infusion", "refill_discrepancy"),
        _with(
            _fault(CatheterOcclusion, reservoir_outflow_fraction=0.0),
            _refill_after(28),
        ),
        days=30,
        spec=_FAST,
        ignore=_SIDE,
    ),
    Case(
        "partial occlusion 50 %",
        ("under_infusion", "refill_discrepancy"),
        _with(_fault(PartialOcclusion, flow_fraction=0.5), _refill_after(28)),
        days=30,
        spec=_FAST,
        ignore=_SIDE,
    ),
    *(
        Case(
            f"pocket fill {gap:g} mL, {cap:g} mL pump",
            ("pocket_fill", "refill_discrepancy"),
            _with(
                _fault(PocketFill, pocket_ml=gap),
                _refill_after(28),
            ),
            days=30,
            # 0.5 mL/day: the small pump does not run dry before the next refill
            spec={
                "concentration_mcg_per_ml": 1000.0,
                "schedule": continuous_schedule(500.0),
                "reservoir_capacity_ml": cap,
                "initial_reservoir_ml": cap / 2,
            },
            ignore=_SIDE,
        )
        for cap, gap in ((20.0, 0.9), (20.0, 1.1), (40.0, 1.9), (40.0, 2.1), (40.0, 8.0))
    ),
    *(
        Case(
            f"rotor at {round(k * 100)} % of programme",
            ("under_infusion",) if k < 1 else ("over_infusion",),
            _fault(RotorMismatch, factor=k),
            days=3,
            ignore=_SIDE,
        )
        for k in (0.01, 0.5, 1.3, 2.0)
    ),
    Case(
        "refill drift 0 -> +9 % over 4 refills",
        ("refill_discrepancy",),
        lambda onset: [
            f
            for i, bias in enumerate((0.0, 0.03, 0.06, 0.09))
            for f in (
                OverInfusion(onset + timedelta(days=20 * i, hours=1), bias=bias)
                if bias > 0
                else RefillVisit(onset + timedelta(hours=1)),
                RefillVisit(onset + timedelta(days=20 * (i + 1))),
            )
        ],
        days=82,
        spec={**_FAST, "initial_reservoir_ml": 38.0, "flow_bias": 0.0},
        ignore=_SIDE,
    ),
    Case(
        "MRI, no recovery",
        ("post_mri",),
        _fault(MriScan, recover_after_h=None),
        days=2,
        ignore=("under_infusion",),
    ),
    Case(
        "MRI, recovery logged 10 h late",
        ("post_mri",),
        _fault(MriScan, recover_after_h=3.0, recovery_logged_after_h=10.0),
        days=2,
    ),
    Case(
        "ERI 80 days before monitoring",
        ("battery",),
        lambda onset: [BatteryEri(START, days_to_eos=10.0)],
        days=1,
    ),
    Case(
        "second silence (12 h) after a first",
        ("telemetry_silence",),
        lambda onset: [
            TelemetrySilence(onset - timedelta(hours=20), duration_h=2.0),
            TelemetrySilence(onset, duration_h=12.0),
        ],
        days=1,
    ),
    Case(
        "clinician suspend 24 h (must stay silent)",
        ("under_infusion", "critical_pump_alarm"),
        _fault(ClinicianSuspend, duration_h=24.0),
        days=2,
    ),
    Case(
        "sensor drift 20 uL/day, healthy pump (must stay silent)",
        ("over_infusion", "under_infusion"),
        _fault(SensorDrift, drift_ul_per_day=20.0),
        days=5,
    ),
    Case(
        "high-risk pump, no clinic profile",
        ("clinic_data_missing",),
        lambda onset: [],
        days=1,
        spec={"high_risk": True},
        profile=False,
    ),
)


@dataclass
class Outcome:
    case: str
    family: str
    detected: bool
    rule: str | None = None
    priority: str | None = None
    after: timedelta | None = None
    unexpected: list[str] = field(default_factory=list)
    """Rules that fired that are neither the case's nor its allowed side effects."""


def _spec(case: Case, family: PumpFamily, seed: int) -> PumpSpec:
    base = PumpSpec(
        "P-000001",
        reservoir_capacity_ml=40.0,
        concentration_mcg_per_ml=2000.0,
        schedule=continuous_schedule(500.0),
        flow_bias=0.01,
        initial_reservoir_ml=30.0,
        family=family,
        battery_replacement_after_eri_days=None,
        seed=seed,
    )
    return replace(base, **case.spec)  # type: ignore[arg-type]


def drive(
    engine: RuleEngine,
    pumps: Iterable[Pump],
    start: datetime,
    end: datetime,
    step: timedelta = timedelta(days=1),
    seqs: dict[str, int] | None = None,
) -> list[Finding]:
    """Advance pumps to `end`, every observation into the engine (in time order, nothing lost),
    the watchdog ticked every 5 simulated minutes; all Findings."""
    pumps = list(pumps)
    seqs = {} if seqs is None else seqs
    found: list[Finding] = []
    t = tick = start
    while t < end:
        t = min(t + step, end)
        for pump_id, obs in advance_fleet(pumps, t):
            while obs.sim_time >= tick + _TICK:
                tick += _TICK
                found += engine.tick(tick)
            seq = seqs.get(pump_id, 0)
            seqs[pump_id] = seq + 1
            msg: Message = obs.to_message(pump_id, seq)
            found += engine.observe(msg)
        while tick + _TICK <= t:
            tick += _TICK
            found += engine.tick(tick)
    return found


def run_case(case: Case, family: PumpFamily, seed: int = 1) -> Outcome:
    spec = _spec(case, family, seed)
    faults = case.faults(ONSET)
    onset = min((f.at for f in faults), default=START)
    if case.name.startswith("second silence"):
        onset = max(f.at for f in faults)  # the second one is the case
    pump = Pump(spec, START, faults=faults)
    profiles = {}
    if case.profile:
        profiles[spec.pump_id] = PumpProfile(
            pump_id=spec.pump_id, high_risk=spec.high_risk, reservoir_capacity_ml=None
        )
    engine = RuleEngine(profiles=profiles)
    found = drive(engine, [pump], START, ONSET + timedelta(days=case.days))
    hits = [f for f in found if f.active and f.rule in case.rules and f.at >= onset]
    allowed = set(case.rules) | set(case.ignore) | set(NOTICES)
    unexpected = sorted({f.rule for f in found if f.active and f.rule not in allowed})
    if not hits:
        return Outcome(case.name, family, False, unexpected=unexpected)
    first = hits[0]
    top = max(hits, key=lambda f: ("info", "low", "medium", "high").index(f.priority))
    return Outcome(
        case.name,
        family,
        True,
        first.rule,
        first.priority if first.priority == top.priority else f"{first.priority}->{top.priority}",
        first.at - onset,
        unexpected,
    )


def detection_table(families: Iterable[PumpFamily] = FAMILIES, seed: int = 1) -> list[Outcome]:
    return [run_case(case, fam, seed) for case in CASES for fam in families]


def _span(value: timedelta | None) -> str:
    if value is None:
        return "-"
    s = max(0.0, value.total_seconds())
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 3 * 86_400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86_400:.1f} d"


def format_table(outcomes: list[Outcome]) -> list[str]:
    """A markdown table: what README.md carries."""
    lines = [
        "| case | family | detected | rule | priority | onset to alert | also raised |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.case} | {o.family} | {'yes' if o.detected else 'no'} | {o.rule or '-'} | "
            f"{o.priority or '-'} | {_span(o.after)} | {', '.join(o.unexpected) or '-'} |"
        )
    return lines


# A healthy year ---------------------------------------------------------------------------------


@dataclass
class YearReport:
    pumps: int
    days: float
    messages: int
    elapsed_s: float
    starts: Counter[tuple[str, str]]
    """(rule, priority) -> alerts started."""
    unexpected: list[Finding]


EXPECTED_IN_A_HEALTHY_FLEET = {
    ("flow_not_observable", "info"),
    ("battery", "medium"),
}
"""Calculated pumps' standing notice, and ERI on a pump whose battery is due (replaced within
30 to 60 days, before the 14-days-to-EOS high)."""


def healthy_year(
    pumps: int = 1000,
    days: float = 365.0,
    seed: int = 1,
    mix: FleetMix | None = None,
    progress: Callable[[float, int], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> YearReport:
    """A healthy mixed fleet for `days`: every alert started, by rule, and the unexpected ones.

    The year ends today (device times may not lie in the future). `shard=(i, n)` runs every
    n-th pump from the i-th: pumps are independent, so shards run in parallel processes.
    """
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=days
    )
    index, count = shard
    specs = make_fleet(pumps, seed, mix)[index::count]
    fleet = [Pump(s, start) for s in specs]
    engine = RuleEngine(
        profiles={
            s.pump_id: PumpProfile(
                pump_id=s.pump_id,
                high_risk=s.high_risk,
                low_reservoir_alarm_ml=s.low_reservoir_alarm_ml,
                reporting_interval_s=s.reporting_interval_s,
            )
            for s in specs
        }
    )
    end = start + timedelta(days=days)
    starts: Counter[tuple[str, str]] = Counter()
    unexpected: list[Finding] = []
    seqs: dict[str, int] = {}
    t0 = time.perf_counter()
    t = start
    was_enabled = gc.isenabled()
    gc.disable()  # about a third of generation time otherwise (sim_fleet/README.md)
    try:
        while t < end:
            nxt = min(t + timedelta(days=1), end)
            for f in drive(engine, fleet, t, nxt, seqs=seqs):
                if not f.active:
                    continue
                starts[(f.rule, f.priority)] += 1
                if (f.rule, f.priority) not in EXPECTED_IN_A_HEALTHY_FLEET:
                    unexpected.append(f)
            t = nxt
            gc.collect(0)
            if progress is not None:
                progress((t - start).total_seconds() / 86_400, sum(seqs.values()))
    finally:
        if was_enabled:
            gc.enable()
    return YearReport(
        len(specs), days, sum(seqs.values()), time.perf_counter() - t0, starts, unexpected
    )


def _year_shard(args: tuple[int, float, int, FleetMix | None, int, int]) -> YearReport:
    pumps, days, seed, mix, index, count = args
    return healthy_year(pumps, days, seed, mix, shard=(index, count))


def healthy_year_parallel(
    pumps: int, days: float, seed: int = 1, mix: FleetMix | None = None, processes: int = 2
) -> YearReport:
    """`healthy_year` split over processes; the reports merged."""
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    jobs = [(pumps, days, seed, mix, i, processes) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        parts = list(pool.map(_year_shard, jobs))
    starts: Counter[tuple[str, str]] = Counter()
    for part in parts:
        starts.update(part.starts)
    return YearReport(
        sum(p.pumps for p in parts),
        days,
        sum(p.messages for p in parts),
        time.perf_counter() - t0,
        starts,
        [f for p in parts for f in p.unexpected],
    )


def format_year(report: YearReport) -> list[str]:
    lines = [
        f"healthy fleet: {report.pumps} pumps, {report.days:g} simulated days, "
        f"{report.messages:,} messages in {report.elapsed_s:.0f} s",
        "| rule | priority | alerts started | expected in a healthy fleet |",
        "|---|---|---|---|",
    ]
    for (rule, priority), n in sorted(report.starts.items()):
        ok = "yes" if (rule, priority) in EXPECTED_IN_A_HEALTHY_FLEET else "NO"
        lines.append(f"| {rule} | {priority} | {n} | {ok} |")
    if not report.starts:
        lines.append("| (none) | - | 0 | - |")
    lines.append(f"unexpected alerts: {len(report.unexpected)}")
    for f in report.unexpected[:20]:
        lines.append(f"  {f.pump_id} {f.rule} {f.priority} {f.at.isoformat()}: {f.summary}")
    return lines
