"""The agent without a broker: message building, validation, queueing while offline; the
built-in driver, the simulated clock and the CLI's argument checks."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from device_agent import (
    Agent,
    BrokerOptions,
    ConstantPump,
    Observation,
    PumpDriver,
    SimClock,
    Store,
    build_entry,
)
from device_agent.cli import AgentOptions, run_agent
from pumpfleet import contract
from pumpfleet.cli import UsageError
from pumpfleet.settings import MqttSettings, Settings
from pumpfleet.stack import free_port
from pumpfleet.testing import telemetry_fields, until

from .helpers import ScriptedDriver

PUMP = "P-000001"
NOW = datetime.now(UTC).replace(microsecond=0)


def test_build_entry_wraps_the_envelope_and_validates_like_the_ingester() -> None:
    obs = Observation("telemetry", NOW, telemetry_fields(alarms=["low_reservoir"]))
    entry = build_entry(PUMP, obs)
    assert entry.topic == "pumps/P-000001/telemetry" and not entry.retain
    msg = contract.decode(entry.topic, entry.payload(42))
    assert isinstance(msg, contract.Telemetry)
    assert (msg.seq, msg.pump_id, msg.time, msg.alarms) == (42, PUMP, NOW, ("low_reservoir",))
    status = build_entry(PUMP, Observation("status", NOW, {"online": True}))
    assert status.retain and status.topic == "pumps/P-000001/status"


@pytest.mark.parametrize(
    ("obs", "error"),
    [
        (Observation("telemetry", NOW, telemetry_fields(reservoir_ml=-1)), "reservoir_ml"),
        (Observation("telemetry", NOW, {**telemetry_fields(), "extra": 1}), "extra"),
        (Observation("telemetry", NOW, {**telemetry_fields(), "seq": 5}), "envelope"),
        (Observation("telemetry", NOW.replace(tzinfo=None), telemetry_fields()), "UTC offset"),
        (Observation("event", NOW, {"event": "teleport"}), "event"),
        (Observation("telemetry", NOW, telemetry_fields(battery_pct=float("nan"))), "JSON"),
        (Observation("bogus", NOW, {}), "kind"),  # type: ignore[arg-type]
    ],
)
def test_build_entry_rejects_what_breaks_the_contract(obs: Observation, error: str) -> None:
    with pytest.raises(contract.ContractError, match=error):
        build_entry(PUMP, obs)


def test_observation_carries_sim_time_and_transport_flags() -> None:
    plain = Observation("telemetry", NOW, telemetry_fields())
    assert plain.sim_time == NOW and not (plain.duplicate or plain.lost) and plain.delay_s == 0
    skewed = Observation("event", NOW, {"event": "mri_start"}, sim_time=NOW - timedelta(minutes=4))
    assert skewed.sim_time != skewed.time
    message = skewed.to_message(PUMP, 7)
    assert isinstance(message, contract.MriStart) and message.seq == 7


def test_build_entry_turns_simulated_delay_into_wall_seconds_and_keeps_lost() -> None:
    obs = Observation("telemetry", NOW, telemetry_fields(), delay_s=1200.0, lost=True)
    assert build_entry(PUMP, obs).delay_s == 1200.0, "real time: simulated = wall"
    fast = build_entry(PUMP, obs, speed=600.0)
    assert fast.delay_s == 2.0 and fast.lost
    with pytest.raises(ValueError, match="speed"):
        build_entry(PUMP, obs, speed=0)


def test_agent_spends_a_seq_on_a_lost_observation_and_scales_delay_by_its_clock(
    tmp_path: Path,
) -> None:
    observations = [
        Observation("telemetry", NOW - timedelta(minutes=30), telemetry_fields(15.0)),
        Observation("telemetry", NOW - timedelta(minutes=20), telemetry_fields(14.9), lost=True),
        Observation(
            "telemetry", NOW - timedelta(minutes=10), telemetry_fields(14.8), delay_s=3600.0
        ),
    ]
    clock = SimClock(NOW, speed=60.0)
    with Store(tmp_path / "q.sqlite3", PUMP, wall_clock=lambda: 1000.0) as store:
        agent = Agent(ScriptedDriver(PUMP, observations), store, BrokerOptions(port=free_port()))
        assert agent.speed == 1.0, "a plain clock runs at real time"
        agent = Agent(
            ScriptedDriver(PUMP, observations), store, BrokerOptions(port=free_port()), clock=clock
        )
        assert agent.speed == 60.0, "taken from the SimClock"
        agent.produce()
        queued = store.messages()
        assert [m.seq for m in queued] == [1, 3], "seq 2 was spent on the lost one"
        assert agent.stats.lost == 1 and agent.stats.queued == 2
        assert queued[1].not_before == 1000.0 + 60.0, "3600 simulated s at 60x = 60 wall s"


async def test_offline_agent_queues_in_order_counts_invalid_and_logs_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    observations = [
        Observation("telemetry", NOW - timedelta(minutes=30), telemetry_fields(15.0)),
        Observation("event", NOW - timedelta(minutes=25), {"event": "mri_start"}),
        Observation("telemetry", NOW - timedelta(minutes=20), telemetry_fields(-5.0)),  # bug
        Observation("telemetry", NOW - timedelta(minutes=10), telemetry_fields(14.9)),
    ]
    driver = ScriptedDriver(PUMP, observations)
    broker = BrokerOptions(port=free_port())  # nobody listens there
    caplog.set_level(logging.DEBUG, logger="device_agent")
    with Store(tmp_path / "q.sqlite3", PUMP) as store:
        agent = Agent(driver, store, broker, reconnect_min_s=0.01, reconnect_max_s=0.02)
        running = asyncio.create_task(agent.arun(poll_s=0.01))

        async def three_attempts() -> bool:
            return agent.stats.connect_failures >= 3

        await until(three_attempts, 10, "3 failed attempts")
        assert not agent.connected
        agent.request_stop()
        await asyncio.wait_for(running, 10)
        queued = store.messages()
        assert [m.seq for m in queued] == [1, 2, 3], "the invalid one consumed no seq"
        assert [m.kind for m in queued] == ["telemetry", "event", "telemetry"]
        decoded = [contract.decode(m.topic, m.payload) for m in queued]
        assert [d.seq for d in decoded] == [1, 2, 3]
        assert agent.stats.invalid == 1 and agent.stats.queued == 3
        will = store.will()
        assert will is not None and (will.online_seq, will.will_seq) == (4, 5)
        assert will.state == "reserved", "no broker saw it: reused by later attempts"
        assert store.next_seq == 6, "retries reserved no further seqs"
        assert json.loads(will.payload)["online"] is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "invalid observation dropped",
        "broker unreachable: queueing on disk and retrying with backoff",
    ]


def test_broker_options_from_settings() -> None:
    opts = BrokerOptions.from_settings(
        MqttSettings(
            url="mqtts://broker.example:8884",
            username="pump-{pump_id}",
            password=SecretStr("s3cret"),
            keepalive_s=45,
        ),
        PUMP,
    )
    assert (opts.host, opts.port, opts.tls, opts.keepalive_s) == ("broker.example", 8884, True, 45)
    assert (opts.username, opts.password) == ("pump-P-000001", "s3cret")
    assert "s3cret" not in repr(opts) and opts.url == "mqtts://broker.example:8884"
    plain = BrokerOptions.from_settings(MqttSettings(url="mqtt://u:p%40ss@10.0.0.1"), PUMP)
    assert (plain.port, plain.tls, plain.username, plain.password) == (1883, False, "u", "p@ss")
    with pytest.raises(ValueError, match="not mqtt://"):
        BrokerOptions.from_settings(MqttSettings(url="http://x:1"), PUMP)


def test_constant_pump_drains_at_dose_over_concentration() -> None:
    start = NOW - timedelta(days=80)
    pump = ConstantPump(PUMP, start=start, reporting_interval_s=86_400, reservoir_ml=20.0)
    assert isinstance(pump, PumpDriver)
    assert pump.rate_ul_per_h == pytest.approx(10.4167, abs=1e-4)  # 0.25 mL/day
    first = pump.advance(start + timedelta(days=1))
    assert [o.fields["reservoir_ml"] for o in first] == [20.0, 19.75]
    assert pump.advance(start + timedelta(days=1, hours=23)) == [], "nothing until the next tick"
    rest = pump.advance(start + timedelta(days=80))
    raised = [o.fields["alarm"] for o in rest if o.kind == "event"]
    assert raised == ["low_reservoir", "empty_reservoir"]
    low = next(o for o in rest if o.kind == "event")
    assert low.time == start + timedelta(days=72), "20 mL - 72 d * 0.25 mL/d = 2 mL"
    last = rest[-1]
    assert last.fields["pump_state"] == "stopped" and last.fields["delivered_ul_per_h"] == 0.0
    for obs in first + rest:
        build_entry(PUMP, obs)  # every message the built-in pump makes is contract-valid


def test_sim_clock_runs_fast_but_never_ahead_of_the_wall_clock() -> None:
    mono = [0.0]
    wall = NOW
    clock = SimClock(NOW - timedelta(hours=2), 60.0, wall=lambda: wall, monotonic=lambda: mono[0])
    assert clock() == NOW - timedelta(hours=2)
    mono[0] = 60.0  # one real minute = one simulated hour
    assert clock() == NOW - timedelta(hours=1)
    mono[0] = 600.0
    assert clock() == NOW, "capped at the wall clock: the contract rejects future times"


def _options(**over: Any) -> AgentOptions:
    return replace(AgentOptions(PUMP), **over)


def test_cli_rejects_bad_input_with_one_line(tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path)
    with pytest.raises(UsageError, match="--pump-id"):
        run_agent(_options(pump_id="pumps/#"), settings)
    with pytest.raises(UsageError, match="positive"):
        run_agent(_options(interval_s=0), settings)
    # A URL that is not MQTT is refused by the settings themselves (one line from `main`).
    with pytest.raises(ValidationError, match="PUMPFLEET_MQTT__URL"):
        MqttSettings(url="ftp://x")
    tls = "mqtts://127.0.0.1:8883"
    plain_with_ca = Settings(run_dir=tmp_path, mqtt=MqttSettings(tls_ca=tmp_path / "ca.pem"))
    with pytest.raises(UsageError, match="plain MQTT; use an mqtts:// URL"):
        run_agent(_options(), plain_with_ca)
    no_ca = Settings(run_dir=tmp_path, mqtt=MqttSettings(url=tls, tls_ca=tmp_path / "missing.pem"))
    with pytest.raises(UsageError, match="tls_ca"):
        run_agent(_options(), no_ca)
    (tmp_path / "junk.pem").write_text("not a certificate")
    junk_ca = Settings(run_dir=tmp_path, mqtt=MqttSettings(url=tls, tls_ca=tmp_path / "junk.pem"))
    with pytest.raises(UsageError, match="TLS files unusable"):
        run_agent(_options(), junk_ca)
    with pytest.raises(UsageError, match="--driver"):
        run_agent(_options(driver="no_such_module:make"), settings)
    with (
        Store(tmp_path / "agents" / f"{PUMP}.sqlite3", PUMP),
        pytest.raises(UsageError, match="another agent"),
    ):
        run_agent(_options(), settings)


async def test_no_connack_in_time_is_a_failed_attempt_that_closes_with_the_will(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that accepts TCP and never answers: the agent gives up after its connect timeout
    with DISCONNECT 0x04 (a broker that did process the CONNECT then publishes the will)."""
    received = bytearray()
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            received.extend(data)
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.INFO, logger="device_agent")
    with Store(tmp_path / "q.sqlite3", PUMP) as store:
        agent = Agent(
            ScriptedDriver(PUMP, []),
            store,
            BrokerOptions(port=port),
            connect_timeout_s=0.3,
            reconnect_min_s=60,
        )
        running = asyncio.create_task(agent.arun(poll_s=0.01))
        await asyncio.wait_for(closed.wait(), 10)
        agent.request_stop()
        await asyncio.wait_for(running, 10)
    server.close()
    assert received[0] == 0x10, "a CONNECT went out"
    assert received.endswith(b"\xe0\x01\x04"), "then DISCONNECT, reason 0x04"
    assert agent.stats.connect_failures == 1 and agent.stats.connects == 0
    failed = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [getattr(r, "error", None) for r in failed] == ["no CONNACK within 0.3s"]
