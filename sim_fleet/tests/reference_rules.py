"""A deliberately simple evaluation of domain.md's alert rules over simulated observations.

Not the pipeline's rules (those live in ingest/): a test oracle that shows each scenario's
expectations are observable in what the simulator sends, and that a healthy fleet gives a
careful rule nothing to fire on. It reads only what crosses the wire (contract fields, in the
order and with the losses the transport flags cause), never the pump's hidden state.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from pumpfleet.contract import PumpAlarm, PumpState
from sim_fleet import Observation, RaisedAlert

WINDOW = timedelta(hours=4)
"""Reservoir-trend window for over/under-infusion."""
MIN_WINDOW_UL = 20.0
"""Skip windows where the rotor moved less than this: too little to judge at 1 uL resolution."""
ACCURACY = 0.145
_CRITICAL = {
    PumpAlarm.EMPTY_RESERVOIR,
    PumpAlarm.EOS,
    PumpAlarm.MOTOR_STALL,
    PumpAlarm.CRITICAL_MEMORY_ERROR,
    PumpAlarm.REDUCED_BATTERY_PERFORMANCE,
}


def evaluate(
    observations: Iterable[tuple[str, Observation]], interval_s: int = 600
) -> list[RaisedAlert]:
    """Every alert (rule, priority) the rules would raise, with the simulated time it fires."""
    by_pump: dict[str, list[Observation]] = defaultdict(list)
    for pid, obs in observations:
        by_pump[pid].append(obs)
    raised: list[RaisedAlert] = []
    for pid, stream in by_pump.items():
        raised += _pump_alerts(pid, stream, interval_s)
    return raised


def _pump_alerts(pid: str, stream: list[Observation], interval_s: int) -> list[RaisedAlert]:
    out: list[RaisedAlert] = []

    def fire(rule: str, priority: str, obs: Observation) -> None:
        out.append(RaisedAlert(pid, rule, priority, obs.sim_time))

    received = [o for o in stream if not o.lost]
    if any(o.lost for o in stream):
        fire("sequence_gap", "low", next(o for o in stream if o.lost))
    for prev, cur in itertools.pairwise(received):
        gap = cur.sim_time - prev.sim_time
        if gap > timedelta(seconds=3 * interval_s):
            out.append(
                RaisedAlert(
                    pid,
                    "telemetry_silence",
                    "low",
                    prev.sim_time + 3 * timedelta(seconds=interval_s),
                )
            )
        if gap >= timedelta(hours=24):
            out.append(
                RaisedAlert(pid, "telemetry_silence", "medium", prev.sim_time + timedelta(hours=24))
            )

    events = [o for o in received if o.kind == "event"]
    telemetry = [o for o in received if o.kind == "telemetry"]
    mri_ends = []
    recoveries = []
    for ev in events:
        f = ev.fields
        kind = f["event"]
        if kind == "alarm_raised" and f["alarm"] in _CRITICAL:
            fire("critical_pump_alarm", "high", ev)
        elif kind == "reprogram":
            old, new = f["old_schedule"]["dose_mcg_per_day"], f["new_schedule"]["dose_mcg_per_day"]
            if not f["session"]:
                fire("critical_pump_alarm", "high", ev)
            if old > 0 and abs(new - old) / old > 0.20:
                fire("large_dose_change", "low", ev)
        elif kind == "refill":
            limit = 1.0 if _capacity(telemetry) <= 20 else 2.0
            if f["injected_ml"] - f["reservoir_after_ml"] > limit:
                fire("pocket_fill", "high", ev)
            if abs(f["expected_ml"] - f["withdrawn_ml"]) > 2.0:
                fire("refill_discrepancy", "medium", ev)
        elif kind == "mri_end":
            mri_ends.append(ev)
        elif kind == "motor_stall_recovery":
            recoveries.append(ev)
    for end in mri_ends:
        deadline = end.sim_time + timedelta(hours=24)
        if not any(end.sim_time <= r.sim_time <= deadline for r in recoveries):
            out.append(RaisedAlert(pid, "post_mri", "high", deadline))

    for t in telemetry:
        f = t.fields
        if f["battery_eri"]:
            fire("battery", "medium", t)
        if f["reservoir_ml"] <= f["low_reservoir_alarm_ml"]:
            fire("low_reservoir", "medium", t)
        flow_ml_per_day = f["programmed_dose_mcg_per_day"] / f["concentration_mcg_per_ml"]
        if flow_ml_per_day > 0:
            days = (f["reservoir_ml"] - f["low_reservoir_alarm_ml"]) / flow_ml_per_day
            if days <= 3:
                fire("refill_due", "high", t)
            elif days <= 7:
                fire("refill_due", "medium", t)
        if f["programmed_rate_ul_per_h"] > 0 and f["pump_state"] in (
            PumpState.STALLED,
            PumpState.STOPPED,
        ):
            fire("under_infusion", "high", t)
    out += _trend_alerts(pid, telemetry, events)
    return out


def _trend_alerts(
    pid: str, telemetry: list[Observation], events: list[Observation]
) -> list[RaisedAlert]:
    """Reservoir drop against rotor-counted delivery over a window free of refills."""
    out = []
    refills = [e.sim_time for e in events if e.fields["event"] == "refill"]
    j = 0
    for i, start in enumerate(telemetry):
        while j < len(telemetry) and telemetry[j].sim_time < start.sim_time + WINDOW:
            j += 1
        if j >= len(telemetry):
            break
        end = telemetry[j]
        if any(start.sim_time < r <= end.sim_time for r in refills):
            continue
        rotor_ul = 0.0
        for k in range(i + 1, j + 1):
            dt_h = (telemetry[k].sim_time - telemetry[k - 1].sim_time).total_seconds() / 3600
            rotor_ul += telemetry[k].fields["delivered_ul_per_h"] * dt_h
        if rotor_ul < MIN_WINDOW_UL:
            continue
        drop_ul = (start.fields["reservoir_ml"] - end.fields["reservoir_ml"]) * 1000
        if drop_ul > rotor_ul * (1 + ACCURACY):
            out.append(RaisedAlert(pid, "over_infusion", "high", end.sim_time))
        elif drop_ul < rotor_ul * (1 - ACCURACY):
            out.append(RaisedAlert(pid, "under_infusion", "high", end.sim_time))
    return out


def _capacity(telemetry: list[Observation]) -> float:
    first: dict[str, Any] = dict(telemetry[0].fields) if telemetry else {}
    return float(first.get("reservoir_capacity_ml", 40.0))
