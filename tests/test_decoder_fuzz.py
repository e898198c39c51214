"""The decoder under mutation: valid messages with bytes flipped, cut, repeated or spliced in,
fed to `contract.decode` as the ingester does. Every input ends in a Message or a clean
ContractError (one line, the dead letter's reason); no other exception, no crash.

Bounded here (`PUMPFLEET_FUZZ_EXAMPLES`, default 300 a property); `make fuzz` runs the same
properties, and the schema agreement ones, with 2,000 examples each (FUZZ_EXAMPLES=N for more).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pumpfleet import contract as c
from pumpfleet.testing import telemetry_fields

EXAMPLES = int(os.environ.get("PUMPFLEET_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WHEN = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
PUMP = "P-000042"

_BASE: dict[str, Any] = {"v": 2, "pump_id": PUMP, "time": WHEN, "seq": 7}
VALID: list[tuple[str, dict[str, Any]]] = [
    ("telemetry", _BASE | telemetry_fields(reservoir_source="measured")),
    (
        "event",
        _BASE
        | {
            "kind": "event",
            "event": "refill",
            "expected_ml": 3.0,
            "withdrawn_ml": 2.9,
            "injected_ml": 20.0,
            "reservoir_after_ml": 20.0,
            "concentration_mcg_per_ml": 2000.0,
            "expected_source": "measured",
            "reservoir_after_source": "measured",
        },
    ),
    ("status", _BASE | {"kind": "status", "online": True, "reason": "boot"}),
]


def _judge(kind: str, payload: bytes) -> None:
    try:
        msg = c.decode(c.topic(PUMP, kind), payload)
    except c.ContractError as exc:
        reason = str(exc)
        assert reason and "\n" not in reason, f"not one line: {reason!r}"
        return
    assert msg.pump_id == PUMP  # what decodes is still this pump's, never another's


def test_the_seeds_are_valid() -> None:
    for kind, body in VALID:
        _judge(kind, json.dumps(body).encode())
        c.decode(c.topic(PUMP, kind), json.dumps(body).encode())  # accepted, not refused


_OPS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("repeat"), st.integers(0, 10_000), st.integers(1, 200)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
)


def _mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
    b = bytearray(data)
    for op, at, arg in ops:
        i = at % (len(b) + 1)
        if op == "flip" and b:
            b[i % len(b)] ^= arg
        elif op == "cut":
            del b[i : i + arg]
        elif op == "insert":
            b[i:i] = arg
        elif op == "repeat":
            b[i:i] = b[i : i + arg]
        elif op == "truncate":
            del b[i:]
    return bytes(b)


@FUZZ
@given(which=st.integers(0, len(VALID) - 1), ops=st.lists(_OPS, min_size=1, max_size=6))
def test_mutated_bytes_are_decoded_or_cleanly_refused(which: int, ops: list[Any]) -> None:
    kind, body = VALID[which]
    _judge(kind, _mutate(json.dumps(body).encode(), ops))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@FUZZ
@given(
    which=st.integers(0, len(VALID) - 1),
    field=st.sampled_from(sorted({k for _, b in VALID for k in b})),
    value=_JSON,
)
def test_any_field_set_to_any_json_is_decoded_or_cleanly_refused(
    which: int, field: str, value: Any
) -> None:
    kind, body = VALID[which]
    _judge(kind, json.dumps(body | {field: value}).encode())


@FUZZ
@given(payload=st.binary(max_size=2048), kind=st.sampled_from(["telemetry", "event", "status"]))
def test_arbitrary_bytes_are_cleanly_refused(payload: bytes, kind: str) -> None:
    _judge(kind, payload)


def test_hostile_shapes_are_cleanly_refused() -> None:
    for payload in (
        b"[" * 16_000,  # nesting at the size limit
        b'{"a":' * 3_000 + b"1" + b"}" * 3_000,
        b"\xff\xfe{}",
        b"1e99999",
        json.dumps(VALID[0][1] | {"seq": 1e400}).encode(),
        "\ud800".encode("utf-8", "surrogatepass"),
        b"",
        b"\x00" * 100,
    ):
        _judge("telemetry", payload)
