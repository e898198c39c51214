"""The wire contract, version 2 (version 1 still accepted): every message a pump sends, and the
topics it sends them on.

This module is the one home of the contract. The agent, the simulator, the ingester and the
dashboards import it; nobody keeps a copy. `pumpfleet contract schema` writes the JSON Schema of
each message to docs/contract/ so that firmware teams can code against it.

Units are in field names (`_ml`, `_ul_per_h`, `_mcg_per_day`, `_pct`); times are UTC from the
device clock; `seq` is per pump, increases by one per message and survives agent restarts, so
(pump_id, seq) identifies a message and lets storage drop redeliveries.

Version 2 says what the rules need to be honest about what a pump can see (docs/contract/
MIGRATION.md): how the reservoir volume was obtained (`reservoir_source`: `calculated` from the
refill entry and rotor or valve counts, or `measured` by an independent sensor), the reporting
interval, the flow the programme asked for over the interval, the date ERI began, and which
refill volumes the clinician entered and which the pump measured. A version 1 payload carries
none of these and is read as what every pump on the market is: a calculated volume.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)

CONTRACT_VERSION = 2
"""What agents publish; `ACCEPTED_VERSIONS` is what the decoder takes."""
ACCEPTED_VERSIONS = (1, 2)
TOPIC_ROOT = "pumps"
MAX_FUTURE_SKEW = timedelta(minutes=10)
"""A device time further ahead of the receiver's clock than this is impossible, not skew."""
_MAX_FUTURE_SKEW_S = MAX_FUTURE_SKEW.total_seconds()
MAX_FLEX_STEPS = 13
MAX_PAYLOAD_BYTES = 16 * 1024
"""Largest payload the ingester accepts; a telemetry message is about 400 bytes."""

PUMP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    "|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    "|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
DATE_TIME_PATTERN = (
    f"^(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
    "[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:[.][0-9]+)?"
    "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
"""RFC 3339 date-time (section 5.6) as the decoder takes it: a real calendar day from year 1,
no leap second (Python's datetime has none), a UTC offset. Written for both ECMA-262 (JSON
Schema's regex dialect) and Python's `re`, so every validator reads it alike."""
_DATE_TIME = re.compile(DATE_TIME_PATTERN)
_EXACT_FLOAT_INT = 2**53
"""Up to here a double holds every integer exactly."""


class Kind(StrEnum):
    """The leaf of a pump's topic tree: which message the topic carries."""

    TELEMETRY = "telemetry"
    EVENT = "event"
    STATUS = "status"


class PumpAlarm(StrEnum):
    """The pump's own alarms (domain.md, 'Pump alarms')."""

    LOW_RESERVOIR = "low_reservoir"
    EMPTY_RESERVOIR = "empty_reservoir"
    ERI = "eri"
    EOS = "eos"
    MOTOR_STALL = "motor_stall"
    CRITICAL_MEMORY_ERROR = "critical_memory_error"
    NONCRITICAL_MEMORY_ERROR = "noncritical_memory_error"
    REDUCED_BATTERY_PERFORMANCE = "reduced_battery_performance"


class PumpState(StrEnum):
    INFUSING = "infusing"
    """Rotor turning as programmed."""
    SUSPENDED = "suspended"
    """Stopped on purpose: clinician stop, or an MRI scan in progress."""
    STALLED = "stalled"
    """Rotor not turning although programmed to."""
    STOPPED = "stopped"
    """No delivery because of an alarm: empty reservoir, EOS, critical memory error."""


class ReservoirSource(StrEnum):
    """How a reservoir volume was obtained (domain.md, 'What a pump can actually report')."""

    CALCULATED = "calculated"
    """The pump's estimate: volume entered at the last refill minus rotor or valve counts. It
    falls exactly as programmed even when the catheter is blocked or the pump over-infuses."""
    MEASURED = "measured"
    """An independent sensor, with noise and drift of its own."""


class DosingMode(StrEnum):
    CONTINUOUS = "continuous"
    FLEX = "flex"


def _utc(value: datetime) -> datetime:
    offset = value.utcoffset()
    if offset is None:
        raise ValueError("must carry a UTC offset (RFC 3339), e.g. 2026-01-01T00:00:00Z")
    try:
        if offset:
            value = value.astimezone(UTC)
        ahead_s = value.timestamp() - time.time()
    except OverflowError:
        raise ValueError("is outside the years 1 to 9999 once converted to UTC") from None
    if ahead_s > _MAX_FUTURE_SKEW_S:
        raise ValueError(f"is more than {MAX_FUTURE_SKEW} ahead of the receiver's clock")
    return value


def _device_time(value: object, parse: ValidatorFunctionWrapHandler) -> datetime:
    """RFC 3339 only, as the schema says: the datetime parser alone also takes a space for the
    `T`, no seconds, `+0100`, a decimal comma and unix seconds in a string. (A datetime object
    comes from Python code, not the wire.) One call for both checks: it runs on every message."""
    if not isinstance(value, datetime) and not (
        isinstance(value, str) and _DATE_TIME.fullmatch(value)
    ):
        raise ValueError(
            "must be an RFC 3339 date-time with a UTC offset, e.g. 2026-01-01T00:00:00Z"
        )
    return _utc(parse(value))


def _integer(value: object) -> object:
    """JSON has one number type, and JSON Schema's `integer` is any number with a zero fraction:
    `55.0` and `5.5e1` are the integer 55, and are read as 55. Past 2**53 such a spelling has
    gone through a double and may no longer be the number that was meant: refused."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float) and value.is_integer():
        if abs(value) > _EXACT_FLOAT_INT:
            raise ValueError(
                "an integer above 2**53 must be written as digits only (no fraction or exponent)"
            )
        return int(value)
    return value


DeviceTime = Annotated[
    datetime,
    # Lax inside: in a validator the input is a Python str, which a strict datetime refuses;
    # `_device_time` lets through only strings of the right form.
    Field(strict=False),
    WrapValidator(_device_time),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": DATE_TIME_PATTERN}),
]
Integer = Annotated[int, BeforeValidator(_integer)]
"""An int field as JSON Schema's `integer`: 55.0 is 55 (see `_integer`)."""
Volume_ml = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Rate_ul_per_h = Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]
Dose_mcg_per_day = Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Envelope(_Strict):
    v: Annotated[Literal[1, 2], BeforeValidator(_integer)] = Field(
        description="Contract version: 2; 1 is still accepted."
    )
    pump_id: str = Field(pattern=PUMP_ID_PATTERN, description="Must equal the topic's pump id.")
    time: DeviceTime = Field(description="Device clock, UTC, RFC 3339.")
    seq: Integer = Field(ge=0, lt=2**63, description="Per-pump sequence, +1 per message.")


