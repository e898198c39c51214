"""The broker's half of docs/security.md, as an attacker would try it against the real mosquitto:
nobody is anonymous, a wrong password is refused, a pump publishes only under its own topics and
reads nothing, the ingest account reads and cannot publish, a revoked pump is cut off and
refused, TLS verifies the server and the client-certificate listener wants a certificate; and
the provisioning commands a user runs, with their one-line errors."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pubtools import telemetry

from pumpfleet import brokerauth, contract, provision, schema
from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions
from pumpfleet.testing import RecordingSubscriber, wait_until

pytestmark = pytest.mark.integration

DEADLINE_S = 15.0


class Conn:
    """A paho client that records its CONNACK, SUBACKs, PUBACKs and disconnects."""

    def __init__(self, options: BrokerOptions, name: str = "t") -> None:
        self.client = options.paho_client(f"{name}-{uuid.uuid4().hex[:8]}")
        self.client.reconnect_delay_set(60, 60)  # a refused client stays refused in the test
        self.options = options
        self.cond = threading.Condition()
        self.connack: Any = None
        self.subacks: list[Any] = []
        self.pubacks: dict[int, Any] = {}
        self.disconnects: list[Any] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self.cond:
            self.subacks.append(rcs[0])
            self.cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self.cond:
            self.pubacks[mid] = rc
            self.cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.disconnects.append(rc)
            self.cond.notify_all()

    def wait(self, predicate: Any, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, DEADLINE_S), f"timed out waiting for {what}"

    def connect(self) -> Any:
        """Connect and return the CONNACK's reason code (Success or why not)."""
        self.client.connect(self.options.host, self.options.port, keepalive=10)
        self.client.loop_start()
        self.wait(lambda: self.connack is not None or self.disconnects, "CONNACK")
        return self.connack if self.connack is not None else self.disconnects[0]

    def publish(self, topic: str, payload: bytes) -> Any:
        info = self.client.publish(topic, payload, qos=1)
        self.wait(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, topic_filter: str) -> Any:
        n = len(self.subacks)
        self.client.subscribe(topic_filter, qos=1)
        self.wait(lambda: len(self.subacks) > n, f"SUBACK for {topic_filter}")
        return self.subacks[-1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _as(
    stack: stack_mod.StackInfo, username: str, password: str, *, tls: bool = False
) -> BrokerOptions:
    return BrokerOptions(
        host="localhost" if tls else stack.mqtt_host,
        port=stack.mqtts_port if tls else stack.mqtt_port,
        tls=tls,
        tls_ca=stack.tls_ca if tls else None,
        username=username,
        password=password,
    )


@pytest.fixture
def conns() -> Iterator[list[Conn]]:
    made: list[Conn] = []
    yield made
    for c in made:
        c.close()


def _conn(conns: list[Conn], options: BrokerOptions, name: str = "t") -> Conn:
    c = Conn(options, name)
    conns.append(c)
    return c


def _new_pump(stack: stack_mod.StackInfo) -> tuple[str, str]:
    pump_id = f"SEC-{uuid.uuid4().hex[:10]}"
    password = brokerauth.new_password()
    with brokerauth.Admin(BrokerOptions.from_url(stack.mqtt_url_for("admin"))) as admin:
        admin.add_pump(pump_id, password)
    return pump_id, password


def _reading(pump_id: str, seq: int) -> tuple[str, bytes]:
    return contract.topic(pump_id, "telemetry"), telemetry(pump_id, seq)


# Authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_nobody_is_anonymous_and_a_wrong_password_is_refused(
    broker: stack_mod.StackInfo, conns: list[Conn], tls: bool
) -> None:
    anonymous = _as(broker, "", "", tls=tls)
    anonymous = BrokerOptions(**{**anonymous.__dict__, "username": None, "password": None})
    assert str(_conn(conns, anonymous).connect()) == "Not authorized"
    ingest_user = brokerauth.ACCOUNTS["ingest"]
    wrong = _as(broker, ingest_user, "not-the-password", tls=tls)
    assert str(_conn(conns, wrong).connect()) == "Not authorized"
    pump_id, password = _new_pump(broker)
    assert str(_conn(conns, _as(broker, pump_id, password + "x", tls=tls)).connect()) == (
        "Not authorized"
    )
    right = BrokerOptions.from_url(broker.mqtt_url_for("ingest"))
    assert str(_conn(conns, right).connect()) == "Success"  # the refusals were not the network


