"""`sim run` and `sim load` against a real mosquitto: what arrives is what the model made, once
per seq (twice where the scenario duplicates), with gaps exactly where it loses messages."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from device_agent import BrokerOptions, Observation
from pumpfleet import contract
from pumpfleet.stack import StackInfo, start_broker, stop_broker
from pumpfleet.testing import Received, wait_until
from sim_fleet import advance_fleet, build_run, parse_scenario
from sim_fleet._load import LoadConfig, Progress, run_load
from sim_fleet._run import RunOptions, RunStats, run_scenario, seq_base
from sim_fleet._scenario import Scenario, SimRun
from sim_fleet.tests.mqtt_helpers import FleetSubscriber, fleet_subscriber

pytestmark = pytest.mark.integration

WIRE = """
name: wire
seed: 5
duration: 3h
speed: {speed}
strict: true
fleet:
  n: 4
  mix: {{reporting_interval_s: 60}}
timeline:
  - {{pump: 0, at: 30m, type: duplicate_delivery, params: {{duration_h: 0.5, share: 1.0}}}}
  - {{pump: 1, at: 30m, type: out_of_order, params: {{duration_h: 0.5, delay_s: 600, share: 0.3}}}}
  - {{pump: 2, at: 30m, type: message_loss, params: {{duration_h: 0.5, share: 0.5}}}}
  - {{pump: 3, at: 30m, type: telemetry_silence, params: {{duration_h: 1}}}}
  - {{pump: 3, at: 2h, type: clock_skew, params: {{offset_s: 120}}}}
  - {{pump: 0, at: 1h30m, type: refill}}
"""


def wire_scenario(speed: str) -> Scenario:
    return parse_scenario(WIRE.format(speed=speed), "wire.yaml")


def options(info: StackInfo) -> BrokerOptions:
    return BrokerOptions.from_url(info.mqtt_url_for("fleet"), keepalive_s=5)


def model_output(
    scenario: Scenario, now: datetime, first_seq: int
) -> dict[tuple[str, int], Observation]:
    """What the model makes, replayed independently: every observation by (pump, seq)."""
    replay = build_run(scenario, now)
    seqs: dict[str, int] = {}
    out = {}
    for pid, obs in advance_fleet(replay.pumps, replay.end):
        seq = seqs.get(pid, first_seq)
        seqs[pid] = seq + 1
        out[(pid, seq)] = obs
    return out


def ours(sub: FleetSubscriber, run: SimRun, first_seq: int) -> list[Received]:
    """This run's messages (the broker may hold retained ones from earlier runs)."""
    pumps = {p.pump_id for p in run.pumps}
    return [r for r in sub.snapshot() if r.key[0] in pumps and r.key[1] >= first_seq]


def expected_copies(made: dict[tuple[str, int], Observation]) -> Counter[tuple[str, int]]:
    return Counter({k: 2 if o.duplicate else 1 for k, o in made.items() if not o.lost})


def test_sim_run_delivers_every_non_lost_observation_exactly_as_the_model_made_it(
    broker: StackInfo,
) -> None:
    scenario = wire_scenario("21600")  # 3 simulated hours in half a second
    now = datetime.now(UTC)
    run = build_run(scenario, now)
    first = seq_base()
    made = model_output(scenario, now, first)
    want = expected_copies(made)
    assert sum(o.lost for o in made.values()) >= 3 and any(o.duplicate for o in made.values())
    assert any(o.delay_s for o in made.values()) and len(made) > 600

    with fleet_subscriber(broker.mqtt_url_for("ingest")) as sub:
        stats = run_scenario(
            run, options(broker), RunOptions(seq_start=first, pumps_per_connection=2)
        )
        wait_until(lambda: len(ours(sub, run, first)) >= want.total(), 20, "every message")
        got = ours(sub, run, first)
    assert not sub.errors, sub.errors[:3]  # everything decoded with the contract
    assert Counter(r.key for r in got) == want, "each non-lost seq once (twice if duplicated)"
    for r in got:
        obs = made[r.key]
        assert r.message == obs.to_message(*r.key), f"{r.key} differs from the model"
        assert r.topic == contract.topic(r.key[0], obs.kind)
    lost = {k for k, o in made.items() if o.lost}
    for pump in run.pumps:
        arrived = {seq for pid, seq in want if pid == pump.pump_id}
        gaps = {seq for pid, seq in lost if pid == pump.pump_id}
        top = max(arrived | gaps)
        assert arrived | gaps == set(range(first, top + 1)), "gaps exactly at the lost seqs"
    assert stats.acked == stats.published == want.total() and stats.refused == 0
    assert stats.lost == len(lost) and stats.observations == len(made)
    # Delayed messages were overtaken by later seqs of the same pump.
    delayed = {k for k, o in made.items() if o.delay_s and not o.lost}
    order = [r.key for r in got if r.key[0] == "P-000002"]
    assert delayed and any(
        order.index(k) > order.index((k[0], k[1] + 1)) for k in delayed if (k[0], k[1] + 1) in want
    ), "a held-back message arrived after its successor"
    # Retained status: a late subscriber sees pump 4's latest (back online after the silence).
    with fleet_subscriber(broker.mqtt_url_for("ingest"), "pumps/P-000004/status") as late:
        status = wait_until(lambda: late.snapshot(), 10, "the retained status")[0]
    assert status.retain and status.key[1] >= first
    assert isinstance(status.message, contract.Status) and status.message.online