_TELEMETRY_V2 = ("reservoir_source", "reporting_interval_s", "scheduled_ul_per_h")
_REFILL_V2 = ("expected_source", "reservoir_after_source")


def _versioned(msg: BaseModel, fields: tuple[str, ...], v: int) -> None:
    """Version 2 fields are required in v2 and absent in v1."""
    for name in fields:
        present = getattr(msg, name) is not None
        if v >= 2 and not present:
            raise ValueError(f"{name}: required in contract v2")
        if v < 2 and present:
            raise ValueError(f"{name}: not part of contract v1 (send v: 2)")


def _present(fields: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """JSON Schema for "given and not null": the decoder reads a null field as absent."""
    return {
        "required": list(fields),
        "properties": {f: {"not": {"type": "null"}} for f in fields},
    }


def _absent(fields: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """JSON Schema for "absent or null" (read as absent)."""
    return {"properties": {f: {"type": "null"} for f in fields}}


def _v2_required(fields: tuple[str, ...]) -> dict[str, Any]:
    """The same rule in the published JSON Schema."""
    return {
        "allOf": [
            {
                "if": {"properties": {"v": {"const": 2}}},
                "then": _present(fields),
                "else": _absent(fields),
            }
        ]
    }


_TELEMETRY_SCHEMA_EXTRA = _v2_required(_TELEMETRY_V2)
_TELEMETRY_SCHEMA_EXTRA["allOf"].append(
    {
        "if": {"properties": {"v": {"const": 2}, "battery_eri": {"const": True}}},
        "then": _present(["eri_since"]),
        "else": _absent(["eri_since"]),
    }
)


class Telemetry(_Envelope):
    """Periodic reading, sent every reporting interval."""

    model_config = ConfigDict(json_schema_extra=_TELEMETRY_SCHEMA_EXTRA)

    kind: Literal["telemetry"] = "telemetry"
    delivered_ul_per_h: Rate_ul_per_h = Field(
        description="Flow the pump delivered over the last interval, from rotor counts."
    )
    programmed_rate_ul_per_h: Rate_ul_per_h = Field(description="Rate programmed right now.")
    programmed_dose_mcg_per_day: Dose_mcg_per_day = Field(
        description="Daily dose of the programmed schedule (boluses excluded)."
    )
    reservoir_ml: Volume_ml = Field(description="Drug volume the pump estimates it holds.")
    reservoir_capacity_ml: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
    low_reservoir_alarm_ml: Volume_ml = Field(description="Programmed low-reservoir alarm volume.")
    concentration_mcg_per_ml: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)]
    battery_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
    battery_eri: bool = Field(description="Elective replacement indicator active.")
    pump_state: PumpState
    alarms: tuple[PumpAlarm, ...] = Field(
        default=(),
        max_length=len(PumpAlarm),
        description="Active pump alarms, each at most once.",
        json_schema_extra={"uniqueItems": True},
    )
    # Version 2: required there, absent in version 1.
    reservoir_source: ReservoirSource | None = Field(
        default=None,
        description="v2: how reservoir_ml was obtained: calculated (refill entry minus rotor or "
        "valve counts) or measured (an independent sensor). v1: absent, read as calculated.",
    )
    # Bounds before the validator: after it pydantic would publish them as `ge`/`le`, which
    # JSON Schema does not know (and so would not check).
    reporting_interval_s: (
        Annotated[int, Field(ge=1, le=86_400), BeforeValidator(_integer)] | None
    ) = Field(default=None, description="v2: seconds between two telemetry messages of this pump.")
    scheduled_ul_per_h: Rate_ul_per_h | None = Field(
        default=None,
        description="v2: flow the programme (schedule steps and boluses) asked for over the "
        "same interval as delivered_ul_per_h; 0 while suspended.",
    )
    eri_since: DeviceTime | None = Field(
        default=None,
        description="v2: when the elective replacement indicator began (the pump records it); "
        "required while battery_eri is true, absent otherwise.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Telemetry:
        if self.reservoir_ml > self.reservoir_capacity_ml:
            raise ValueError(
                f"reservoir_ml {self.reservoir_ml} exceeds reservoir_capacity_ml "
                f"{self.reservoir_capacity_ml}"
            )
        if self.low_reservoir_alarm_ml > self.reservoir_capacity_ml:
            raise ValueError("low_reservoir_alarm_ml exceeds reservoir_capacity_ml")
        if len(set(self.alarms)) != len(self.alarms):
            raise ValueError("alarms: an alarm is listed twice")
        _versioned(self, _TELEMETRY_V2, self.v)
        if self.v == 1 and self.eri_since is not None:
            raise ValueError("eri_since: not part of contract v1 (send v: 2)")
        if self.v == 2 and (self.eri_since is not None) != self.battery_eri:
            raise ValueError("eri_since: required while battery_eri is true, absent otherwise")
        return self

    @property
    def source(self) -> ReservoirSource:
        """How reservoir_ml was obtained; a v1 message's volume is the pump's calculation."""
        return self.reservoir_source or ReservoirSource.CALCULATED


class FlexStep(_Strict):
    start_minute: Integer = Field(ge=0, lt=24 * 60, description="Minutes after local midnight.")
    dose_mcg_per_day: Dose_mcg_per_day = Field(description="Rate of this step as a daily dose.")


_FIRST_STEP = {"properties": {"start_minute": {"const": 0}}}
_SCHEDULE_SCHEMA_EXTRA: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"mode": {"const": DosingMode.CONTINUOUS.value}}},
            "then": {"properties": {"steps": {"maxItems": 0}}},
            # `contains` says it too, for validators that predate `prefixItems` (2020-12).
            "else": {
                "required": ["steps"],
                "properties": {
                    "steps": {"minItems": 1, "prefixItems": [_FIRST_STEP], "contains": _FIRST_STEP}
                },
            },
        }
    ]
}


