"""The publisher's bytes now come from `mqtt5`: the wire is still MQTT 5 byte for byte as the
spec lays it out, and what the broker sends back (split, unexpected, malformed) is handled as
before. A scripted peer on loopback plays the broker; its framing is written out by hand here, as
an oracle independent of the codec."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from device_agent import BrokerOptions
from pumpfleet.testing import wait_until
from sim_fleet._mqtt import ConnectError, Connection, ConnectionLost

CONNACK_OK = b"\x20\x03\x00\x00\x00"


def recv_packets(sock: socket.socket, count: int) -> list[bytes]:
    """The next `count` whole MQTT packets (fixed headers included) from `sock`, and no more."""
    data = b""
    packets: list[bytes] = []
    while len(packets) < count:
        length, mult, i = 0, 1, 1
        while True:  # the remaining length, a variable byte integer after the first byte
            while len(data) <= i:
                data += _recv(sock)
            length += (data[i] & 0x7F) * mult
            if data[i] < 0x80:
                break
            mult *= 128
            i += 1
        while len(data) < i + 1 + length:
            data += _recv(sock)
        packets.append(data[: i + 1 + length])
        data = data[i + 1 + length :]
    assert not data, "no bytes beyond the packets expected"
    return packets


def recv_packet(sock: socket.socket) -> bytes:
    return recv_packets(sock, 1)[0]


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "peer closed"
    return chunk


class Peer:
    """A broker that accepts one client, records its CONNECT and answers with `connack`."""

    def __init__(self, connack: bytes) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connect = b""
        self.sock: socket.socket | None = None
        self._connack = connack
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        sock, _ = self.server.accept()
        sock.settimeout(5)
        self.connect = recv_packet(sock)
        sock.sendall(self._connack)
        self.sock = sock

    def ready(self) -> socket.socket:
        self._thread.join(5)
        assert self.sock is not None
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.server.close()


@contextmanager
def peer(connack: bytes = CONNACK_OK) -> Iterator[Peer]:
    p = Peer(connack)
    try:
        yield p
    finally:
        p.close()


@contextmanager
def connected(**kwargs: Any) -> Iterator[tuple[Connection, socket.socket]]:
    with peer(kwargs.pop("connack", CONNACK_OK)) as p:
        broker = kwargs.pop("broker", BrokerOptions(port=p.port, keepalive_s=60))
        conn = Connection(broker, "c1", **kwargs)
        conn.connect()
        try:
            yield conn, p.ready()
        finally:
            conn.close(clean=False)


def test_connect_is_mqtt5_with_clean_start_keepalive_and_credentials() -> None:
    with peer() as p:
        broker = BrokerOptions(port=p.port, username="u", password="p", keepalive_s=60)
        conn = Connection(broker, "c1")
        conn.connect()
        p.ready()
        conn.close()
    variable = b"\x00\x04MQTT\x05" + b"\xc2" + struct.pack("!H", 60) + b"\x00"
    payload = b"\x00\x02c1" + b"\x00\x01u" + b"\x00\x01p"
    assert p.connect == bytes([0x10, len(variable + payload)]) + variable + payload


def test_publish_bytes_are_the_spec_layout_for_qos0_qos1_retain_and_long_payloads() -> None:
    with connected() as (conn, sock):
        assert conn.publish("pumps/P-1/status", b"on", retain=True) == 1
        conn.flush(5)
        topic = b"\x00\x10pumps/P-1/status"
        body = topic + b"\x00\x01" + b"\x00" + b"on"  # packet id 1, no properties
        assert recv_packet(sock) == bytes([0x33, len(body)]) + body

        assert conn.publish("t", b"x", qos=0) == 0
        conn.flush(5)
        assert recv_packet(sock) == b"\x30\x05\x00\x01t\x00x", "QoS 0: no packet id"

        long = bytes(range(200))
        assert conn.publish("t", long) == 2
        conn.flush(5)
        # remaining length 3 + 2 + 1 + 200 = 206: a two-byte variable byte integer
        assert recv_packet(sock) == b"\x32\xce\x01\x00\x01t\x00\x02\x00" + long
        assert (conn.published, conn.inflight) == (3, 2)


def test_the_cached_head_follows_length_qos_and_retain_changes_on_one_topic() -> None:
    with connected() as (conn, sock):
        sent = [
            (b"ab", 1, False),
            (b"abcd", 1, False),  # longer: a new remaining length
            (b"ab", 0, False),
            (b"ab", 1, True),
            (b"ab", 1, False),
        ]
        mids = [conn.publish("t", p, qos=q, retain=r) for p, q, r in sent]
        conn.flush(5)
        got = recv_packets(sock, len(sent))
    assert mids == [1, 2, 0, 3, 4]
    assert got == [
        b"\x32\x08\x00\x01t\x00\x01\x00ab",
        b"\x32\x0a\x00\x01t\x00\x02\x00abcd",
        b"\x30\x06\x00\x01t\x00ab",
        b"\x33\x08\x00\x01t\x00\x03\x00ab",
        b"\x32\x08\x00\x01t\x00\x04\x00ab",
    ]


def test_a_topic_the_codec_refuses_costs_no_message_id() -> None:
    with connected() as (conn, _):
        with pytest.raises(ValueError, match="topic"):
            conn.publish("pumps/+/telemetry", b"x")
        assert (conn.published, conn.inflight, conn.wants_write) == (0, 0, False)
        assert conn.publish("pumps/P-1/telemetry", b"x") == 1


def test_pubacks_split_across_reads_mixed_with_pingresp_and_reason_strings() -> None:
    acks: list[tuple[Any, int]] = []
    with connected(on_ack=lambda token, reason, _: acks.append((token, reason))) as (conn, sock):
        for token in ("a", "b", "c", "d", "e"):
            conn.publish("pumps/P-1/telemetry", token.encode(), token=token)
        conn.flush(5)
        # PUBACK 2, PINGRESP, then the first 3 bytes of PUBACK 1
        sock.sendall(b"\x40\x02\x00\x02" + b"\xd0\x00" + b"\x40\x02\x00")
        wait_until(lambda: conn.read() or conn.acked == 1, 5, "PUBACK 2")
        # the rest of PUBACK 1, a stale id (not ours), and PUBACK 3 refused: quota exceeded,
        # with a reason string property (0x1F)
        reason = b"\x97" + b"\x07\x1f\x00\x04full"
        sock.sendall(b"\x01" + b"\x40\x02\x00\x09" + bytes([0x40, 2 + len(reason)]) + b"\x00\x03")
        sock.sendall(reason)
        # PUBACK 4: no matching subscribers (0x10, still success), 5: not authorized, no
        # properties; 5 split before its reason code
        sock.sendall(b"\x40\x03\x00\x04\x10" + b"\x40\x03\x00\x05")
        wait_until(lambda: conn.read() or conn.inflight == 1, 5, "PUBACKs 1, 3 and 4")
        sock.sendall(b"\x87")
        wait_until(lambda: conn.read() or conn.inflight == 0, 5, "PUBACK 5")
        assert acks == [("b", 0), ("a", 0), ("c", 0x97), ("d", 0x10), ("e", 0x87)]
        assert (conn.acked, conn.refused, conn.free) == (3, 2, conn.window)


def test_broker_disconnect_names_the_reason() -> None:
    with connected() as (conn, sock):
        sock.sendall(b"\xe0\x01\x8b")  # DISCONNECT, server shutting down
        with pytest.raises(ConnectionLost, match=r"DISCONNECT \(server shutting down\)"):
            wait_until(lambda: conn.read() and False, 5, "the DISCONNECT")
        assert not conn.connected


@pytest.mark.parametrize(
    "data",
    [
        b"\x40\x01\x00",  # a PUBACK too short to hold a packet id
        b"\x40\x03\x00\x01\x42",  # a PUBACK reason code MQTT 5 does not have
    ],
)
def test_a_malformed_packet_drops_the_connection(data: bytes) -> None:
    with connected() as (conn, sock):
        conn.publish("t", b"x")
        conn.flush(5)
        sock.sendall(data)
        with pytest.raises(ConnectionLost, match="malformed packet"):
            wait_until(lambda: conn.read() and False, 5, "the malformed packet")
        assert not conn.connected and conn.reset() == []


def test_connack_receive_maximum_and_server_keepalive_are_honoured() -> None:
    props = b"\x21\x00\x05" + b"\x13\x00\x07"  # Receive Maximum 5, Server Keep Alive 7
    connack = bytes([0x20, 3 + len(props), 0, 0, len(props)]) + props
    with connected(connack=connack, max_inflight=100) as (conn, _):
        assert (conn.window, conn.keepalive_s) == (5, 7)


@pytest.mark.parametrize(
    ("connack", "message"),
    [
        (b"\x20\x02\x00\x01", "does not accept MQTT 5"),  # an MQTT 3.1.1 broker's refusal
        (b"\x20\x03\x00\x87\x00", r"refused us: not authorized; check PUMPFLEET_MQTT__USERNAME"),
        (b"\x20\x03\x00\x89\x00", r"refused us: server busy$"),
        (b"\x20\x03\x00\x77\x00", "sent a CONNACK we cannot read"),  # no such reason code
        (b"\xd0\x00", "expected CONNACK .* got PingRespPacket"),
    ],
)
def test_connack_problems_are_one_line(connack: bytes, message: str) -> None:
    with peer(connack) as p:
        conn = Connection(BrokerOptions(port=p.port), "c1", connect_timeout_s=5)
        with pytest.raises(ConnectError, match=message) as err:
            conn.connect()
        assert "\n" not in str(err.value) and not conn.connected
