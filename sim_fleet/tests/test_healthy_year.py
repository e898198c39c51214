"""A healthy fleet over a simulated year stays healthy: what a careful rule could fire on, never.

Refills are booked from use, pumps at ERI are replaced, biases span the labelled accuracy. The
run reports hourly (the physics does not depend on the interval) to keep the test quick.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from pumpfleet.contract import PumpAlarm
from sim_fleet import LABELLED_FLOW_ACCURACY, FleetMix, Pump, make_fleet

START = datetime(2026, 1, 1, tzinfo=UTC)
D = timedelta(days=1)


def test_fleet_biases_span_the_labelled_range_and_families_mix() -> None:
    fleet = make_fleet(2000, 21)
    biases = [s.flow_bias for s in fleet]
    assert max(abs(b) for b in biases) <= 0.14
    assert max(biases) >= 0.12 and min(biases) <= -0.10  # most of +-14 %
    assert statistics.mean(biases) == pytest.approx(0.01, abs=0.005)
    assert statistics.stdev(biases) == pytest.approx(0.05, abs=0.006)
    families = Counter(s.family for s in fleet)
    assert set(families) == {"calculated", "measured"}  # no valve pumps by default
    assert families["measured"] / len(fleet) == pytest.approx(0.3, abs=0.04)
    noise = [s.sensor_noise_ul for s in fleet if s.family == "measured"]
    assert 1.0 <= min(noise) < 1.5 and 4.5 < max(noise) <= 5.0
    assert {s.refill_entry_sd_ml for s in fleet} == {0.3}
    replace = [s.battery_replacement_after_eri_days or 0.0 for s in fleet]
    assert min(replace) >= 30 and max(replace) <= 60
    with_valves = make_fleet(500, 21, FleetMix(measured_share=0.2, valve_share=0.3))
    assert Counter(s.family for s in with_valves)["valve"] > 100


def test_a_healthy_fleet_runs_a_year_without_a_reason_to_alert() -> None:
    specs = make_fleet(50, 5, FleetMix(reporting_interval_s=3600))
    began = time.perf_counter()
    raised: Counter[PumpAlarm] = Counter()
    eri_days: list[float] = []
    refills = 0
    messages = 0
    for s in specs:
        pump = Pump(s, START)
        eri_at: datetime | None = None
        after_last = s.reservoir_capacity_ml  # the fleet starts each pump after a full refill
        for day in range(1, 366):
            obs = pump.advance(START + day * D)
            messages += len(obs)
            # the truth (no rule can see it) never reaches the alarm volume either
            assert pump.reservoir_ml > s.low_reservoir_alarm_ml, (s.pump_id, day)
            for o in obs:
                f = o.fields
                if o.kind == "telemetry":
                    flow = f["programmed_dose_mcg_per_day"] / f["concentration_mcg_per_ml"]
                    margin = flow * (1 + LABELLED_FLOW_ACCURACY)
                    days_left = (f["reservoir_ml"] - f["low_reservoir_alarm_ml"]) / margin
                    assert days_left > 7, f"{s.pump_id} refill due at {o.sim_time}"
                    assert abs(f["delivered_ul_per_h"] - f["scheduled_ul_per_h"]) <= 2e-3
                elif f.get("event") == "alarm_raised":
                    raised[f["alarm"]] += 1
                    if f["alarm"] is PumpAlarm.ERI:
                        eri_at = o.sim_time
                elif f.get("event") == "alarm_cleared" and f["alarm"] is PumpAlarm.ERI:
                    assert eri_at is not None
                    eri_days.append((o.sim_time - eri_at) / D)
                elif f.get("event") == "refill":
                    refills += 1
                    # within the labelled accuracy over what was infused, plus the reading error
                    infused = after_last - f["expected_ml"]
                    allowed = LABELLED_FLOW_ACCURACY * infused + 3 * s.refill_entry_sd_ml + 0.05
                    assert abs(f["expected_ml"] - f["withdrawn_ml"]) <= allowed, s.pump_id
                    after_last = f["reservoir_after_ml"]
    took = time.perf_counter() - began
    print(f"\n50 pumps x 365 days hourly: {messages} messages in {took:.1f} s")
    assert set(raised) <= {PumpAlarm.ERI}, raised  # no low reservoir, empty, EOS, ...
    assert raised[PumpAlarm.ERI] >= 2, "some batteries reach ERI within the year"
    assert eri_days and all(30 - 1e-6 <= d <= 60 + 1e-6 for d in eri_days), eri_days
    assert refills >= 100  # 50 pumps refilled every 1-6 months