class Schedule(_Strict):
    """A programmed schedule: one continuous dose, or up to 13 flex steps a day."""

    model_config = ConfigDict(json_schema_extra=_SCHEDULE_SCHEMA_EXTRA)

    mode: DosingMode
    dose_mcg_per_day: Dose_mcg_per_day = Field(description="Total programmed daily dose.")
    steps: tuple[FlexStep, ...] = Field(
        default=(),
        max_length=MAX_FLEX_STEPS,
        description="Flex steps, start_minute increasing from 0; none in a continuous schedule.",
        json_schema_extra={"uniqueItems": True},
    )

    @model_validator(mode="after")
    def _steps_fit_mode(self) -> Schedule:
        if self.mode is DosingMode.CONTINUOUS and self.steps:
            raise ValueError("steps: a continuous schedule has no flex steps")
        if self.mode is DosingMode.FLEX:
            if not self.steps:
                raise ValueError("steps: a flex schedule needs at least one step")
            starts = [s.start_minute for s in self.steps]
            if starts[0] != 0 or starts != sorted(set(starts)):
                raise ValueError("steps: must start at minute 0 and increase")
        return self


class _Event(_Envelope):
    kind: Literal["event"] = "event"


class Refill(_Event):
    """A refill visit. `withdrawn_ml` and `injected_ml` are what the clinician entered (syringe
    readings, tenths of a mL of human error); the other two say where they came from."""

    model_config = ConfigDict(json_schema_extra=_v2_required(_REFILL_V2))

    event: Literal["refill"]
    expected_ml: Volume_ml = Field(description="Volume the pump expected to hold before refill.")
    withdrawn_ml: Volume_ml = Field(
        description="Volume the clinician withdrew from the reservoir at refill (entered)."
    )
    injected_ml: Volume_ml = Field(description="Volume the clinician injected (entered).")
    reservoir_after_ml: Volume_ml = Field(description="Reservoir volume after the refill.")
    concentration_mcg_per_ml: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)]
    expected_source: ReservoirSource | None = Field(
        default=None,
        description="v2: calculated (refill entry minus rotor counts) or measured by a sensor.",
    )
    reservoir_after_source: Literal["entered", "measured"] | None = Field(
        default=None,
        description="v2: entered by the clinician (a calculated-volume pump takes the injected "
        "volume on trust) or measured by the pump's sensor after the refill.",
    )

    @model_validator(mode="after")
    def _v2(self) -> Refill:
        _versioned(self, _REFILL_V2, self.v)
        return self


