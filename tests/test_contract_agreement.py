"""The published JSON Schema and the decoder agree on every payload.

Firmware teams code against docs/contract/*.v2.json; the ingester runs `contract.decode`. Every
payload is judged by both: the decoder accepts it exactly when the schema does and it breaks
none of the rules the schema's description lists as beyond JSON Schema. Payloads come from the
committed schema files themselves (hypothesis-jsonschema), raw and after JSON-level rewrites
(a number respelled, a field nulled, dropped or repeated, a time written another way), so both
directions are tried: schema-valid payloads the decoder would refuse, and payloads the decoder
would take that the schema refuses.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from pumpfleet import contract as c

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("telemetry", "event", "status")
SCHEMAS: dict[str, dict[str, Any]] = {
    kind: json.loads((ROOT / "docs" / "contract" / f"{kind}.v2.json").read_text()) for kind in KINDS
}
NOW = datetime.now(UTC).replace(microsecond=0)
PAST = (NOW - timedelta(days=3)).isoformat()

# 100 examples a property keep the whole file near 25 s of CPU on a developer's machine;
# `make fuzz` sets PUMPFLEET_FUZZ_EXAMPLES for a long run.
AGREEMENT = settings(
    max_examples=int(os.environ.get("PUMPFLEET_FUZZ_EXAMPLES", "100")),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


# Judging a payload ------------------------------------------------------------------------------


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """`pattern` as JSON Schema defines it (ECMA-262): `$` is the end of the string; Python's
    `re` also lets it match before a final newline."""
    if not validator.is_type(instance, "string"):
        return
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    if not re.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern}
)
VALIDATORS = {
    kind: _Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for kind, schema in SCHEMAS.items()
}

_TIME_FIELDS = ("time", "eri_since", "stalled_since")
_INT_FIELDS = ("v", "seq", "reporting_interval_s", "start_minute")
_RFC3339 = re.compile(
    r"(\d{4}-\d\d-\d\d)[Tt](\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)", re.ASCII
)


def _instant(text: str) -> datetime | str | None:
    """The UTC instant an RFC 3339 date-time names; "out of range" past year 1 or 9999."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    day, clock, frac, offset = m.groups()
    try:
        local = datetime.fromisoformat(
            f"{day}T{clock}.{(frac or '0')[:6].ljust(6, '0')}"
            f"{'+00:00' if offset in 'Zz' else offset}"
        )
    except ValueError:
        return None
    try:
        return local.astimezone(UTC)
    except OverflowError:
        return "out of range"


def _too_late(text: str, horizon: datetime) -> str | None:
    instant = _instant(text)
    if isinstance(instant, str):
        return "outside the years 1 to 9999 in UTC"
    if instant is not None and instant > horizon:
        return "ahead of the receiver's clock"
    return None