# Authorisation ----------------------------------------------------------------------------------


def test_a_pump_publishes_only_under_its_own_topics_and_reads_nothing(
    broker: stack_mod.StackInfo, conns: list[Conn]
) -> None:
    pump_a, password_a = _new_pump(broker)
    pump_b, _ = _new_pump(broker)
    watcher = RecordingSubscriber(broker.mqtt_url_for("ingest"), persistent=False)
    try:
        a = _conn(conns, _as(broker, pump_a, password_a), "pump-a")
        assert str(a.connect()) == "Success"
        # One connection, in order: the spoofed message first, then the pump's own.
        spoof_topic, spoof = _reading(pump_b, 1)
        assert str(a.publish(spoof_topic, spoof)) == "Not authorized"
        assert not a.publish(*_reading(pump_a, 1)).is_failure
        assert str(a.publish(f"other/{pump_a}", b"x")) == "Not authorized"
        wait_until(
            lambda: any(r.message.pump_id == pump_a for r in watcher.received),
            DEADLINE_S,
            "pump A's own reading at the subscriber",
        )
        assert all(r.message.pump_id != pump_b for r in watcher.received), (
            "a message published on another pump's topic reached a subscriber"
        )
        for topic_filter in ("pumps/#", f"pumps/{pump_b}/#", f"pumps/{pump_a}/#", "#"):
            assert a.subscribe(topic_filter).is_failure, f"a pump may subscribe {topic_filter}"
    finally:
        watcher.close()


def test_the_ingest_account_reads_pumps_and_publishes_nothing(
    broker: stack_mod.StackInfo, conns: list[Conn]
) -> None:
    ingest = _conn(conns, BrokerOptions.from_url(broker.mqtt_url_for("ingest")), "ingest")
    assert str(ingest.connect()) == "Success"
    assert not ingest.subscribe("pumps/#").is_failure
    assert not ingest.subscribe("$share/ingest/pumps/+/telemetry").is_failure
    assert ingest.subscribe("$SYS/#").is_failure
    pump_id, _ = _new_pump(broker)
    assert str(ingest.publish(*_reading(pump_id, 1))) == "Not authorized"
    fleet = _conn(conns, BrokerOptions.from_url(broker.mqtt_url_for("fleet")), "fleet")
    assert str(fleet.connect()) == "Success"
    assert fleet.subscribe("pumps/#").is_failure  # the fleet account reads nothing
    assert not fleet.publish(*_reading(pump_id, 2)).is_failure
    assert str(fleet.publish("$CONTROL/dynamic-security/v1", b"{}")) == "Not authorized"


# TLS --------------------------------------------------------------------------------------------


