"""The wire contract: what it accepts, what it rejects and why, and its published schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pumpfleet import contract as c

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC).replace(microsecond=0)


def telemetry(**over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "v": 1,
        "pump_id": "P-0001",
        "time": NOW.isoformat(),
        "seq": 7,
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
    }
    body.update(over)
    return body


def decode(body: dict[str, object], kind: str = "telemetry", pump: str = "P-0001") -> c.Message:
    return c.decode(c.topic(pump, kind), json.dumps(body).encode())


def test_valid_telemetry_round_trips() -> None:
    msg = decode(telemetry(alarms=["low_reservoir"]))
    assert isinstance(msg, c.Telemetry)
    assert msg.reservoir_ml == 12.5 and msg.alarms == (c.PumpAlarm.LOW_RESERVOIR,)
    assert msg.time == NOW and msg.time.tzinfo is not None
    assert c.decode(c.topic("P-0001", "telemetry"), c.encode(msg)) == msg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"reservoir_ml": -0.1}, "reservoir_ml"),
        ({"reservoir_ml": 20.5}, "exceeds reservoir_capacity_ml"),
        ({"battery_pct": 100.5}, "battery_pct"),
        ({"battery_pct": -1}, "battery_pct"),
        ({"seq": -1}, "seq"),
        ({"seq": "7"}, "seq"),
        ({"reservoir_ml": "12.5"}, "reservoir_ml"),
        ({"battery_eri": "no"}, "battery_eri"),
        ({"pump_state": "flying"}, "pump_state"),
        ({"alarms": ["low_reservoir", "low_reservoir"]}, "listed twice"),
        ({"alarms": ["gremlins"]}, "alarms.0"),
        ({"v": 3}, "v"),
        ({"extra_field": 1}, "extra_field"),
        ({"time": (NOW + timedelta(hours=1)).isoformat()}, "time"),
        ({"time": "2026-01-01T00:00:00"}, "UTC offset"),
        ({"pump_id": "P 0001"}, "pump_id"),
    ],
)
def test_bad_telemetry_is_rejected_naming_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(c.ContractError, match=field):
        decode(telemetry(**change))


def test_missing_field_is_named() -> None:
    body = telemetry()
    del body["reservoir_ml"]
    with pytest.raises(c.ContractError, match="reservoir_ml: Field required"):
        decode(body)


def test_spoofed_pump_id_is_rejected() -> None:
    with pytest.raises(c.ContractError, match="spoofing"):
        decode(telemetry(), pump="P-0002")


def test_bad_json_and_oversize_are_rejected() -> None:
    with pytest.raises(c.ContractError, match="Invalid JSON"):
        c.decode("pumps/P-0001/telemetry", b'{"v":1,')
    with pytest.raises(c.ContractError, match="exceeds"):
        c.decode("pumps/P-0001/telemetry", b" " * (c.MAX_PAYLOAD_BYTES + 1))


def test_events_are_discriminated_by_name() -> None:
    base = {"v": 1, "pump_id": "P-0001", "time": NOW.isoformat(), "seq": 8}
    refill = decode(
        {
            **base,
            "event": "refill",
            "expected_ml": 3.1,
            "withdrawn_ml": 2.9,
            "injected_ml": 20.0,
            "reservoir_after_ml": 20.0,
            "concentration_mcg_per_ml": 2000.0,
        },
        kind="event",
    )
    assert isinstance(refill, c.Refill) and refill.injected_ml == 20.0
    flex = {
        "mode": "flex",
        "dose_mcg_per_day": 400.0,
        "steps": [
            {"start_minute": 0, "dose_mcg_per_day": 300.0},
            {"start_minute": 480, "dose_mcg_per_day": 500.0},
        ],
    }
    cont = {"mode": "continuous", "dose_mcg_per_day": 350.0}
    rep = decode(
        {**base, "event": "reprogram", "old_schedule": cont, "new_schedule": flex}, kind="event"
    )
    assert isinstance(rep, c.Reprogram) and len(rep.new_schedule.steps) == 2 and rep.session
    alarm = decode({**base, "event": "alarm_raised", "alarm": "motor_stall"}, kind="event")
    assert isinstance(alarm, c.AlarmRaised) and alarm.alarm is c.PumpAlarm.MOTOR_STALL
    with pytest.raises(c.ContractError, match="event"):
        decode({**base, "event": "teleport"}, kind="event")
    with pytest.raises(c.ContractError, match="steps"):
        decode(
            {
                **base,
                "event": "reprogram",
                "old_schedule": cont,
                "new_schedule": {**flex, "steps": flex["steps"][::-1]},
            },
            kind="event",
        )
    too_many = {
        "mode": "flex",
        "dose_mcg_per_day": 400.0,
        "steps": [{"start_minute": i * 60, "dose_mcg_per_day": 400.0} for i in range(14)],
    }
    with pytest.raises(c.ContractError, match=r"new_schedule\.steps"):
        decode(
            {**base, "event": "reprogram", "old_schedule": cont, "new_schedule": too_many},
            kind="event",
        )


def test_status_message() -> None:
    base = {"v": 1, "pump_id": "P-0001", "time": NOW.isoformat(), "seq": 9}
    msg = decode({**base, "online": False, "reason": "connection lost"}, kind="status")
    assert isinstance(msg, c.Status) and msg.online is False


def test_topics_build_and_parse() -> None:
    assert c.topic("P-0001", c.Kind.EVENT) == "pumps/P-0001/event"
    assert c.parse_topic("pumps/P-0001/status") == ("P-0001", c.Kind.STATUS)
    assert c.subscription() == "pumps/+/#"
    assert c.subscription("telemetry", "ingest") == "$share/ingest/pumps/+/telemetry"
    for bad in (
        "pumps/P-0001",
        "pumps/P-0001/telemetry/x",
        "cars/P-0001/telemetry",
        "pumps/P-0001/gossip",
    ):
        with pytest.raises(c.ContractError, match="topic"):
            c.parse_topic(bad)


def test_committed_json_schemas_match_the_models() -> None:
    """docs/contract/ is what firmware teams read: it must not drift from the code."""
    committed = ROOT / "docs" / "contract"
    for name, schema in c.json_schemas().items():
        path = committed / name
        assert path.exists(), f"{path} missing: run `pumpfleet contract schema`"
        assert json.loads(path.read_text()) == schema, (
            f"{path} drifted from the models: run `pumpfleet contract schema` and commit"
        )
    assert sorted(p.name for p in committed.glob("*.json")) == sorted(c.json_schemas())


# Contract v2 ------------------------------------------------------------------------------------

V2 = {
    "v": 2,
    "reservoir_source": "measured",
    "reporting_interval_s": 600,
    "scheduled_ul_per_h": 10.4,
}


def test_v1_telemetry_still_decodes_and_reads_as_a_calculated_volume() -> None:
    msg = decode(telemetry())
    assert isinstance(msg, c.Telemetry)
    assert msg.v == 1 and msg.reservoir_source is None
    assert msg.source is c.ReservoirSource.CALCULATED


def test_v2_telemetry_says_how_its_volume_was_obtained() -> None:
    msg = decode(telemetry(**V2))
    assert isinstance(msg, c.Telemetry)
    assert msg.source is c.ReservoirSource.MEASURED and msg.reporting_interval_s == 600
    assert c.decode(c.topic("P-0001", "telemetry"), c.encode(msg)) == msg


@pytest.mark.parametrize(
    "missing", ["reservoir_source", "reporting_interval_s", "scheduled_ul_per_h"]
)
def test_v2_telemetry_requires_its_new_fields(missing: str) -> None:
    body = telemetry(**V2)
    del body[missing]
    with pytest.raises(c.ContractError, match=f"{missing}: required in contract v2"):
        decode(body)


def test_v1_telemetry_may_not_carry_v2_fields() -> None:
    with pytest.raises(c.ContractError, match="not part of contract v1"):
        decode(telemetry(reservoir_source="measured"))


def test_v2_eri_since_exactly_while_eri_is_active() -> None:
    eri = (NOW - timedelta(days=70)).isoformat()
    msg = decode(telemetry(**V2, battery_eri=True, eri_since=eri))
    assert isinstance(msg, c.Telemetry) and msg.eri_since is not None
    with pytest.raises(c.ContractError, match="eri_since"):
        decode(telemetry(**V2, battery_eri=True))
    with pytest.raises(c.ContractError, match="eri_since"):
        decode(telemetry(**V2, battery_eri=False, eri_since=eri))


def test_v2_refill_says_which_volumes_were_entered_and_which_measured() -> None:
    body = {
        "v": 2,
        "pump_id": "P-0001",
        "time": NOW.isoformat(),
        "seq": 9,
        "kind": "event",
        "event": "refill",
        "expected_ml": 4.0,
        "withdrawn_ml": 3.8,
        "injected_ml": 40.0,
        "reservoir_after_ml": 40.0,
        "concentration_mcg_per_ml": 2000.0,
        "expected_source": "calculated",
        "reservoir_after_source": "entered",
    }
    msg = decode(body, "event")
    assert isinstance(msg, c.Refill) and msg.reservoir_after_source == "entered"
    del body["reservoir_after_source"]
    with pytest.raises(c.ContractError, match="reservoir_after_source: required"):
        decode(body, "event")


def test_the_published_schema_states_the_v2_requirements() -> None:
    schema = c.json_schemas()["telemetry.v2.json"]
    rules = json.dumps(schema["allOf"])
    for name in ("reservoir_source", "reporting_interval_s", "scheduled_ul_per_h", "eri_since"):
        assert name in rules