class Reprogram(_Event):
    event: Literal["reprogram"]
    old_schedule: Schedule
    new_schedule: Schedule
    session: bool = Field(
        default=True,
        description="True when a clinician programming session made the change; a rate "
        "change without one is a battery-fault reset.",
    )


class Bolus(_Event):
    event: Literal["bolus"]
    source: Literal["clinician", "patient"]
    dose_mcg: Annotated[float, Field(gt=0, le=2_000, allow_inf_nan=False)]
    duration_min: Annotated[float, Field(ge=0, le=24 * 60, allow_inf_nan=False)]


class Suspend(_Event):
    """A clinician stopped therapy in a programming session: no delivery is on purpose."""

    event: Literal["suspend"]


class Resume(_Event):
    """A clinician restarted therapy after a suspend."""

    event: Literal["resume"]


class MriStart(_Event):
    event: Literal["mri_start"]


class MriEnd(_Event):
    event: Literal["mri_end"]


class MotorStall(_Event):
    event: Literal["motor_stall"]


class MotorStallRecovery(_Event):
    event: Literal["motor_stall_recovery"]
    stalled_since: DeviceTime


class AlarmRaised(_Event):
    event: Literal["alarm_raised"]
    alarm: PumpAlarm


class AlarmCleared(_Event):
    event: Literal["alarm_cleared"]
    alarm: PumpAlarm


class Status(_Envelope):
    """Retained on the pump's status topic; the agent's MQTT last will says offline."""

    kind: Literal["status"] = "status"
    online: bool
    reason: str | None = Field(default=None, max_length=200, pattern=r"^[^\x00-\x1f]*$")


EventMessage = (
    Refill
    | Reprogram
    | Bolus
    | Suspend
    | Resume
    | MriStart
    | MriEnd
    | MotorStall
    | MotorStallRecovery
    | AlarmRaised
    | AlarmCleared
)
Message = Telemetry | Status | EventMessage

Event = Annotated[EventMessage, Field(discriminator="event")]

_ADAPTERS: dict[Kind, TypeAdapter[Any]] = {
    Kind.TELEMETRY: TypeAdapter(Telemetry),
    Kind.EVENT: TypeAdapter(Event),
    Kind.STATUS: TypeAdapter(Status),
}


# Topics ---------------------------------------------------------------------------------------


class ContractError(ValueError):
    """A message that breaks the contract; `str()` is the reason stored in the dead-letter table."""


_KINDS = {k.value: k for k in Kind}


def topic(pump_id: str, kind: Kind | str) -> str:
    return f"{TOPIC_ROOT}/{pump_id}/{Kind(kind).value}"


