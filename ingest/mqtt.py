"""paho-mqtt's Client, tuned for one job: receiving a heavy stream of QoS 1 messages that the
application acknowledges by hand, in batches.

Stock paho reads a packet with several small `recv` calls (the type byte, the length byte by
byte, then the body), handles one packet per `select`, builds an MQTT 5 `Properties` object for
every PUBLISH and sends each PUBACK as its own write. Draining a backlog that caps a Python
subscriber near 13,000-17,000 msg/s on the benchmark machine. This subclass:

- gives paho a socket that reads in large chunks (paho already honours `pending()`, as for
  TLS, and skips the `select` wait while bytes are buffered);
- takes whole packets straight from that buffer; a QoS 1 PUBLISH without properties goes to
  `on_raw_message(topic, payload, mid)` with no intermediate objects, every other packet (and a
  packet that is not yet complete) goes through paho's own code;
- queues the PUBACKs of a batch as one write (`ack_many`).

Connects, reconnects, keepalive, subscriptions and every other packet are paho's. This leans on
paho's internals (`_sock`, `_in_packet`, `_packet_read`, `_packet_queue`): tests pin the
behaviour and pyproject.toml keeps paho-mqtt below 3.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

_PUBACK = struct.Struct("!BBH")
_PUBACK_CMD = 0x40
_PUBLISH_QOS1 = 0x32  # PUBLISH, QoS 1, no DUP/RETAIN (masked below)
_CHUNK = 256 * 1024
_PACKETS_PER_READ = 5000

RawMessageCallback = Callable[[str, bytes, int], None]
"""on_raw_message(topic, payload, mid) for a QoS 1 PUBLISH; acknowledge with ack_many."""


def _in_packet(command: int = 0, body: bytes = b"") -> Any:
    """paho's record of the packet being read (a whole one when `body` is given)."""
    return {
        "command": command,
        "have_remaining": 1 if command else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": bytearray(body),
        "to_process": 0,
        "pos": 0,
    }


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

    def frame(self) -> tuple[int, bytes] | None:
        """The next whole packet (fixed-header byte, body) if it is buffered, else None."""
        buf, pos = self._buf, self._pos
        end = len(buf)
        if end - pos < 2:
            return None
        length, mult, i = 0, 1, pos + 1
        while True:
            if i >= end or i - pos > 4:
                return None  # length not all here yet (or malformed: paho's path reports it)
            byte = buf[i]
            length += (byte & 0x7F) * mult
            i += 1
            if not byte & 0x80:
                break
            mult *= 128
        if end - i < length:
            return None
        self._pos = i + length
        return buf[pos], buf[i : i + length]

    def pending(self) -> int:
        inner = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        return len(self._buf) - self._pos + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Client(mqtt.Client):
    """paho-mqtt Client with buffered reads, a raw QoS 1 fast path and batched acks."""

    on_raw_message: RawMessageCallback | None = None

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

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        sock = self._sock
        if type(sock) is not _BufferedSocket or self._in_packet["command"] != 0:
            return super()._packet_read()  # paho is mid-packet, or not our socket
        frame = sock.frame()
        if frame is None:
            return super()._packet_read()
        header, body = frame
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()
        if (header & 0xF6) == _PUBLISH_QOS1 and self._fast_publish(body):
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        # Any other packet: hand paho the whole packet as if it had read it itself.
        self._in_packet = _in_packet(header, body)
        try:
            rc = self._packet_handle()
        except MalformedPacket:
            rc = mqtt.MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = _in_packet()
        return rc

    def _fast_publish(self, body: bytes) -> bool:
        callback = self.on_raw_message
        if (
            callback is None
            or not self._manual_ack
            or self._protocol != MQTTProtocolVersion.MQTTv5
            or len(body) < 5
        ):
            return False
        pos = 2 + ((body[0] << 8) | body[1])
        if pos == 2 or len(body) < pos + 3 or body[pos + 2] != 0:
            return False  # empty topic, or properties present: paho's path
        try:
            topic = body[2:pos].decode()
        except UnicodeDecodeError:
            return False  # paho's path hands it to on_message, which can dead-letter it
        with self._in_callback_mutex:
            callback(topic, body[pos + 3 :], (body[pos] << 8) | body[pos + 1])
        return True

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
