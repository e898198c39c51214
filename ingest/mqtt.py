"""paho-mqtt's Client, reading its socket in large chunks.

paho reads a packet with several small `recv` calls (one byte of type, the length byte by byte,
then the body) and handles one packet per `select`. Draining a backlog, that is four or five
system calls per message and caps a Python subscriber near 11,000 msg/s here. paho already knows
how to use a socket that buffers (it asks `pending()`, as for TLS, and skips the `select` wait
while bytes are buffered), so we hand it one: a thin wrapper that fills a buffer with one large
`recv` and serves paho's small reads from it. `loop_read` then keeps reading while whole packets
are buffered.

Two more shortcuts for the one hot packet, a QoS 1 PUBLISH acknowledged by hand: it is decoded
without building an MQTT 5 `Properties` object when it carries none (a publish with properties
takes paho's own path), and goes straight to `on_message` (topic-filtered callbacks are not
used here). `ack_many` queues the PUBACKs of a whole batch as one write instead of one each.
Everything else, connects, reconnects, keepalive, other packets, is paho's own. These lean on
paho's internals: the tests pin them, and pyproject pins paho-mqtt below 3.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

_PUBACK = struct.Struct("!BBH")
_PUBACK_CMD = 0x40

_CHUNK = 256 * 1024
_PACKETS_PER_READ = 5000


class _BufferedSocket:
    """A socket whose recv is served from a buffer refilled by one large recv."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._buf):
            self._buf = self._sock.recv(_CHUNK)  # raises BlockingIOError when nothing is there
            self._pos = 0
            if not self._buf:
                return b""  # connection closed
        end = self._pos + bufsize
        data = self._buf[self._pos : end]
        self._pos = min(end, len(self._buf))
        return data

    def pending(self) -> int:
        inner = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        return len(self._buf) - self._pos + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Client(mqtt.Client):
    """paho-mqtt Client with buffered reads; a drop-in for receiving heavy streams."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if isinstance(sock, socket.socket | ssl.SSLSocket):
            return _BufferedSocket(sock)
        return sock  # websockets and others: paho's own handling

    def ack_many(self, mids: Iterable[int]) -> None:
        """Acknowledge several QoS 1 messages with one queued write, in the given order."""
        data = b"".join([_PUBACK.pack(_PUBACK_CMD, 2, mid) for mid in mids])
        if data:
            self._packet_queue(_PUBACK_CMD, data, 0, 1)

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        header: int = self._in_packet["command"]
        packet: bytearray = self._in_packet["packet"]
        if (
            (header & 0x06) != 0x02  # not QoS 1
            or not self._manual_ack
            or self._protocol != MQTTProtocolVersion.MQTTv5
            or self.on_message is None
        ):
            return super()._handle_publish()
        slen = (packet[0] << 8) | packet[1]
        pos = 2 + slen
        if slen == 0 or len(packet) < pos + 3 or packet[pos + 2] != 0:
            return super()._handle_publish()  # empty topic, or properties present: paho's path
        message = mqtt.MQTTMessage(
            mid=(packet[pos] << 8) | packet[pos + 1], topic=bytes(packet[2:pos])
        )
        message.qos = 1
        message.dup = bool(header & 0x08)
        message.retain = bool(header & 0x01)
        message.payload = bytes(packet[pos + 3 :])
        message.timestamp = time.monotonic()
        with self._in_callback_mutex:
            self.on_message(self, self._userdata, message)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        for _ in range(_PACKETS_PER_READ):
            sock = self._sock
            if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, _BufferedSocket):
                break
            if sock.pending() == 0:
                break
            rc = super().loop_read(max_packets)
        return rc
