"""Micro-benchmark: RuleEngine.observe() calls per second for telemetry from 10,000 pumps.

    .venv/bin/python benchmarks/rules_bench.py [--pumps 10000] [--hours 12]

Each pump reports every 10 minutes (the fleet in lockstep, one round at a time); messages are
built before a round is timed, so the figure is the engine's alone. Pumps differ in rate and
reservoir, a few carry a standing condition (low reservoir, stall), so latches are exercised.
The watchdog is ticked once per round and timed separately.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

from _figures import record

from ingest.rules import RuleEngine
from pumpfleet.contract import PumpAlarm, PumpState, Telemetry

START = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL_S = 600


def _round(n_pumps: int, k: int) -> list[Telemetry]:
    """Round `k` of the fleet's telemetry: one message per pump, 10 minutes after round k-1."""
    msgs = []
    for i in range(n_pumps):
        rate_ul_per_h = 5.0 + (i % 40)
        stalled = i % 500 == 0 and k >= 6
        low = i % 250 == 1
        reservoir_ml = (1.5 if low else 10.0 + i % 30) - k * rate_ul_per_h / 6000.0
        msgs.append(
            Telemetry.model_construct(
                v=1,
                kind="telemetry",
                pump_id=f"P-{i + 1:06d}",
                seq=k,
                time=START + timedelta(seconds=k * INTERVAL_S + i % INTERVAL_S),
                delivered_ul_per_h=0.0 if stalled else rate_ul_per_h,
                programmed_rate_ul_per_h=rate_ul_per_h,
                programmed_dose_mcg_per_day=rate_ul_per_h * 24 * 2,
                reservoir_ml=round(max(0.0, reservoir_ml), 3),
                reservoir_capacity_ml=40.0,
                low_reservoir_alarm_ml=2.0,
                concentration_mcg_per_ml=2000.0,
                battery_pct=80.0,
                battery_eri=False,
                pump_state=PumpState.STALLED if stalled else PumpState.INFUSING,
                alarms=(PumpAlarm.LOW_RESERVOIR,) if low else (),
            )
        )
    return msgs


def run(n_pumps: int, hours: float) -> dict[str, float]:
    engine = RuleEngine()
    rounds = int(hours * 3600 / INTERVAL_S)
    observe_s = 0.0
    steady_s = 0.0
    tick_s = 0.0
    calls = 0
    steady_calls = 0
    findings = 0
    judged_after = rounds // 2  # by then every pump has a full trend window
    for k in range(rounds):
        msgs = _round(n_pumps, k)
        observe = engine.observe
        t0 = time.perf_counter()
        for msg in msgs:
            findings += len(observe(msg))
        elapsed = time.perf_counter() - t0
        observe_s += elapsed
        calls += len(msgs)
        if k >= judged_after:
            steady_s += elapsed
            steady_calls += len(msgs)
        t0 = time.perf_counter()
        findings += len(engine.tick(START + timedelta(seconds=(k + 1) * INTERVAL_S)))
        tick_s += time.perf_counter() - t0
    return {
        "pumps": n_pumps,
        "messages": calls,
        "observe_per_s": calls / observe_s,
        "steady_observe_per_s": steady_calls / steady_s if steady_s else 0.0,
        "us_per_observe": observe_s / calls * 1e6,
        "tick_ms": tick_s / rounds * 1e3,
        "findings": findings,
        "state_bytes_per_pump": engine.state_size() / len(engine),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pumps", type=int, default=10_000)
    parser.add_argument("--hours", type=float, default=12.0, help="simulated hours of telemetry")
    args = parser.parse_args()
    result = run(args.pumps, args.hours)
    print(
        f"observe: {result['observe_per_s']:,.0f} calls/s over {result['messages']:,} telemetry "
        f"messages from {result['pumps']:,} pumps ({result['us_per_observe']:.2f} us/call; "
        f"{result['steady_observe_per_s']:,.0f}/s once trend windows are full)"
    )
    print(
        f"tick: {result['tick_ms']:.2f} ms per call; state {result['state_bytes_per_pump']:.0f} "
        f"bytes/pump; {result['findings']} findings"
    )
    what = f"{result['pumps']:,} pumps"
    record("rules.observe_per_s", result["steady_observe_per_s"], "calls/s", what="rule engine")
    record("rules.tick_ms", result["tick_ms"], "ms", "lower", what=f"watchdog tick, {what}")
    state = result["state_bytes_per_pump"]
    record("rules.state_b_per_pump", state, "B/pump", "lower", what="rule engine state")


if __name__ == "__main__":
    main()