def subscription(kind: Kind | str | None = None, shared_group: str | None = None) -> str:
    """Topic filter for every pump's `kind` messages (all kinds if None), optionally shared."""
    leaf = Kind(kind).value if kind is not None else "#"
    filt = f"{TOPIC_ROOT}/+/{leaf}"
    return f"$share/{shared_group}/{filt}" if shared_group else filt


def parse_topic(name: str) -> tuple[str, Kind]:
    """Split `pumps/{pump_id}/{kind}` into its pump id and kind."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != TOPIC_ROOT:
        raise ContractError(f"topic {name!r} is not {TOPIC_ROOT}/{{pump_id}}/{{kind}}")
    kind = _KINDS.get(parts[2])
    if kind is None:
        raise ContractError(
            f"topic {name!r}: unknown kind {parts[2]!r}, expected one of "
            f"{', '.join(k.value for k in Kind)}"
        )
    return parts[1], kind


# Decoding ---------------------------------------------------------------------------------------


def describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode(topic_name: str, payload: bytes | bytearray | str) -> Message:
    """Validate one MQTT message; raise ContractError naming the field on any breach.

    The topic's pump id must equal the payload's: a mismatch is spoofing.
    """
    pump_id, kind = parse_topic(topic_name)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError(f"payload: {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES} limit")
    try:
        msg = _ADAPTERS[kind].validate_json(payload)
    except ValidationError as exc:
        raise ContractError(describe(exc)) from None
    if msg.pump_id != pump_id:
        raise ContractError(
            f"pump_id: payload says {msg.pump_id!r} but topic says {pump_id!r} (spoofing)"
        )
    return msg


def encode(msg: BaseModel) -> bytes:
    """Serialise a message the way agents put it on the wire."""
    return msg.model_dump_json(exclude_none=True).encode()


def kind_of(msg: BaseModel) -> Kind:
    return Kind(getattr(msg, "kind"))  # noqa: B009 - every message model has `kind`


# JSON Schema ------------------------------------------------------------------------------------


_UNSTATED_COMMON = (
    "pump_id equals the pump id of the topic, which is not part of the payload",
    f"the payload is UTF-8 JSON (RFC 8259) of at most {MAX_PAYLOAD_BYTES} bytes, with no lone "
    "surrogate escape such as \\ud800",
    f"a date-time is at most {int(MAX_FUTURE_SKEW.total_seconds() // 60)} minutes ahead of the "
    "receiver's clock, and within the years 1 to 9999 once converted to UTC",
    "an integer written with a fraction or an exponent (55.0, 5.5e1: read as 55) is at most "
    "2**53 in magnitude, where a double stops holding every integer; larger ones are written as "
    "digits only",
)
_UNSTATED = {
    Kind.TELEMETRY: (
        "reservoir_ml and low_reservoir_alarm_ml are at most reservoir_capacity_ml",
        *_UNSTATED_COMMON,
    ),
    Kind.EVENT: (
        "the start_minute of a flex schedule's steps strictly increase (the schema states that "
        "the first is 0 and that no step is repeated)",
        *_UNSTATED_COMMON,
    ),
    Kind.STATUS: _UNSTATED_COMMON,
}
"""Rules the decoder enforces that JSON Schema cannot state: they compare two fields, or the
payload with something outside it (topic, clock, bytes on the wire, the number's spelling)."""


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of each topic's payload, keyed by file name.

    The decoder and the schema agree on every payload (tests/test_contract_agreement.py) but for
    the rules listed in the description, which JSON Schema cannot state.
    """
    out = {}
    for kind, adapter in _ADAPTERS.items():
        schema = adapter.json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        # Absolute, as 2020-12 asks of a root $id (a relative one breaks nested $ref resolution
        # in some tools); the reserved .invalid domain says it is a name, not a download.
        schema["$id"] = f"https://pumpfleet.invalid/contract/v{CONTRACT_VERSION}/{kind.value}.json"
        schema.setdefault("title", kind.value.capitalize())
        unstated = "".join(f"\n- {rule};" for rule in _UNSTATED[kind]).rstrip(";")
        schema["description"] = (
            f"Payload published on topic {topic('{pump_id}', kind)} (contract v{CONTRACT_VERSION})."
            " A field given as null is read as absent. Patterns are ECMA-262: `$` is the end of "
            "the string. The decoder also enforces what this schema cannot state:" + unstated + "."
        )
        out[f"{kind.value}.v{CONTRACT_VERSION}.json"] = schema
    return out


def write_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
