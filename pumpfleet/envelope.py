"""The message envelope every pump model's output goes out in: the shared vocabulary of the
device agent and the simulator's transports.

`Observation` is one message's worth of pump output, as a driver (a real pump's, or a simulated
one) produces it; `build_entry` wraps it in the envelope (`v`, `pump_id`, `seq`, `kind`) and
validates it exactly as the ingester will decode it, into an `Entry` that a transport queues and
sends once a seq is chosen. The device agent and `pumpfleet sim run`/`sim load` all use these,
so a simulated message is checked as a real one is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import TypeAdapter

from pumpfleet import contract

__all__ = ["Entry", "Observation", "ObservationKind", "build_entry"]

ObservationKind = Literal["telemetry", "event", "status"]

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "telemetry": TypeAdapter(contract.Telemetry),
    "event": TypeAdapter(contract.Event),
    "status": TypeAdapter(contract.Status),
}


@dataclass(frozen=True, slots=True, init=False)
class Observation:
    """One message's worth of pump output, before the agent wraps it in the envelope.

    The one type every pump model hands to a transport (the agent, `pumpfleet sim run`).

    - `kind`: telemetry, event or status; `time`: the device clock (UTC), which goes into the
      message.
    - `fields`: the contract fields except `v`, `pump_id`, `seq`, `kind` and `time`, as plain
      values (numbers, bools, contract enums, tuples, datetimes, schedules as dicts).
    - `sim_time`: the true (simulated) time the pump sent it, which a transport paces a run by;
      it differs from `time` when the device clock is skewed. Defaults to `time`.
    - Transport faults a simulator injects: `duplicate` (send it twice, same seq and bytes),
      `delay_s` (hold it back this many SIMULATED seconds so later messages overtake it; a
      transport running the clock N times faster than real time waits `delay_s / N` wall
      seconds), `lost` (give it a seq, then drop it: the receiver sees a sequence gap).
    """

    kind: ObservationKind
    time: datetime
    fields: Mapping[str, Any]
    duplicate: bool
    delay_s: float
    sim_time: datetime
    lost: bool

    def __init__(
        self,
        kind: ObservationKind,
        time: datetime,
        fields: Mapping[str, Any] | None = None,
        duplicate: bool = False,
        delay_s: float = 0.0,
        sim_time: datetime | None = None,
        lost: bool = False,
    ) -> None:
        # Frozen: assign through object.__setattr__ (what dataclass's own __init__ does).
        set_ = object.__setattr__
        set_(self, "kind", kind)
        set_(self, "time", time)
        set_(self, "fields", {} if fields is None else fields)
        set_(self, "duplicate", duplicate)
        set_(self, "delay_s", delay_s)
        set_(self, "sim_time", time if sim_time is None else sim_time)
        set_(self, "lost", lost)

    def to_message(self, pump_id: str, seq: int) -> contract.Message:
        """The contract message with its envelope; raises pydantic's ValidationError if bad.

        Validates in Python (no JSON round trip); `build_entry` is the strict
        wire-level check the agent and the simulator's transport use.
        """
        body = {"v": contract.CONTRACT_VERSION, "pump_id": pump_id, "seq": seq, "time": self.time}
        body.update(self.fields)
        adapter = _ADAPTERS.get(self.kind)
        if adapter is None:
            raise ValueError(f"kind: unknown {self.kind!r}")
        message: contract.Message = adapter.validate_python(body)
        return message


@dataclass(frozen=True)
class Entry:
    """A message to queue. `payload` renders the bytes once the store has chosen the seq."""

    kind: Literal["telemetry", "event", "status"]
    topic: str
    payload: Callable[[int], bytes]
    retain: bool = False
    duplicate: bool = False
    delay_s: float = 0.0
    """Wall-clock seconds to hold it back (later messages overtake it)."""
    lost: bool = False
    """A simulated loss: `append` spends a seq on it and stores nothing (a sequence gap)."""


_ENVELOPE = frozenset({"v", "pump_id", "seq", "kind", "time"})


def build_entry(pump_id: str, obs: Observation, speed: float = 1.0) -> Entry:
    """Wrap an observation in the envelope and validate it exactly as the ingester will decode it.

    Raises `contract.ContractError` for anything the ingester would reject, so a driver bug never
    puts invalid bytes on the wire. The seq is filled in when the store assigns it. `speed` is
    how many simulated seconds the device clock runs per wall second: `obs.delay_s` is simulated,
    the entry's `delay_s` is wall-clock.
    """
    if speed <= 0:
        raise ValueError("speed must be > 0")
    clash = _ENVELOPE & obs.fields.keys()
    if clash:
        raise contract.ContractError(f"fields carry envelope keys {sorted(clash)}")
    try:
        kind = contract.Kind(obs.kind)
    except ValueError:
        raise contract.ContractError(f"kind: unknown {obs.kind!r}") from None
    body = {
        "v": contract.CONTRACT_VERSION,
        "pump_id": pump_id,
        "time": obs.time,
        "seq": 0,
        "kind": kind.value,
        **obs.fields,
    }
    try:
        raw = json.dumps(body, default=_json_default, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise contract.ContractError(f"fields: not JSON-serialisable: {exc}") from None
    topic = contract.topic(pump_id, kind)
    msg = contract.decode(topic, raw)

    def payload(seq: int) -> bytes:
        return contract.encode(msg.model_copy(update={"seq": seq}))

    return Entry(
        kind=kind.value,
        topic=topic,
        payload=payload,
        retain=kind is contract.Kind.STATUS,
        duplicate=obs.duplicate,
        delay_s=max(0.0, obs.delay_s) / speed,
        lost=obs.lost,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
