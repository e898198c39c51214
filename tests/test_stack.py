"""The local stack runs real servers: a broker that keeps a long backlog for an absent
subscriber across a restart, a database that survives a restart, and clean stops."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pumpfleet import stack as stack_mod
from pumpfleet.broker import BrokerOptions
from pumpfleet.stack import StackError, StackInfo

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0


class Client:
    """A paho client whose callbacks feed a condition, so tests wait on state, not time."""

    def __init__(
        self,
        info: StackInfo,
        client_id: str,
        *,
        persistent: bool,
        protocol: MQTTProtocolVersion = mqtt.MQTTv311,
        account: str = "ingest",
    ) -> None:
        self.info = info
        self.persistent = persistent
        self.protocol = protocol
        kwargs: dict[str, Any] = {}
        if protocol == mqtt.MQTTv311:
            kwargs["clean_session"] = not persistent
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            **kwargs,
        )
        options = BrokerOptions.from_url(info.mqtt_url_for(account))
        self.client.username_pw_set(options.username, options.password)
        self.client.max_inflight_messages_set(1000)
        self.cond = threading.Condition()
        self.connected = False
        self.session_present: bool | None = None
        self.subscribed = False
        self.messages: list[mqtt.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.connected = not rc.is_failure
            self.session_present = bool(flags.session_present)
            self.cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.connected = False
            self.cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self.cond:
            self.subscribed = all(not code.is_failure for code in codes)
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def wait(self, predicate: Any, what: str, timeout: float = DEADLINE_S) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out waiting for {what}"

    def connect(self) -> Client:
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            # MQTT 5 ends a session at disconnect unless told otherwise.
            props.SessionExpiryInterval = 3600 if self.persistent else 0
            self.client.connect(
                self.info.mqtt_host,
                self.info.mqtt_port,
                clean_start=not self.persistent,
                properties=props,
            )
        else:
            self.client.connect(self.info.mqtt_host, self.info.mqtt_port)
        self.client.loop_start()
        self.wait(lambda: self.connected, "CONNACK")
        return self

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self.wait(lambda: self.subscribed, "SUBACK")

    def publish_all(self, topic: str, payloads: list[bytes]) -> None:
        infos = [self.client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(DEADLINE_S)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.wait(lambda: not self.connected, "disconnect")
        self.client.loop_stop()


def _forget_session(info: StackInfo, client_id: str) -> None:
    """Leave no queued messages behind in the shared broker for later tests."""
    Client(info, client_id, persistent=False).connect().close()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_broker_round_trips_a_qos1_message(stack: StackInfo) -> None:
    topic = f"pumps/T-{uuid.uuid4().hex[:12]}/telemetry"
    sub = Client(stack, f"sub-{uuid.uuid4().hex}", persistent=False).connect()
    pub = Client(stack, f"pub-{uuid.uuid4().hex}", persistent=False, account="fleet").connect()
    try:
        sub.subscribe(topic)
        pub.publish_all(topic, [b"hello pump"])
        sub.wait(lambda: len(sub.messages) == 1, "the message")
        assert sub.messages[0].payload == b"hello pump"
        assert sub.messages[0].qos == 1
    finally:
        pub.close()
        sub.close()


async def test_database_answers_and_the_test_database_is_fresh(
    stack: StackInfo, database_url: str
) -> None:
    assert stack.database_url == (f"postgresql://pumpfleet@127.0.0.1:{stack.pg_port}/pumpfleet")
    conn = await asyncpg.connect(stack.database_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == database_url.rsplit("/", 1)[1]
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
            "'information_schema')"
        )
        assert tables == 0
        settings = dict(
            await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('max_connections', 'listen_addresses', 'server_encoding', 'fsync')"
            )
        )
        assert settings == {
            "max_connections": "200",
            "listen_addresses": "127.0.0.1",
            "server_encoding": "UTF8",
            "fsync": "on",
        }
        assert await conn.fetchval("SHOW shared_buffers") == "256MB"
    finally:
        await conn.close()


def test_info_urls_and_environment(stack: StackInfo) -> None:
    assert stack.mqtt_url == f"mqtt://127.0.0.1:{stack.mqtt_port}"
    env = stack.to_env()
    assert env["PUMPFLEET_DATABASE_URL"] == stack.database_url
    assert env["PUMPFLEET_MQTT__URL"] == stack.mqtt_url_for("ingest")
    assert "pumpfleet-ingest:" in env["PUMPFLEET_MQTT__URL"]
    ingest = stack.env_for("ingest")
    assert ingest["PUMPFLEET_DATABASE_URL"].startswith("postgresql://pumpfleet_ingest_local@")
    assert stack.env_for("alerting")["PUMPFLEET_MQTT__URL"] == stack.mqtt_url  # no broker use
    assert "pumpfleet-fleet:" in stack.env_for("fleet")["PUMPFLEET_MQTT__URL"]
    assert stack_mod.load(stack.run_dir) == stack


def test_up_twice_returns_the_running_stack(stack: StackInfo) -> None:
    before = stack_mod.status(stack.run_dir)
    assert before.running
    assert stack_mod.up(stack.run_dir) == stack
    after = stack_mod.status(stack.run_dir)
    assert (after.mqtt.pid, after.postgres.pid) == (before.mqtt.pid, before.postgres.pid)
    assert after.running


def test_up_restarts_a_stopped_server_on_its_port(stack: StackInfo) -> None:
    pg_pid = stack_mod.status(stack.run_dir).postgres.pid
    stack_mod.stop_broker(stack)
    try:
        assert stack_mod.load(stack.run_dir) is None
        assert stack_mod.up(stack.run_dir) == stack
        st = stack_mod.status(stack.run_dir)
        assert st.running
        assert st.postgres.pid == pg_pid
    finally:
        stack_mod.start_broker(stack)


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["mqtt311", "mqtt5"])
def test_persistent_session_keeps_1500_messages_across_a_broker_restart(
    stack: StackInfo, protocol: MQTTProtocolVersion
) -> None:
    # Stock mosquitto keeps 1000 queued messages per offline client; 1500 proves the limit
    # is raised, and the restart proves they are written to disk on a clean stop.
    count = 1500
    client_id = f"persistent-{uuid.uuid4().hex}"
    topic = f"pumps/T-{uuid.uuid4().hex[:12]}/telemetry"
    try:
        sub = Client(stack, client_id, persistent=True, protocol=protocol).connect()
        sub.subscribe(topic)
        sub.close()

        pub = Client(stack, f"pub-{uuid.uuid4().hex}", persistent=False, account="fleet").connect()
        pub.publish_all(topic, [f"m{i}".encode() for i in range(count)])
        pub.close()

        stack_mod.stop_broker(stack)
        assert not stack_mod.status(stack.run_dir).mqtt.running
        stack_mod.start_broker(stack)
        assert stack_mod.status(stack.run_dir).mqtt.running

        again = Client(stack, client_id, persistent=True, protocol=protocol).connect()
        try:
            assert again.session_present
            again.wait(lambda: len(again.messages) >= count, f"{count} queued messages")
        finally:
            again.close()
        assert {m.payload for m in again.messages} == {f"m{i}".encode() for i in range(count)}
        assert {m.qos for m in again.messages} == {1}
    finally:
        stack_mod.start_broker(stack)  # no-op unless the test failed while it was stopped
        _forget_session(stack, client_id)


async def test_database_restart_keeps_data(stack: StackInfo, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
    await conn.close()

    stack_mod.stop_database(stack)
    assert not stack_mod.status(stack.run_dir).postgres.running
    with pytest.raises(OSError):
        await asyncpg.connect(database_url, timeout=5)
    stack_mod.start_database(stack)
    assert stack_mod.status(stack.run_dir).postgres.running

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT x FROM t") == 42
    finally:
        await conn.close()


async def test_down_stops_both_and_keeps_data_unless_purged(tmp_path: Path) -> None:
    run_dir = tmp_path / "own-stack"
    info = stack_mod.up(run_dir)
    try:
        conn = await asyncpg.connect(info.database_url)
        await conn.execute("CREATE TABLE kept (x int)")
        await conn.close()
        st = stack_mod.status(run_dir)
        pids = [st.mqtt.pid, st.postgres.pid]
        assert all(pids)

        stack_mod.down(run_dir)
        assert all(_pid_gone(pid) for pid in pids if pid)
        assert not (run_dir / "stack.json").exists()
        assert stack_mod.load(run_dir) is None
        assert not stack_mod.status(run_dir).running

        info = stack_mod.up(run_dir)
        conn = await asyncpg.connect(info.database_url)
        try:
            assert await conn.fetchval("SELECT to_regclass('kept') IS NOT NULL")
        finally:
            await conn.close()
    finally:
        stack_mod.down(run_dir, purge=True)
    assert not run_dir.exists()


def test_missing_mosquitto_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(stack_mod, "_MOSQUITTO_DIRS", ())
    with pytest.raises(StackError) as err:
        stack_mod.up(tmp_path / "run")
    assert str(err.value) == "mosquitto not found: install it with `apt-get install mosquitto`"
    assert not (tmp_path / "run").exists()


def test_missing_postgres_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # mosquitto is still found in /usr/sbin
    monkeypatch.setattr(stack_mod, "_PG_BIN_GLOBS", ())
    with pytest.raises(StackError, match=r"install them with `apt-get install postgresql`$"):
        stack_mod.up(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_sigterm_ends_a_running_stack_block_and_takes_the_stack_down(tmp_path: Path) -> None:
    """A benchmark script killed with SIGTERM leaves no mosquitto or PostgreSQL behind."""
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "stack"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pumpfleet import stack\n"
        "with stack.running_stack(Path(sys.argv[1]), purge=True) as info:\n"
        "    print('up', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        status = stack_mod.status(run_dir)
        assert status.running, status
        pids = [p for p in (status.mqtt.pid, status.postgres.pid) if p]
        assert len(pids) == 2, status
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + DEADLINE_S  # the servers themselves are gone, not just the state
    while left := [p for p in pids if Path(f"/proc/{p}").exists()]:
        assert time.monotonic() < deadline, f"still running after SIGTERM: {left}"
        time.sleep(0.1)
