"""Micro-benchmark: decode + validate of one telemetry payload, as the ingester does per message.

Prints messages/s for the contract's decode and, in the same run, for bare JSON parsing
(orjson, the floor) and the standard library's json, so figures read as ratios.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import orjson
from _figures import record

from pumpfleet import contract


def _rate(fn: object, payload: bytes, seconds: float = 2.0) -> float:
    call = fn  # type: ignore[assignment]
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(1000):
            call(payload)  # type: ignore[operator]
        n += 1000
    return n / elapsed


def main() -> None:
    topic = contract.topic("P-0001", "telemetry")
    payload = contract.encode(
        contract.Telemetry(
            v=1,
            pump_id="P-0001",
            time=datetime.now(UTC),
            seq=123456,
            delivered_ul_per_h=10.41,
            programmed_rate_ul_per_h=10.42,
            programmed_dose_mcg_per_day=500.0,
            reservoir_ml=12.5,
            reservoir_capacity_ml=20.0,
            low_reservoir_alarm_ml=2.0,
            concentration_mcg_per_ml=2000.0,
            battery_pct=81.0,
            battery_eri=False,
            pump_state=contract.PumpState.INFUSING,
            alarms=(contract.PumpAlarm.LOW_RESERVOIR,),
        )
    )
    print(f"payload: {len(payload)} bytes")
    ours = _rate(lambda p: contract.decode(topic, p), payload)
    floor = _rate(orjson.loads, payload)
    stdlib = _rate(json.loads, payload)
    record("decode.contract", ours, "msg/s", what="decode + validate one telemetry payload")
    record("decode.orjson", floor, "msg/s", what="orjson.loads alone (parse only)")
    record("decode.json", stdlib, "msg/s", what="json.loads alone (parse only)")
    print(f"contract.decode (parse + validate): {ours:>10,.0f} msg/s")
    print(f"orjson.loads (parse only):          {floor:>10,.0f} msg/s  ours = {ours / floor:.2f}x")
    print(
        f"json.loads (parse only):            {stdlib:>10,.0f} msg/s  ours = {ours / stdlib:.2f}x"
    )


if __name__ == "__main__":
    main()
