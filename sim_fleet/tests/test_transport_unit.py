"""The lean MQTT client against a scripted fake broker, the latency histogram, and the load
generator's message templates: no real broker needed."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_agent import Agent, BrokerOptions, PumpDriver, Store
from pumpfleet import contract
from pumpfleet.stack import free_port
from pumpfleet.testing import wait_until
from sim_fleet import agent_driver
from sim_fleet._load import LoadConfig, load_pump_id, render, templates
from sim_fleet._mqtt import ConnectError, Connection, Histogram


class FakeBroker:
    """Accepts one client, answers CONNECT with `connack`, records the PUBLISH packets it gets."""

    def __init__(self, connack: bytes) -> None:
        self.connack = connack
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.publishes: list[tuple[int, str, int, bytes]] = []  # first byte, topic, mid, payload
        self.connect_packet = b""
        self.client: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client, _ = self.server.accept()
        self.client = client
        buf = b""
        while True:
            try:
                chunk = client.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 2:
                length, i, mult = 0, 1, 1
                while buf[i] & 0x80:
                    length += (buf[i] & 0x7F) * mult
                    mult *= 128
                    i += 1
                length += buf[i] * mult
                end = i + 1 + length
                if end > len(buf):
                    break
                first, body = buf[0], buf[i + 1 : end]
                buf = buf[end:]
                if first == 0x10:
                    self.connect_packet = body
                    client.sendall(self.connack)
                elif first & 0xF0 == 0x30:
                    (tlen,) = struct.unpack("!H", body[:2])
                    topic = body[2 : 2 + tlen].decode()
                    (mid,) = struct.unpack("!H", body[2 + tlen : 4 + tlen])
                    payload = body[4 + tlen + 1 :]  # after the empty properties
                    self.publishes.append((first, topic, mid, payload))

    def send(self, data: bytes) -> None:
        assert self.client is not None
        self.client.sendall(data)

    def hang_up(self) -> None:
        if self.client is not None:
            self.client.shutdown(socket.SHUT_RDWR)
            self.client.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.close()


@contextmanager
def fake_broker(connack: bytes) -> Iterator[FakeBroker]:
    broker = FakeBroker(connack)
    try:
        yield broker
    finally:
        broker.close()


def connack(reason: int = 0, receive_maximum: int | None = None) -> bytes:
    props = b"" if receive_maximum is None else b"\x21" + struct.pack("!H", receive_maximum)
    body = bytes([0, reason, len(props)]) + props
    return bytes([0x20, len(body)]) + body


def test_connect_refused_is_one_line_that_names_the_fix() -> None:
    with fake_broker(connack(0x86)) as broker:
        conn = Connection(BrokerOptions(port=broker.port, username="u", password="p"), "c1")
        with pytest.raises(ConnectError, match=r"bad user name or password.*USERNAME"):
            conn.connect()
        assert (
            b"\x00\x04MQTT\x05" in broker.connect_packet and b"\x00\x01u" in broker.connect_packet
        )


def test_nobody_listening_says_how_to_start_a_broker() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(ConnectError, match="pumpfleet stack up"):
        Connection(BrokerOptions(port=port), "c1", connect_timeout_s=2).connect()


def test_window_follows_receive_maximum_and_pubacks_are_matched_by_id() -> None:
    acks: list[tuple[Any, int]] = []
    with fake_broker(connack(0, receive_maximum=3)) as broker:
        conn = Connection(
            BrokerOptions(port=broker.port),
            "c1",
            max_inflight=100,
            on_ack=lambda token, reason, latency: acks.append((token, reason)),
            latency=Histogram(),
        )
        conn.connect()
        assert conn.window == 3, "capped by the broker's Receive Maximum"
        mids = [
            conn.publish("pumps/P-1/telemetry", b"a", token="a"),
            conn.publish("pumps/P-1/status", b"b", retain=True, token="b"),
            conn.publish("pumps/P-2/event", b"c", token="c"),
        ]
        assert mids == [1, 2, 3] and conn.free == 0
        with pytest.raises(RuntimeError, match="window full"):
            conn.publish("pumps/P-1/telemetry", b"d")
        conn.flush(5)
        wait_until(lambda: len(broker.publishes) == 3, 5, "three PUBLISH packets")
        first, topic, mid, payload = broker.publishes[1]
        assert (first, topic, mid, payload) == (0x33, "pumps/P-1/status", 2, b"b"), "QoS 1 retain"
        # success (no reason byte), "no matching subscribers" (0x10: still success), refused
        broker.send(b"\x40\x02\x00\x02" + b"\x40\x03\x00\x01\x10" + b"\x40\x04\x00\x03\x87\x00")
        wait_until(lambda: conn.read() or conn.inflight == 0, 5, "the PUBACKs")
        assert sorted(acks) == [("a", 0x10), ("b", 0), ("c", 0x87)]
        assert (conn.acked, conn.refused, conn.inflight, conn.free) == (2, 1, 0, 3)
        assert conn.latency is not None and conn.latency.n == 3
        conn.close()


def test_a_lost_connection_hands_back_what_was_not_acknowledged_in_order() -> None:
    with fake_broker(connack()) as broker:
        conn = Connection(BrokerOptions(port=broker.port), "c1")
        conn.connect()
        for token in ("m1", "m2", "m3"):
            conn.publish("pumps/P-1/telemetry", token.encode(), token=token)
        conn.flush(5)
        wait_until(lambda: len(broker.publishes) == 3, 5, "three PUBLISH packets")
        broker.send(b"\x40\x02\x00\x02")  # only m2 acknowledged
        broker.hang_up()
        with pytest.raises(Exception, match="closed the connection"):
            wait_until(lambda: conn.read() and False, 5, "the connection to drop")
        assert not conn.connected
        assert conn.reset() == ["m1", "m3"] and conn.inflight == 0


def test_histogram_quantiles_within_two_percent_and_merge() -> None:
    a, b = Histogram(), Histogram()
    for i in range(1, 1001):
        (a if i % 2 else b).add(i / 1000.0)  # 1 ms .. 1 s
    a.merge(b)
    assert a.n == 1000 and a.max_s == 1.0
    p50, p99 = a.quantile(0.5), a.quantile(0.99)
    assert p50 is not None and p99 is not None
    assert 0.5 <= p50 <= 0.5 * 1.021 and 0.99 <= p99 <= 0.99 * 1.021
    assert Histogram.from_dict(a.to_dict()).quantile(0.99) == p99
    assert Histogram().quantile(0.5) is None


def test_load_templates_render_contract_valid_telemetry_never_from_the_future() -> None:
    config = LoadConfig(pumps=30, interval_s=600, id_prefix="LT")
    shard = templates(config, range(1, 30, 3))
    assert [t.pump_id for t in shard][:2] == [load_pump_id("LT", 1), "LT-000005"]
    now = datetime.now(UTC)
    t0 = int(now.timestamp()) - 200 * 600
    for t in shard:
        previous = None
        for round_ in (0, 1, 2, 150):
            raw = render(t, round_, 1_000, t0, 600)
            msg = contract.decode(t.topic, raw)
            assert isinstance(msg, contract.Telemetry)
            assert msg.seq == 1_000 + round_ and msg.pump_id == t.pump_id
            assert msg.time <= now
            assert msg.low_reservoir_alarm_ml < msg.reservoir_ml <= msg.reservoir_capacity_ml
            if previous is not None and round_ == previous[0] + 1:
                assert msg.time - previous[1] == timedelta(seconds=600)
            previous = (round_, msg.time)


def test_agent_driver_runs_a_fleet_pump_through_the_device_agent(tmp_path: Path) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    pump = agent_driver("P-777", start=start, reporting_interval_s=600)
    assert isinstance(pump, PumpDriver)
    assert agent_driver("P-777", start=start).spec == pump.spec, "same id, same pump"
    with Store(tmp_path / "q.sqlite3", "P-777") as store:
        agent = Agent(
            pump,
            store,
            BrokerOptions(port=free_port()),  # offline: everything stays queued
            clock=lambda: start + timedelta(hours=2),
            reconnect_min_s=60,
        )
        agent.produce()
        decoded = [contract.decode(m.topic, m.payload) for m in store.messages()]
    assert [d.seq for d in decoded] == list(range(1, len(decoded) + 1))
    assert isinstance(decoded[0], contract.Status) and decoded[0].online
    telemetry = [d for d in decoded if isinstance(d, contract.Telemetry)]
    assert len(telemetry) == 13, "every 10 min for 2 h, both ends included"
    assert telemetry[0].time == start
