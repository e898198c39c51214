"""`RuleEngine._steady`, the fast path for a boring reading, must be invisible: the same
Findings, call for call, and the same per-pump state as the full path (`_process`) alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ingest.findings import Finding
from ingest.rules import PumpProfile, RuleEngine
from ingest.rules.bench import _round
from ingest.rules.engine import _Pump
from ingest.rules.latch import Latch
from ingest.rules.tests.feed import Feed
from ingest.rules.tests.simrun import drive
from pumpfleet.contract import Message, PumpAlarm, PumpState, Telemetry
from sim_fleet import FleetMix, Pump, build_run, load_scenario, make_fleet

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class _Counting(RuleEngine):
    taken = 0

    def _steady(self, m: Telemetry, received_at: datetime | None, out: list[Finding]) -> bool:
        taken = super()._steady(m, received_at, out)
        self.taken += taken
        return taken


class _FullPathOnly(RuleEngine):
    def _steady(self, m: Telemetry, received_at: datetime | None, out: list[Finding]) -> bool:
        return False


def _snapshot(engine: RuleEngine) -> dict[str, dict[str, Any]]:
    def plain(value: Any) -> Any:
        if isinstance(value, Latch):
            return tuple(getattr(value, name) for name in Latch.__slots__)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {
        pump_id: {name: plain(getattr(p, name)) for name in _Pump.__slots__ if name != "th"}
        for pump_id, p in engine._pumps.items()
    }


class _Both:
    """Feeds one stream to a normal engine and a full-path-only one and compares each answer."""

    def __init__(self, profiles: dict[str, PumpProfile] | None = None) -> None:
        self.fast = _Counting(profiles=profiles)
        self.full = _FullPathOnly(profiles=profiles)

    def observe(self, msg: Message, received_at: datetime | None = None) -> list[Finding]:
        found = self.fast.observe(msg, received_at=received_at)
        assert found == self.full.observe(msg, received_at=received_at), msg
        return found

    def tick(self, now: datetime) -> list[Finding]:
        found = self.fast.tick(now)
        assert found == self.full.tick(now), now
        return found

    def set_profile(self, profile: PumpProfile) -> None:
        self.fast.set_profile(profile)
        self.full.set_profile(profile)

    def same_state(self) -> None:
        assert self.fast.taken > 0, "the fast path was never taken: the test proves nothing"
        assert _snapshot(self.fast) == _snapshot(self.full)
        assert self.fast._heap == self.full._heap


@pytest.mark.parametrize("scenario", ["faults", "refill_cycle", "healthy"])
def test_scenarios_give_the_same_findings_and_state_on_both_paths(scenario: str) -> None:
    run = build_run(load_scenario(scenario), NOW)
    both = _Both()
    delivered = drive(both, run.pumps, run.start, run.end)
    both.same_state()
    assert delivered.findings or scenario == "healthy"


def test_a_mixed_fleet_gives_the_same_findings_and_state_on_both_paths() -> None:
    start = NOW - timedelta(days=30)
    mix = FleetMix(flex_share=0.5, patient_bolus_share=0.5, high_risk_share=0.5, child_share=0.3)
    specs = make_fleet(40, 5, mix)
    profiles = {
        s.pump_id: PumpProfile(
            pump_id=s.pump_id, high_risk=s.high_risk, reporting_interval_s=s.reporting_interval_s
        )
        for s in specs
    }
    both = _Both(profiles)
    pumps = [Pump(s, start) for s in specs]
    drive(both, pumps, start, start + timedelta(days=2), timedelta(hours=1))
    both.same_state()


def test_the_benchmark_fleet_gives_the_same_findings_and_state_on_both_paths() -> None:
    both = _Both()
    for k in range(40):
        for msg in _round(300, k):
            both.observe(msg)
        both.tick(msg.time + timedelta(minutes=10))
    both.same_state()


def test_a_hand_driven_pump_through_every_kind_of_change_on_both_paths() -> None:
    both = _Both()
    feed = Feed(both, reservoir_ml=8.0)  # type: ignore[arg-type]
    feed.hours(4)
    feed.flow_factor = 1.4
    feed.hours(5)  # over-infusion starts
    feed.flow_factor = 1.0
    feed.hours(3)
    feed.telemetry(delivered_ul_per_h=0.0)  # a stall in the readings
    feed.hours(1)
    feed.raise_alarm(PumpAlarm.LOW_RESERVOIR)
    feed.hours(1)
    feed.clear_alarm(PumpAlarm.LOW_RESERVOIR)
    feed.hours(1)
    feed.skip(2)
    feed.hours(2)
    feed.reprogram(400.0)
    feed.hours(1)
    feed.bolus(50.0)
    feed.hours(1)
    feed.eri = True
    feed.hours(1)
    feed.eri = False
    feed.state = PumpState.SUSPENDED
    feed.hours(1, delivered_ul_per_h=0.0)
    feed.state = PumpState.INFUSING
    feed.mri()
    feed.hours(1)
    feed.refill(expected_ml=4.0, withdrawn_ml=1.0, injected_ml=30.0)
    feed.hours(30)  # the reservoir runs low, refill comes due
    feed.tick(3600)
    feed.hours(1)
    both.same_state()


def test_low_reservoir_without_refill_due_and_a_profile_change_on_both_paths() -> None:
    """No refill_due opens first (no programmed dose): the reading that crosses the alarm
    volume is a fast-path one. Then a new profile moves the alarm volume under the fast path."""
    both = _Both()
    feed = Feed(both, reservoir_ml=4.0, dose_mcg_per_day=0.0)  # type: ignore[arg-type]
    level = 4.0
    for _ in range(30):
        level -= 0.1
        feed.telemetry(reservoir_ml=round(level, 3))
    feed.hours(3, reservoir_ml=3.0)  # back above: the alert ends
    profile = PumpProfile(pump_id=feed.pump_id, low_reservoir_alarm_ml=3.5)
    both.set_profile(profile)
    feed.hours(1, reservoir_ml=3.0)
    both.set_profile(PumpProfile(pump_id=feed.pump_id, reporting_interval_s=300))
    feed.hours(2, reservoir_ml=5.0)
    both.same_state()
    assert [f.rule for f in feed.findings].count("low_reservoir") >= 3
