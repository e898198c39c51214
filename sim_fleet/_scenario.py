"""Scenario files: a fleet, a timeline of faults and clinic actions, and the alerts each must raise.

Loading validates everything a file can get wrong and names the field (`timeline.3.params.bias:
...`); building turns a scenario into live pumps placed in time so the run ends before the wall
clock does (the contract rejects device times from the future). See README.md for the format.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from pumpfleet.findings import RULES, Rule
from sim_fleet._fleet import FleetMix, make_fleet, pump_id
from sim_fleet._model import (
    BatteryEri,
    BatteryFault,
    CatheterOcclusion,
    ClinicianBolus,
    ClinicianReprogram,
    ClinicianSuspend,
    ClockSkew,
    DuplicateDelivery,
    Fault,
    MemoryFault,
    MessageLoss,
    MotorStallFault,
    MriScan,
    OutOfOrderDelivery,
    OverInfusion,
    PartialOcclusion,
    PatientBolusPress,
    PocketFill,
    Pump,
    PumpSpec,
    RefillVisit,
    RotorMismatch,
    SensorDrift,
    TelemetrySilence,
    UnderInfusion,
    continuous_schedule,
    scaled_schedule,
)

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

Priority = Literal["high", "medium", "low", "info"]

NOTICE_WITHIN = timedelta(hours=1)
"""Standing notices (pumpfleet.findings.NOTICES, info) are expected by this long after the start
(they start at a pump's first reading): flow_not_observable on every calculated or valve pump,
clinic_data_missing on every pump set up with `profile: false`. Anywhere else a notice is like
any other alert: a strict run fails on it unless the scenario expects or allows it."""

TIMELINE_TYPES: dict[str, type[Fault]] = {
    "motor_stall": MotorStallFault,
    "mri": MriScan,
    "over_infusion": OverInfusion,
    "under_infusion": UnderInfusion,
    "catheter_occlusion": CatheterOcclusion,
    "rotor_mismatch": RotorMismatch,
    "partial_occlusion": PartialOcclusion,
    "clinician_suspend": ClinicianSuspend,
    "sensor_drift": SensorDrift,
    "pocket_fill": PocketFill,
    "battery_fault": BatteryFault,
    "battery_eri": BatteryEri,
    "memory_error": MemoryFault,
    "telemetry_silence": TelemetrySilence,
    "clock_skew": ClockSkew,
    "duplicate_delivery": DuplicateDelivery,
    "out_of_order": OutOfOrderDelivery,
    "message_loss": MessageLoss,
    "refill": RefillVisit,
    "reprogram": ClinicianReprogram,
    "clinician_bolus": ClinicianBolus,
    "patient_bolus": PatientBolusPress,
}
"""Timeline `type:` names and the fault or action each builds; `params:` are its fields."""
TimelineType = Literal[
    "motor_stall",
    "mri",
    "over_infusion",
    "under_infusion",
    "catheter_occlusion",
    "rotor_mismatch",
    "partial_occlusion",
    "clinician_suspend",
    "sensor_drift",
    "pocket_fill",
    "battery_fault",
    "battery_eri",
    "memory_error",
    "telemetry_silence",
    "clock_skew",
    "duplicate_delivery",
    "out_of_order",
    "message_loss",
    "refill",
    "reprogram",
    "clinician_bolus",
    "patient_bolus",
]

SETTABLE = (frozenset(f.name for f in dataclasses.fields(PumpSpec)) - {"pump_id", "seed"}) | {
    "dose_mcg_per_day"
}
"""Keys a scenario's `pumps[].set` may change: PumpSpec fields, plus `dose_mcg_per_day`."""


class ScenarioError(ValueError):
    """A scenario that cannot be loaded or built; `str()` names the file and field."""


# Durations ----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNIT_S = {"w": 604_800.0, "d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> timedelta:
    """`90m`, `1d12h`, `2w`, a number of seconds, or a timedelta; never negative."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.replace(" ", "").lower()
        parts = list(_DURATION_PART.finditer(text))
        if "".join(p.group(0) for p in parts) != text:
            raise ValueError(f"{value!r} is not a duration like 90m, 1d12h, 2w or 3600 (seconds)")
        seconds = sum(float(p.group(1)) * _UNIT_S[p.group(2)] for p in parts)
    else:
        raise ValueError(f"{value!r} is not a duration like 90m, 1d12h, 2w or 3600 (seconds)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _speed(value: object) -> float | str:
    if value == "max":
        return "max"
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ValueError(f"{value!r} is not a positive number (simulated s per wall s) or max")


PumpRef = Annotated[
    int | str, Field(description="Fleet index from 0, or the pump id, e.g. P-000001.")
]


# The file's shape ---------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpectedAlertSpec(_Model):
    """An alert the pipeline must raise within `within` of its timeline item (or of the start)."""

    rule: Rule
    priority: Priority
    within: Duration
    pump: PumpRef | None = Field(default=None, description="Default: the item's own pump.")


class PumpSetup(_Model):
    """Per-pump changes to the generated fleet, and the alerts they must raise from the start."""

    pump: PumpRef
    set: dict[str, Any] = Field(default_factory=dict)
    profile: bool = Field(
        default=True,
        description="The clinic has confirmed this pump (a PumpProfile with its high-risk "
        "status); false: no profile, so clinic_data_missing is expected.",
    )
    expect: tuple[ExpectedAlertSpec, ...] = ()
    allow: tuple[Rule, ...] = ()

    @model_validator(mode="after")
    def _settable(self) -> PumpSetup:
        apply_settings(_SAMPLE_SPEC, self.set, where="set")
        return self


class TimelineItem(_Model):
    """One fault or clinic action on one pump at an offset from the start."""

    pump: PumpRef
    at: Duration
    type: TimelineType
    params: dict[str, Any] = Field(default_factory=dict)
    expect: tuple[ExpectedAlertSpec, ...] = ()
    allow: tuple[Rule, ...] = Field(
        default=(), description="Rules that may fire on this pump as a side effect (any time)."
    )

    @model_validator(mode="after")
    def _params_valid(self) -> TimelineItem:
        self.fault(datetime(2000, 1, 1, tzinfo=UTC))
        return self

    def fault(self, at: datetime) -> Fault:
        """The fault or action this item builds, starting at `at`."""
        cls = TIMELINE_TYPES[self.type]
        names = sorted(f.name for f in dataclasses.fields(cls) if f.name != "at")
        unknown = sorted(set(self.params) - set(names))
        if unknown:
            raise ValueError(
                f"params.{unknown[0]}: not a parameter of {self.type}; "
                f"expected {', '.join(names) or 'no parameters'}"
            )
        body = json.dumps({**self.params, "at": at.isoformat()}, default=str)
        try:
            return _adapter(cls).validate_json(body)
        except ValidationError as exc:
            raise ValueError(_describe(exc, "params")) from None


class FleetSection(_Model):
    n: int = Field(ge=1, le=1_000_000)
    mix: FleetMix = Field(default_factory=FleetMix)


class Scenario(_Model):
    """A whole scenario file."""

    name: str = Field(min_length=1, max_length=100)
    description: str = ""
    seed: int = 0
    start: datetime | None = Field(
        default=None,
        description="Simulated start (with a UTC offset); default: placed so the simulated "
        "timeline ends when the run ends (see `start_for`).",
    )
    duration: Duration
    speed: Annotated[float | Literal["max"], BeforeValidator(_speed)] = Field(
        default="max", description="Simulated seconds per wall-clock second, or max."
    )
    strict: bool = Field(
        default=True,
        description="Any alert not expected or allowed on that pump fails the run.",
    )
    fleet: FleetSection
    pumps: tuple[PumpSetup, ...] = ()
    timeline: tuple[TimelineItem, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        n = self.fleet.n
        if self.duration <= timedelta(0):
            raise ValueError("duration: must be longer than 0")
        if self.start is not None and self.start.utcoffset() is None:
            raise ValueError("start: must carry a UTC offset, e.g. 2026-01-01T00:00:00Z")
        seen: set[int] = set()
        for i, setup in enumerate(self.pumps):
            index = pump_index(setup.pump, n, f"pumps.{i}.pump")
            if index in seen:
                raise ValueError(f"pumps.{i}.pump: {pump_id(index)} is set up twice")
            seen.add(index)
            for j, exp in enumerate(setup.expect):
                pump_index(exp.pump or setup.pump, n, f"pumps.{i}.expect.{j}.pump")
        for i, item in enumerate(self.timeline):
            pump_index(item.pump, n, f"timeline.{i}.pump")
            if item.at > self.duration:
                raise ValueError(f"timeline.{i}.at: {item.at} is after the end ({self.duration})")
            for j, exp in enumerate(item.expect):
                pump_index(exp.pump or item.pump, n, f"timeline.{i}.expect.{j}.pump")
        return self

    @property
    def speed_factor(self) -> float | None:
        """Simulated seconds per wall second; None: as fast as possible."""
        return None if self.speed == "max" else float(self.speed)

    def start_for(self, now: datetime) -> datetime:
        """The simulated start that keeps every simulated time at or before the wall clock.

        With speed s the run takes duration/s of wall time; starting at
        now - duration + duration/s makes the simulated timeline end exactly when the run does
        (speed 1: start now; max speed: start `duration` ago).
        """
        if self.start is not None:
            return self.start.astimezone(UTC)
        speed = self.speed_factor
        wall = self.duration / speed if speed else timedelta(0)
        return now.astimezone(UTC) - self.duration + wall


def pump_index(ref: int | str, n: int, where: str) -> int:
    """Fleet index of a pump reference, checked against a fleet of `n`."""
    if isinstance(ref, int):
        index = ref
    else:
        match = re.fullmatch(r"P-(\d{6})", ref)
        if not match:
            raise ValueError(f"{where}: {ref!r} is neither a fleet index nor an id like P-000001")
        index = int(match.group(1)) - 1
    if not 0 <= index < n:
        raise ValueError(f"{where}: {ref!r} is outside a fleet of {n} (indexes 0-{n - 1})")
    return index


def apply_settings(spec: PumpSpec, settings: dict[str, Any], where: str = "set") -> PumpSpec:
    """`spec` with a scenario's `set:` applied and re-validated; errors name `where.field`."""
    unknown = sorted(set(settings) - SETTABLE)
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: not a pump setting; "
            f"expected one of {', '.join(sorted(SETTABLE))}"
        )
    body: dict[str, Any] = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    body["schedule"] = spec.schedule.model_dump(mode="json")
    body.update({k: v for k, v in settings.items() if k != "dose_mcg_per_day"})
    try:
        new = _adapter(PumpSpec).validate_json(json.dumps(body, default=str))
        if "dose_mcg_per_day" in settings:
            dose = settings["dose_mcg_per_day"]
            if not isinstance(dose, int | float) or isinstance(dose, bool):
                raise ValueError("dose_mcg_per_day: must be a number")
            if not 0 <= dose <= 10_000:
                raise ValueError("dose_mcg_per_day: must be in [0, 10000]")
            schedule = (
                scaled_schedule(new.schedule, dose)
                if "schedule" in settings
                else continuous_schedule(dose)
            )
            new = dataclasses.replace(new, schedule=schedule)
    except ValidationError as exc:
        raise ValueError(_describe(exc, where)) from None
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
    return new