def test_sim_run_resends_what_a_broker_restart_cut_off(broker: StackInfo) -> None:
    scenario = wire_scenario("2700")  # 3 simulated hours in 4 wall seconds
    now = datetime.now(UTC)
    run = build_run(scenario, now)
    first = seq_base()
    want = expected_copies(model_output(scenario, now, first))
    result: list[RunStats] = []
    with fleet_subscriber(broker.mqtt_url_for("ingest")) as sub:
        thread = threading.Thread(
            target=lambda: result.append(
                run_scenario(run, options(broker), RunOptions(seq_start=first))
            ),
            daemon=True,
        )
        thread.start()
        wait_until(lambda: len(ours(sub, run, first)) > 100, 10, "the run under way")
        stop_broker(broker)
        time.sleep(0.5)  # the outage itself, not a synchronisation
        start_broker(broker)
        thread.join(30)
        assert not thread.is_alive() and result
        wait_until(lambda: set(want) <= {r.key for r in ours(sub, run, first)}, 20, "all seqs")
    stats = result[0]
    assert stats.reconnects >= 1
    assert stats.acked == stats.published - stats.resent, "every publish acknowledged in the end"
    assert not sub.errors


def test_sim_load_small_acked_equals_sent_and_every_message_arrives_once(
    broker: StackInfo,
) -> None:
    prefix = f"LT{uuid.uuid4().hex[:6]}"
    config = LoadConfig(
        pumps=40, rate=2000, duration_s=1.5, processes=2, connections=1, id_prefix=prefix
    )
    seen: list[Progress] = []
    with fleet_subscriber(broker.mqtt_url_for("ingest"), "pumps/+/telemetry") as sub:
        report = run_load(config, options(broker), seen.append, progress_every_s=0.2)
        mine = lambda: [r for r in sub.snapshot() if r.key[0].startswith(prefix)]  # noqa: E731
        wait_until(lambda: len(mine()) >= report.sent, 20, "every load message")
        got = mine()
    assert report.sent == 3000 and report.acked == report.sent and report.failed == 0
    assert report.errors == 0 and report.pumps == 40
    assert not sub.errors, sub.errors[:3]
    assert len(got) == report.sent and len({r.key for r in got}) == report.sent, "once each"
    by_pump: dict[str, list[contract.Telemetry]] = {}
    for r in got:
        assert isinstance(r.message, contract.Telemetry)
        by_pump.setdefault(r.key[0], []).append(r.message)
    assert len(by_pump) == 40
    starts = {msgs[0].seq for msgs in by_pump.values()}
    assert len(starts) == 1, "every pump starts at the run's seq"
    now = datetime.now(UTC)
    for msgs in by_pump.values():
        assert [m.seq for m in msgs] == list(range(msgs[0].seq, msgs[0].seq + len(msgs)))
        steps = {b.time - a.time for a, b in itertools.pairwise(msgs)}
        assert steps == {timedelta(seconds=600)}, "device time advances one interval a message"
        assert all(m.low_reservoir_alarm_ml < m.reservoir_ml for m in msgs)
        assert msgs[-1].time <= now
    p50, p99 = report.latency.quantile(0.5), report.latency.quantile(0.99)
    assert p50 is not None and p99 is not None and 0 < p50 <= p99
    assert seen and seen[-1].acked == report.acked, "the live line saw the final count"