def test_tls_verifies_the_server_and_the_client_certificate_listener_wants_one(
    broker: stack_mod.StackInfo, conns: list[Conn]
) -> None:
    pump_id, password = _new_pump(broker)
    system_trust = BrokerOptions(
        host="localhost", port=broker.mqtts_port, tls=True, username=pump_id, password=password
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        _conn(conns, system_trust).connect()  # the dev CA is not in the system store
    assert str(_conn(conns, _as(broker, pump_id, password, tls=True)).connect()) == "Success"

    mtls = BrokerOptions(
        host="localhost",
        port=broker.mqtt_mtls_port,
        tls=True,
        tls_ca=broker.tls_ca,
        username=pump_id,
        password=password,
    )
    no_cert = _conn(conns, mtls)
    try:
        outcome = str(no_cert.connect())  # TLS 1.3: the server's refusal comes after connect()
    except (ssl.SSLError, OSError) as exc:
        outcome = f"handshake failed: {exc}"
    assert outcome != "Success", "the client-certificate listener admitted a client without one"
    cert, key = broker.dev_ca.issue_client(pump_id)
    with_cert = BrokerOptions(**{**mtls.__dict__, "tls_cert": cert, "tls_key": key})
    c = _conn(conns, with_cert)
    assert str(c.connect()) == "Success"
    assert not c.publish(*_reading(pump_id, 2)).is_failure


# Provisioning through the command line ----------------------------------------------------------


def _cli(stack: stack_mod.StackInfo, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUMPFLEET_")}
    env.update(
        PUMPFLEET_RUN_DIR=str(stack.run_dir),
        PUMPFLEET_DATABASE_URL=db_url,
        PUMPFLEET_CONFIG=str(stack.run_dir / "no-such.toml"),
    )
    return subprocess.run(
        [sys.executable, "-m", "pumpfleet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
async def db_url(database_url: str) -> str:
    await schema.migrate(database_url)
    return database_url


async def test_provision_an_agent_over_tls_then_revoke_it_while_connected(
    broker: stack_mod.StackInfo, db_url: str, tmp_path: Path, conns: list[Conn]
) -> None:
    pump_id = f"SEC-{uuid.uuid4().hex[:10]}"
    out = tmp_path / "creds"
    made = _cli(
        broker,
        db_url,
        "pumps",
        "provision",
        pump_id,
        "--out",
        str(out),
        "--high-risk",
        "--capacity-ml",
        "40",
    )
    assert made.returncode == 0, made.stderr
    path = out / f"{pump_id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = json.loads(path.read_text())
    assert creds["pump_id"] == creds["username"] == pump_id
    assert creds["broker_url"] == broker.mqtts_url
    assert creds["ca_pem"] == broker.tls_ca.read_text()
    assert creds["password"] not in made.stdout + made.stderr
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow("SELECT * FROM pumps WHERE pump_id = $1", pump_id)
        assert (row["reservoir_capacity_ml"], row["high_risk"], row["low_reservoir_alarm_ml"]) == (
            40.0,
            True,
            4.0,
        )
        assert row["revoked_at"] is None
    finally:
        await conn.close()

    again = _cli(broker, db_url, "pumps", "provision", pump_id, "--out", str(out))
    _one_line_error(again, pump_id, "provisioned already")
    kept = _cli(broker, db_url, "pumps", "provision", pump_id, "--out", str(out), "--keep-existing")
    assert kept.returncode == 0 and "left as it is" in kept.stdout, kept.stderr
    assert json.loads(path.read_text()) == creds  # the file and its password are unchanged

    # The agent reads the file and publishes over TLS; a subscriber sees its readings.
    watcher = RecordingSubscriber(
        broker.mqtt_url_for("ingest"), f"pumps/{pump_id}/#", persistent=False
    )
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUMPFLEET_")}
    env.update(PUMPFLEET_RUN_DIR=str(tmp_path), PUMPFLEET_CONFIG=str(tmp_path / "none.toml"))
    with log.open("ab") as sink:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pumpfleet.cli",
                "agent",
                "--credentials",
                str(path),
                "--interval-s",
                "0.2",
                "--state-dir",
                str(tmp_path / "agent"),
            ],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    try:
        wait_until(lambda: len(watcher.received) >= 3, 30, f"the agent's readings ({log})")
        assert "mqtts://localhost" in log.read_text()

        revoked = _cli(broker, db_url, "pumps", "revoke", pump_id)
        assert revoked.returncode == 0, revoked.stderr
        assert "disabled" in revoked.stdout
        text = lambda: log.read_text()  # noqa: E731
        wait_until(lambda: "Administrative action" in text(), DEADLINE_S, "the agent cut off")
        wait_until(lambda: "Not authorized" in text(), DEADLINE_S, "the agent refused again")
        assert agent.poll() is None, "a refused agent keeps its queue and keeps running"
    finally:
        agent.terminate()
        agent.wait(30)
        watcher.close()
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SELECT revoked_at FROM pumps WHERE pump_id = $1", pump_id)
    finally:
        await conn.close()
    refused = _conn(conns, _as(broker, pump_id, creds["password"], tls=True))
    assert str(refused.connect()) == "Not authorized"

    listed = _cli(broker, db_url, "pumps", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if pump_id in ln)
    assert "disabled" in line and "40" in line

    _one_line_error(
        _cli(broker, db_url, "pumps", "provision", pump_id, "--out", str(out)), "provisioned"
    )


def test_provisioning_errors_are_one_line(
    broker: stack_mod.StackInfo, db_url: str, tmp_path: Path
) -> None:
    database_url = db_url
    _one_line_error(
        _cli(broker, database_url, "pumps", "revoke", "NOBODY-1"), "NOBODY-1", "neither"
    )
    _one_line_error(
        _cli(broker, database_url, "pumps", "provision", "P/1", "--out", str(tmp_path)), "P/1"
    )
    _one_line_error(
        _cli(
            broker,
            database_url,
            "pumps",
            "provision",
            "P-9",
            "--capacity-ml",
            "30",
            "--out",
            str(tmp_path),
        ),
        "20 or 40",
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"pump_id": "P-1"}')
    _one_line_error(_cli(broker, database_url, "agent", "--credentials", str(bad)), str(bad))
    _one_line_error(
        _cli(broker, database_url, "agent", "--credentials", str(tmp_path / "missing.json")),
        "provision",
    )
    elsewhere = _cli_without_stack(tmp_path, "pumps", "list")
    _one_line_error(elsewhere, "PUMPFLEET_PROVISIONING__ADMIN_URL")


def _cli_without_stack(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUMPFLEET_")}
    env.update(PUMPFLEET_RUN_DIR=str(tmp_path / "none"), PUMPFLEET_CONFIG=str(tmp_path / "x.toml"))
    return subprocess.run(
        [sys.executable, "-m", "pumpfleet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_broker_config_allows_no_anonymous_client_and_has_tls_listeners() -> None:
    conf = (Path(__file__).resolve().parent.parent / "deploy" / "mosquitto.conf").read_text()
    settings = [ln.split() for ln in conf.splitlines() if ln.strip() and not ln.startswith("#")]
    assert ["allow_anonymous", "false"] in settings
    assert ["allow_anonymous", "true"] not in settings
    assert any(
        s[0] == "plugin" and s[1].endswith("mosquitto_dynamic_security.so") for s in settings
    )
    listeners = [s[1] for s in settings if s[0] == "listener"]
    assert listeners == ["1883", "8883", "8884"]
    assert sum(s[0] == "certfile" for s in settings) == 2
    assert ["require_certificate", "true"] in settings


def test_the_plugin_file_denies_by_default_and_hashes_passwords() -> None:
    cfg = brokerauth.config({a: f"pw-{a}" for a in brokerauth.ACCOUNTS})
    assert cfg["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }
    text = json.dumps(cfg)
    assert all(f"pw-{a}" not in text for a in brokerauth.ACCOUNTS)
    with pytest.raises(ValueError, match="no password"):
        brokerauth.config({"ingest": "x"})
    with pytest.raises(brokerauth.BrokerAuthError):
        brokerauth.pump_topic_filter("P/#")


async def test_a_pump_provisioned_with_a_client_certificate_connects_with_it(
    broker: stack_mod.StackInfo, db_url: str, tmp_path: Path, conns: list[Conn]
) -> None:
    pump_id = f"SEC-{uuid.uuid4().hex[:10]}"
    out = tmp_path / "creds"
    made = _cli(
        broker,
        db_url,
        "pumps",
        "provision",
        pump_id,
        "--out",
        str(out),
        "--client-cert",
        "--reporting-interval-s",
        "7200",
    )
    assert made.returncode == 0, made.stderr
    creds = provision.read_credentials(out / f"{pump_id}.json")
    conn = await asyncpg.connect(db_url)
    try:
        interval = await conn.fetchval(
            "SELECT reporting_interval_s FROM pumps WHERE pump_id = $1", pump_id
        )
    finally:
        await conn.close()
    assert interval == 7200
    assert creds.broker_url == broker.mqtt_mtls_url
    for name in (creds.client_cert, creds.client_key):
        assert name and stat.S_IMODE((out / name).stat().st_mode) == 0o600
    options = creds.broker_options(base=out)
    c = _conn(conns, options, "mtls")
    assert str(c.connect()) == "Success"
    assert not c.publish(*_reading(pump_id, 1)).is_failure
    without = BrokerOptions(**{**options.__dict__, "tls_cert": None, "tls_key": None})
    refused = _conn(conns, without, "mtls-no-cert")
    try:
        outcome = str(refused.connect())
    except (ssl.SSLError, OSError) as exc:
        outcome = f"handshake failed: {exc}"
    assert outcome != "Success"