_SAMPLE_SPEC = PumpSpec(
    pump_id="P-000001",
    reservoir_capacity_ml=40.0,
    concentration_mcg_per_ml=2000.0,
    schedule=continuous_schedule(500.0),
)
"""Checks a `set:` block at load time; values that depend on the real pump are checked at build."""

_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


_FIELD_MSG = re.compile(r"^([a-z_][a-z0-9_.]*): (.+)$", re.S)


def _describe(exc: ValidationError, prefix: str = "") -> str:
    """Pydantic's errors as `field.path: reason`; a reason that starts with a field name (our
    own validators' style) extends the path instead of repeating it."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [prefix] if prefix else []
        loc += [str(p) for p in err["loc"]]
        msg = str(err["msg"]).removeprefix("Value error, ")
        named = _FIELD_MSG.match(msg)
        if named:
            loc.append(named.group(1))
            msg = named.group(2)
        where = ".".join(loc)
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# Loading ------------------------------------------------------------------------------------


def builtin_scenarios() -> dict[str, Path]:
    """The scenarios shipped with the package, by name."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.yaml"))}


def find_scenario(name_or_path: str | Path) -> Path:
    """A scenario file: an existing path, or the name of a shipped scenario (e.g. `faults`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = builtin_scenarios()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ScenarioError(
        f"no scenario file {str(name_or_path)!r}; give a path or one of: {', '.join(shipped)}"
    )


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Validate a scenario from YAML text; ScenarioError names the source and the field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"{source}:{where} not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping of scenario fields at the top level")
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}  # anchors' home
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: {_describe(exc)}") from None


def with_fleet_size(scenario: Scenario, n: int) -> Scenario:
    """The scenario with `n` pumps: its own first (every setup and timeline item keeps its pump),
    then healthy pumps of its mix. Pump i's spec does not depend on n (`make_fleet`), so the
    scenario's pumps and their expected alerts are unchanged; the extra ones must stay silent."""
    own = scenario.fleet.n
    if not own <= n <= 1_000_000:
        raise ScenarioError(
            f"--pumps {n}: the {scenario.name} scenario needs at least its own {own} pumps "
            "(and at most 1,000,000)"
        )
    return scenario.model_copy(update={"fleet": scenario.fleet.model_copy(update={"n": n})})


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Read and validate a scenario file (a path or a shipped scenario's name)."""
    path = find_scenario(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_scenario(text, str(path))


# Building a run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpectedAlert:
    """An alert that must be raised for `pump_id` between `after` and `due` (simulated time)."""

    pump_id: str
    rule: str
    priority: str
    after: datetime
    due: datetime
    cause: str


@dataclass(frozen=True, slots=True)
class RaisedAlert:
    """An alert the pipeline raised (or escalated to `priority`) at simulated time `time`."""

    pump_id: str
    rule: str
    priority: str
    time: datetime


@dataclass(slots=True)
class SimRun:
    """A scenario made concrete: live pumps with their faults, and the alerts to check."""

    scenario: Scenario
    start: datetime
    end: datetime
    pumps: list[Pump]
    expected: tuple[ExpectedAlert, ...]
    """The scenario's expectations, then the standing notices each pump must get."""
    allowed: frozenset[tuple[str, str]]
    """(pump_id, rule) pairs that may fire without failing a strict run."""
    no_profile: frozenset[str] = frozenset()
    """Pumps the clinic has not confirmed: a transport gives the rules no profile for them."""

    def has_profile(self, pump_id: str) -> bool:
        """Whether the rules should get a confirmed clinic profile for this pump."""
        return pump_id not in self.no_profile

    @property
    def speed(self) -> float | None:
        return self.scenario.speed_factor

    def sim_time(self, wall_elapsed_s: float) -> datetime:
        """Simulated time after `wall_elapsed_s` of a paced run (the end if speed is max)."""
        speed = self.speed
        if speed is None:
            return self.end
        return min(self.end, self.start + timedelta(seconds=wall_elapsed_s * speed))

    def outcomes(
        self, raised: Iterable[RaisedAlert]
    ) -> list[tuple[ExpectedAlert, RaisedAlert | None]]:
        """Each expected alert with the first raised alert that meets it (None: missed)."""
        ordered = sorted(raised, key=lambda a: a.time)
        return [
            (
                e,
                next(
                    (
                        a
                        for a in ordered
                        if a.pump_id == e.pump_id
                        and a.rule == e.rule
                        and a.priority == e.priority
                        and e.after <= a.time <= e.due
                    ),
                    None,
                ),
            )
            for e in self.expected
        ]

    def unexpected(self, raised: Iterable[RaisedAlert]) -> list[RaisedAlert]:
        """Alerts on a (pump, rule) nobody expected or allowed, first of each priority; only
        a strict scenario counts them as failures."""
        known = {(e.pump_id, e.rule) for e in self.expected} | self.allowed
        seen: set[tuple[str, str, str]] = set()
        out = []
        for a in sorted(raised, key=lambda a: a.time):
            key = (a.pump_id, a.rule, a.priority)
            if (a.pump_id, a.rule) not in known and key not in seen:
                seen.add(key)
                out.append(a)
        return out

    def check(self, raised: Iterable[RaisedAlert]) -> list[str]:
        """What the pipeline got wrong: missing or late expected alerts, and (if strict)
        alerts nobody expected. An empty list is a pass."""
        raised = list(raised)
        problems = [
            f"missing: {e.pump_id} {e.rule} ({e.priority}) by {e.due.isoformat()} after {e.cause}"
            for e, met in self.outcomes(raised)
            if met is None
        ]
        if self.scenario.strict:
            problems += [
                f"unexpected: {a.pump_id} {a.rule} ({a.priority}) at {a.time.isoformat()}"
                for a in self.unexpected(raised)
            ]
        return problems


def build_run(scenario: Scenario, now: datetime | None = None) -> SimRun:
    """Make the fleet, apply per-pump settings, attach the timeline and place it in time."""
    now = now or datetime.now(UTC)
    start = scenario.start_for(now)
    end = start + scenario.duration
    speed = scenario.speed_factor
    wall = scenario.duration / speed if speed else timedelta(0)
    if end > now + wall or start > now:
        raise ScenarioError(
            f"start: a run starting {start.isoformat()} would get ahead of the wall clock, and "
            "the contract rejects device times from the future; move start earlier or drop it"
        )
    n = scenario.fleet.n
    specs = make_fleet(n, scenario.seed, scenario.fleet.mix)
    expected: list[ExpectedAlert] = []
    allowed: set[tuple[str, str]] = set()

    def expect(pump: int, wanted: Iterable[ExpectedAlertSpec], at: datetime, cause: str) -> None:
        for exp in wanted:
            target = pump if exp.pump is None else pump_index(exp.pump, n, "pump")
            expected.append(
                ExpectedAlert(pump_id(target), exp.rule, exp.priority, at, at + exp.within, cause)
            )

    no_profile: set[str] = set()
    for i, setup in enumerate(scenario.pumps):
        index = pump_index(setup.pump, n, f"pumps.{i}.pump")
        try:
            specs[index] = apply_settings(specs[index], setup.set, where=f"pumps.{i}.set")
        except ValueError as exc:
            raise ScenarioError(f"{scenario.name}: {exc}") from None
        expect(index, setup.expect, start, f"pumps[{i}] set at the start")
        allowed.update((pump_id(index), rule) for rule in setup.allow)
        if not setup.profile:
            no_profile.add(pump_id(index))

    faults: list[list[Fault]] = [[] for _ in range(n)]
    for i, item in enumerate(scenario.timeline):
        index = pump_index(item.pump, n, f"timeline.{i}.pump")
        at = start + item.at
        faults[index].append(item.fault(at))
        expect(index, item.expect, at, f"timeline[{i}] {item.type} at +{item.at}")
        allowed.update((pump_id(index), rule) for rule in item.allow)

    # Standing notices: what each pump's family and profile say the rules cannot watch.
    due = start + min(NOTICE_WITHIN, scenario.duration)
    for spec in specs:
        notices = []
        if spec.family != "measured":
            notices.append(("flow_not_observable", f"standing notice: {spec.family} volume"))
        if spec.pump_id in no_profile:
            notices.append(("clinic_data_missing", "standing notice: no clinic profile"))
        expected += [ExpectedAlert(spec.pump_id, r, "info", start, due, c) for r, c in notices]

    pumps = [Pump(spec, start, faults[i]) for i, spec in enumerate(specs)]
    return SimRun(
        scenario, start, end, pumps, tuple(expected), frozenset(allowed), frozenset(no_profile)
    )


__all__ = [
    "NOTICE_WITHIN",
    "RULES",
    "SCENARIO_DIR",
    "TIMELINE_TYPES",
    "Duration",
    "ExpectedAlert",
    "ExpectedAlertSpec",
    "PumpSetup",
    "RaisedAlert",
    "Scenario",
    "ScenarioError",
    "SimRun",
    "TimelineItem",
    "apply_settings",
    "build_run",
    "builtin_scenarios",
    "find_scenario",
    "load_scenario",
    "parse_duration",
    "parse_scenario",
    "pump_index",
]