def _walk(value: Any) -> Iterator[tuple[dict[str, Any] | list[Any], Any]]:
    """Every (container, key) of a JSON value, outermost first."""
    if isinstance(value, dict):
        for key in list(value):
            yield value, key
            yield from _walk(value[key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield value, i
            yield from _walk(item)


def _real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def unstated_rules_broken(payload: Any, size: int) -> list[str]:
    """The rules each schema's description lists as beyond JSON Schema that `payload` breaks,
    judged here on their own (not with the contract's code)."""
    broken = []
    if size > c.MAX_PAYLOAD_BYTES:
        broken.append("size")
    if not isinstance(payload, dict):
        return broken
    horizon = datetime.now(UTC) + c.MAX_FUTURE_SKEW
    for obj, key in _walk(payload):
        value = obj[key]
        if key in _TIME_FIELDS and isinstance(value, str) and (late := _too_late(value, horizon)):
            broken.append(f"{key} {late}")
        if key in _INT_FIELDS and isinstance(value, float) and abs(value) > 2**53:
            broken.append(f"{key}: inexact integer")
        if key == "steps" and isinstance(value, list) and isinstance(obj, dict):
            starts: list[Any] = [s.get("start_minute") for s in value if isinstance(s, dict)]
            if all(_real(s) for s in starts) and starts != sorted(set(starts)):
                broken.append("steps not increasing")
    cap = payload.get("reservoir_capacity_ml")
    for name in ("reservoir_ml", "low_reservoir_alarm_ml"):
        if _real(cap) and _real(payload.get(name)) and payload[name] > cap:
            broken.append(f"{name} above capacity")
    return broken


def judge(kind: str, payload: Any) -> tuple[bool, bool, list[str], str]:
    """(decoder accepts, schema valid, unstated rules broken, what each said)."""
    raw = json.dumps(payload).encode()
    pump = payload.get("pump_id") if isinstance(payload, dict) else None
    pump = pump if isinstance(pump, str) and re.fullmatch(r"[\w-]+", pump) else "P-0001"
    try:
        msg = c.decode(c.topic(pump, kind), raw)
        decoder = "accepted"
    except c.ContractError as exc:
        msg = None
        decoder = f"rejected: {exc}"
    errors = [e.message for e in VALIDATORS[kind].iter_errors(payload)]
    if msg is not None:
        # What an agent puts back on the wire is itself schema-valid and reads the same.
        wire = c.encode(msg)
        assert VALIDATORS[kind].is_valid(json.loads(wire)), wire
        assert c.decode(c.topic(pump, kind), wire) == msg
    said = f"decoder {decoder}; schema {errors or 'valid'}; payload {raw.decode()}"
    return msg is not None, not errors, unstated_rules_broken(payload, len(raw)), said


def assert_agree(kind: str, payload: Any) -> bool:
    """The decoder accepts exactly what the schema accepts, less the listed unstated rules."""
    accepted, valid, broken, said = judge(kind, payload)
    assert accepted == (valid and not broken), f"{broken or ''} {said}"
    return accepted


# Making payloads --------------------------------------------------------------------------------


def published(kind: str) -> st.SearchStrategy[Any]:
    """Payloads valid against the committed schema. The event schema's `oneOf` is drawn branch
    by branch (each branch's `event` const keeps them apart): the same payloads, several times
    faster than hypothesis-jsonschema proving every branch excludes the ten others."""
    schema = SCHEMAS[kind]
    if "oneOf" not in schema:
        return from_schema(schema)
    rest = {k: v for k, v in schema.items() if k not in ("oneOf", "discriminator")}
    return st.one_of([from_schema({**rest, **branch}) for branch in schema["oneOf"]])


PUBLISHED = {kind: published(kind) for kind in KINDS}


def repaired(payload: Any) -> Any:
    """The same payload made to keep the rules the schema cannot state, and nothing else
    changed: a time ahead of the clock or outside the years 1 to 9999 in UTC moved to the year
    2000 (a leap year, so every date stays a date), capacity raised to the largest volume, flex
    steps put in order (the first of any that share a start minute kept), inexact integers
    exact."""
    payload = copy.deepcopy(payload)
    if not isinstance(payload, dict):
        return payload
    horizon = NOW + c.MAX_FUTURE_SKEW
    for obj, key in list(_walk(payload)):
        value = obj[key]
        if key in _TIME_FIELDS and isinstance(value, str) and _too_late(value, horizon):
            obj[key] = "2000" + value[4:]
        if key in _INT_FIELDS and isinstance(value, float) and abs(value) > 2**53:
            obj[key] = int(value)
        if key == "steps" and isinstance(value, list):
            steps = [s for s in value if isinstance(s, dict) and _real(s.get("start_minute"))]
            if len(steps) == len(value):
                by_start: dict[Any, Any] = {}
                for step in steps:
                    by_start.setdefault(step["start_minute"], step)
                obj[key] = [by_start[m] for m in sorted(by_start)]
    cap = payload.get("reservoir_capacity_ml")
    volumes: list[Any] = [payload.get(n) for n in ("reservoir_ml", "low_reservoir_alarm_ml")]
    if _real(cap) and all(_real(v) for v in volumes):
        payload["reservoir_capacity_ml"] = max(cap, *volumes)
    return payload


_OPTIONAL = (
    "reservoir_source",
    "reporting_interval_s",
    "scheduled_ul_per_h",
    "eri_since",
    "expected_source",
    "reservoir_after_source",
    "reason",
    "steps",
    "alarms",
    "session",
)


def _time_respelled(draw: st.DrawFn, text: str) -> str:
    """Spellings the decoder's date-time parser once took that RFC 3339 does not (or does)."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return text
    day, clock, frac, offset = m.groups()
    frac = f".{frac}" if frac else ""
    return draw(
        st.sampled_from(
            [
                f"{day} {clock}{frac}{offset}",
                f"{day}_{clock}{frac}{offset}",
                f"{day}t{clock}{frac}{offset.lower()}",
                f"{day}T{clock[:5]}{offset}",
                f"{day}T{clock}{frac.replace('.', ',')}{offset}",
                f"{day}T{clock}{frac}{offset.replace(':', '')}",
                f"{day}T{clock}{frac}",
                f"{day}T{clock[:6]}60{offset}",
                "0000" + text[4:],
                "1700000000",
                day,
            ]
        )
    )


Mutation = Callable[[st.DrawFn, Any], None]


def _pick(draw: st.DrawFn, payload: Any, fits: Callable[[Any, Any], bool]) -> tuple[Any, Any]:
    spots = [(obj, key) for obj, key in _walk(payload) if fits(obj, key)]
    if not spots:
        return None, None
    return draw(st.sampled_from(spots))


def _respell_int(draw: st.DrawFn, payload: Any) -> None:
    obj, key = _pick(draw, payload, lambda o, k: type(o[k]) is int)
    if obj is not None:
        obj[key] = float(obj[key]) if abs(obj[key]) < 2**1000 else obj[key]


def _null(draw: st.DrawFn, payload: Any) -> None:
    obj, key = _pick(draw, payload, lambda o, k: isinstance(o, dict))
    if obj is not None:
        obj[key] = None


def _add_null(draw: st.DrawFn, payload: Any) -> None:
    obj, _ = _pick(draw, payload, lambda o, k: isinstance(o, dict))
    if obj is not None:
        obj[draw(st.sampled_from(_OPTIONAL))] = None


def _drop(draw: st.DrawFn, payload: Any) -> None:
    obj, key = _pick(draw, payload, lambda o, k: isinstance(o, dict))
    if obj is not None:
        del obj[key]


def _repeat(draw: st.DrawFn, payload: Any) -> None:
    obj, key = _pick(draw, payload, lambda o, k: isinstance(o[k], list) and o[k])
    if obj is not None:
        obj[key].append(copy.deepcopy(draw(st.sampled_from(obj[key]))))


def _flip(draw: st.DrawFn, payload: Any) -> None:
    flips: dict[Any, Any] = {"continuous": "flex", "flex": "continuous", True: False, False: True}
    obj, key = _pick(
        draw,
        payload,
        lambda o, k: (
            isinstance(o, dict)
            and k in ("mode", "v", "battery_eri", "online")
            and isinstance(o[k], str | int | float | None)
        ),
    )
    if obj is not None:
        obj[key] = {1: 2, 2: 1}.get(obj[key], flips.get(obj[key], obj[key]))


def _respell_time(draw: st.DrawFn, payload: Any) -> None:
    obj, key = _pick(draw, payload, lambda o, k: k in _TIME_FIELDS and isinstance(o[k], str))
    if obj is not None:
        obj[key] = _time_respelled(draw, obj[key])


def _newline(draw: st.DrawFn, payload: Any) -> None:
    obj, key = _pick(draw, payload, lambda o, k: isinstance(o[k], str))
    if obj is not None:
        obj[key] += "\n"


def _bool_for_int(draw: st.DrawFn, payload: Any) -> None:
    obj, key = _pick(draw, payload, lambda o, k: type(o[k]) is int)
    if obj is not None:
        obj[key] = obj[key] == 1


MUTATIONS: tuple[Mutation, ...] = (
    _respell_int,
    _null,
    _add_null,
    _drop,
    _repeat,
    _flip,
    _respell_time,
    _newline,
    _bool_for_int,
)


@st.composite
def rewritten(draw: st.DrawFn, kind: str) -> Any:
    """A schema-generated payload, repaired or not, then rewritten one to three times."""
    payload = draw(PUBLISHED[kind])
    if draw(st.booleans()):
        payload = repaired(payload)
    for _ in range(draw(st.integers(1, 3))):
        draw(st.sampled_from(MUTATIONS))(draw, payload)
    return payload


# Properties -------------------------------------------------------------------------------------


# Every keyword of JSON Schema 2020-12 that checks something, its annotations, and OpenAPI's
# `discriminator` (an annotation too).
_KEYWORDS = set(jsonschema.Draft202012Validator.VALIDATORS) | {
    "then",  # checked as part of "if"
    "else",
    "$schema",
    "$id",
    "$defs",
    "$comment",
    "$anchor",
    "$dynamicAnchor",
    "$vocabulary",
    "title",
    "description",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "examples",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
    "discriminator",
}
_NAMES = ("properties", "$defs", "patternProperties", "dependentSchemas")
_VALUES = ("enum", "const", "default", "examples", "required", "discriminator")


def _unknown_keywords(schema: Any, where: str = "#") -> Iterator[str]:
    if isinstance(schema, list):
        for i, sub in enumerate(schema):
            yield from _unknown_keywords(sub, f"{where}/{i}")
    elif isinstance(schema, dict):
        for key, sub in schema.items():
            if key not in _KEYWORDS:
                yield f"{where}/{key}"
            elif key in _NAMES:
                for name, named in sub.items():
                    yield from _unknown_keywords(named, f"{where}/{key}/{name}")
            elif key not in _VALUES:
                yield from _unknown_keywords(sub, f"{where}/{key}")


@pytest.mark.parametrize("kind", KINDS)
def test_the_published_schemas_are_valid_json_schema(kind: str) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[kind])
    # A keyword JSON Schema does not know is a rule no validator checks (pydantic publishes a
    # bound placed after a validator as `ge`/`le`).
    assert list(_unknown_keywords(SCHEMAS[kind])) == []
    assert "cannot state" in SCHEMAS[kind]["description"]


@pytest.mark.parametrize("kind", KINDS)
@AGREEMENT
@given(data=st.data())
def test_schema_generated_payloads_agree(kind: str, data: st.DataObject) -> None:
    payload = data.draw(PUBLISHED[kind], label="payload")
    assert_agree(kind, payload)
    # The same payload keeping the unstated rules: schema-valid, so the decoder takes it.
    fixed = repaired(payload)
    assert VALIDATORS[kind].is_valid(fixed), fixed
    assert assert_agree(kind, fixed), fixed


@pytest.mark.parametrize("kind", KINDS)
@AGREEMENT
@given(data=st.data())
def test_rewritten_payloads_agree(kind: str, data: st.DataObject) -> None:
    assert_agree(kind, data.draw(rewritten(kind), label="payload"))


# Regressions: each disagreement the properties found in the contract as it was ------------------


def telemetry(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 2,
        "pump_id": "P-0001",
        "time": PAST,
        "seq": 55,
        "delivered_ul_per_h": 10.4,
        "programmed_rate_ul_per_h": 10.4,
        "programmed_dose_mcg_per_day": 500.0,
        "reservoir_ml": 12.5,
        "reservoir_capacity_ml": 20.0,
        "low_reservoir_alarm_ml": 2.0,
        "concentration_mcg_per_ml": 2000.0,
        "battery_pct": 81.0,
        "battery_eri": False,
        "pump_state": "infusing",
        "alarms": [],
        "reservoir_source": "measured",
        "reporting_interval_s": 600,
        "scheduled_ul_per_h": 10.4,
    }
    body.update(over)
    return {k: v for k, v in body.items() if v is not ...}


def v1_telemetry(**over: Any) -> dict[str, Any]:
    v1 = {"v": 1, "reservoir_source": ..., "reporting_interval_s": ..., "scheduled_ul_per_h": ...}
    return telemetry(**{**v1, **over})


def event(name: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 2, "pump_id": "P-0001", "time": PAST, "seq": 9, "event": name}
    body.update(over)
    return {k: v for k, v in body.items() if v is not ...}


def refill(**over: Any) -> dict[str, Any]:
    fields = {
        "expected_ml": 4.0,
        "withdrawn_ml": 3.8,
        "injected_ml": 20.0,
        "reservoir_after_ml": 20.0,
        "concentration_mcg_per_ml": 2000.0,
        "expected_source": "calculated",
        "reservoir_after_source": "entered",
    }
    return event("refill", **{**fields, **over})


CONTINUOUS = {"mode": "continuous", "dose_mcg_per_day": 350.0}
FLEX_STEPS = [
    {"start_minute": 0, "dose_mcg_per_day": 300.0},
    {"start_minute": 480, "dose_mcg_per_day": 500.0},
]
FLEX = {"mode": "flex", "dose_mcg_per_day": 400.0, "steps": FLEX_STEPS}


def reprogram(new: dict[str, Any]) -> dict[str, Any]:
    return event("reprogram", old_schedule=CONTINUOUS, new_schedule=new)


def status(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "pump_id": "P-0001", "time": PAST, "seq": 3, "online": True}
    body.update(over)
    return body


ACCEPTED = {
    # JSON Schema's integer is a value: 55.0 is 55; the decoder reads it so.
    "seq written 55.0": ("telemetry", telemetry(seq=55.0)),
    "seq written 5.5e1": ("status", status(seq=5.5e1)),
    "v written 2.0": ("telemetry", telemetry(v=2.0)),
    "interval written 600.0": ("telemetry", telemetry(reporting_interval_s=600.0)),
    "start_minute written 480.0": (
        "event",
        reprogram({**FLEX, "steps": [FLEX_STEPS[0], {**FLEX_STEPS[1], "start_minute": 480.0}]}),
    ),
    # null reads as absent: a v1 payload may carry a v2 field as null, and so may a v2
    # payload carry eri_since while ERI is off.
    "v1 with v2 fields null": (
        "telemetry",
        v1_telemetry(reservoir_source=None, reporting_interval_s=None, scheduled_ul_per_h=None),
    ),
    "v1 with eri_since null": ("telemetry", v1_telemetry(battery_eri=True, eri_since=None)),
    "v2 eri off, eri_since null": ("telemetry", telemetry(eri_since=None)),
    "v1 refill with v2 fields null": (
        "event",
        refill(v=1, expected_source=None, reservoir_after_source=None),
    ),
    "status reason null": ("status", status(reason=None)),
    "continuous with empty steps": ("event", reprogram({**CONTINUOUS, "steps": []})),
    "lowercase t and z": ("status", status(time=PAST.replace("T", "t")[:-6] + "z")),
    "29 February of a leap year": ("status", status(time="2024-02-29T12:00:00+01:00")),
}

REJECTED = {
    # Schema-valid once, refused by the decoder.
    "alarm listed twice": ("telemetry", telemetry(alarms=["low_reservoir", "low_reservoir"])),
    "continuous with steps": ("event", reprogram({**CONTINUOUS, "steps": FLEX_STEPS})),
    "flex without steps": ("event", reprogram({"mode": "flex", "dose_mcg_per_day": 400.0})),
    "flex with empty steps": ("event", reprogram({**FLEX, "steps": []})),
    "flex not starting at 0": ("event", reprogram({**FLEX, "steps": FLEX_STEPS[1:]})),
    "v2 field null": ("telemetry", telemetry(reservoir_source=None)),
    "v2 interval null": ("telemetry", telemetry(reporting_interval_s=None)),
    "v2 eri_since null while eri": ("telemetry", telemetry(battery_eri=True, eri_since=None)),
    "v2 refill source null": ("event", refill(expected_source=None)),
    # Taken by the decoder once, schema-invalid.
    "v written true": ("status", status(v=True)),
    "time with a space": ("status", status(time=PAST.replace("T", " "))),
    "time with an underscore": ("status", status(time=PAST.replace("T", "_"))),
    "time without seconds": ("status", status(time=PAST[:16] + "Z")),
    "time offset without colon": ("status", status(time=PAST[:-6] + "+0000")),
    "time with a decimal comma": ("status", status(time=PAST[:-6] + ",5Z")),
    "time as unix seconds": ("status", status(time="1700000000")),
    # Refused by both all along; kept so they stay refused.
    "time without offset": ("status", status(time=PAST[:-6])),
    "leap second": ("status", status(time="2016-12-31T23:59:60Z")),
    "year 0": ("status", status(time="0000-01-01T00:00:00Z")),
    "30 February": ("status", status(time="2024-02-30T00:00:00Z")),
    "29 February of a common year": ("status", status(time="2023-02-29T00:00:00Z")),
    "seq written true": ("status", status(seq=True)),
    "seq 55.5": ("status", status(seq=55.5)),
    "pump_id with a final newline": ("status", status(pump_id="P-0001\n")),
    "reason with a final newline": ("status", status(reason="lost\n")),
}


@pytest.mark.parametrize(("kind", "payload"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_decoder_and_schema_both_accept(kind: str, payload: dict[str, Any]) -> None:
    assert assert_agree(kind, payload)


@pytest.mark.parametrize(("kind", "payload"), REJECTED.values(), ids=REJECTED.keys())
def test_decoder_and_schema_both_reject(kind: str, payload: dict[str, Any]) -> None:
    assert not assert_agree(kind, payload)


def test_an_integral_seq_reads_as_the_integer() -> None:
    msg = c.decode(c.topic("P-0001", "telemetry"), json.dumps(telemetry(seq=55.0)))
    assert msg.seq == 55 and type(msg.seq) is int
    same = c.decode(c.topic("P-0001", "telemetry"), json.dumps(telemetry(seq=55)))
    assert msg == same and c.encode(msg) == c.encode(same)


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        ("status", status(seq=float(2**60)), "seq"),
        ("telemetry", telemetry(reservoir_ml=21.0), "reservoir_capacity_ml"),
        ("telemetry", telemetry(low_reservoir_alarm_ml=21.0), "reservoir_capacity_ml"),
        ("status", status(time=(NOW + timedelta(hours=1)).isoformat()), "clock"),
        ("status", status(time="0001-01-01T00:00:00+05:00"), "9999"),
        (
            "event",
            reprogram({**FLEX, "steps": [*FLEX_STEPS, {**FLEX_STEPS[1], "start_minute": 300}]}),
            "increase",
        ),
    ],
    ids=["inexact seq", "reservoir", "alarm volume", "future time", "before year 1", "steps order"],
)
def test_what_the_schema_cannot_state_is_listed_and_enforced(
    kind: str, payload: dict[str, Any], reason: str
) -> None:
    """Schema-valid, refused by the decoder for a rule the schema's description lists."""
    accepted, valid, broken, said = judge(kind, payload)
    assert valid and broken and not accepted, said
    assert reason in said
