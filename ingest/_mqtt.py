"""paho-mqtt's Client, tuned for one job: receiving a heavy stream of QoS 1 messages that the
application acknowledges by hand, in batches.

Stock paho reads a packet with several small `recv` calls (the type byte, the length byte by
byte, then the body), handles one packet per `select`, builds an MQTT 5 `Properties` object for
every PUBLISH and sends each PUBACK as its own write. Draining a backlog that caps a Python
subscriber near 13,000-17,000 msg/s on the benchmark machine. This subclass:

- gives paho a socket that reads in large chunks (paho already honours `pending()`, as for
  TLS, and skips the `select` wait while bytes are buffered);
- frames the buffered bytes with `mqtt5` (a sans-I/O MQTT 5 codec in Rust): a QoS 1 PUBLISH
  goes to `on_raw_message(topic, payload, mid)` with no paho objects; any other packet is left
  in the buffer for paho to read and handle itself, as if straight from the network;
- queues the PUBACKs of a batch, written by mqtt5, as one write (`ack_many`).

Connects, reconnects, keepalive, subscriptions and every other packet are paho's. Two of paho's
private names remain, each because paho has no public way to do it (see `_create_socket` and
`ack_many`); pyproject.toml keeps paho-mqtt below 3 and tests pin the behaviour.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Literal

import mqtt5
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["Client", "RawMessageCallback"]

_read = mqtt5.read
_Publish = mqtt5.PublishPacket
_PubAck = mqtt5.PubAckPacket
_QOS1 = mqtt5.QoS.AT_LEAST_ONCE
_CHUNK = 256 * 1024
_PACKETS_PER_READ = 5000
"""Packets handled per `loop_read` before paho's loop gets to write (acks) and keep alive."""
_CLOSED = EOFError("connection closed by the broker")

RawMessageCallback = Callable[[str, bytes, int], None]
"""on_raw_message(topic, payload, mid) for a QoS 1 PUBLISH; acknowledge with ack_many.

Called from paho's network thread, like on_message, but outside paho's callback lock: queue the
mid and acknowledge it later (ack_many), do not call the client from here.
"""


class _BufferedSocket:
    """paho's socket with a read buffer in front, refilled by one large recv.

    Two modes. `raw` (MQTT 5 with a raw callback): `Client.loop_read` frames the buffer with
    mqtt5 and takes the QoS 1 PUBLISHes; paho's `recv` sees only the bytes of a packet handed
    to it (`_stop`), so paho only ever reads whole packets and never stops in the middle of
    one. Otherwise paho reads everything, in its usual small recvs, served from the buffer.
    """

    __slots__ = ("_buf", "_failure", "_pos", "_ready", "_sock", "_stop", "raw")

    def __init__(self, sock: socket.socket | ssl.SSLSocket, *, raw: bool) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._stop = 0
        """paho may read the buffer up to here."""
        self._ready = False
        """A whole packet may be buffered: `pending()` keeps paho's loop out of `select`."""
        self._failure: BaseException | None = None
        """What the socket said when `fill` read it, for paho's next recv."""
        self.raw = raw

    # paho's side --------------------------------------------------------------------------------

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= self._stop:
            failure = self._failure
            if failure is _CLOSED:
                return b""  # stays closed: paho reads b"" as the connection lost
            if failure is not None:
                self._failure = None  # raised once, as the socket did
                raise failure
            if self.raw:
                raise BlockingIOError  # the next packet is for loop_read to frame
            del self._buf[: self._pos]
            self._pos = 0
            chunk = self._sock.recv(_CHUNK)  # BlockingIOError / SSLWant*: paho handles them
            if not chunk:
                return b""
            self._buf += chunk
            self._stop = len(self._buf)
        end = min(self._pos + bufsize, self._stop)
        data = bytes(self._buf[self._pos : end])
        self._pos = end
        return data

    def pending(self) -> int:
        inner = self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0
        if not self.raw:
            return len(self._buf) - self._pos + inner
        handed = self._stop - self._pos if self._stop > self._pos else 0
        waiting = self._ready or self._failure is not None
        return handed + waiting + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    # loop_read's side ---------------------------------------------------------------------------

    def fill(self) -> bool:
        """One large recv into the buffer; False when nothing came (a failure is kept for paho,
        who reports it on its next recv, before any partial packet)."""
        if self._failure is not None:
            return False
        try:
            chunk = self._sock.recv(_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError as exc:  # SSLWantWriteError included: paho's recv handles it
            chunk, self._failure = b"", exc
        if not chunk:
            self._failure = self._failure or _CLOSED
            self._stop = self._pos  # paho's next recv gets the failure, not a partial packet
            return False
        del self._buf[: self._pos]
        self._pos = self._stop = 0
        self._buf += chunk
        self._ready = True
        return True

    def take(self, callback: RawMessageCallback, budget: int) -> tuple[int, bool]:
        """Whole QoS 1 PUBLISHes at the head of the buffer to `callback`, at most `budget`:
        (how many, whether a packet for paho is now handed to it)."""
        buf, pos, n = self._buf, self._pos, 0
        try:
            with memoryview(buf) as view:
                end = len(view)
                while pos < end and n < budget:
                    try:
                        packet, size = _read(view[pos:])
                    except IndexError:  # not all here yet
                        self._ready = False
                        break
                    except ValueError:  # mqtt5 cannot frame it: paho reads the rest, as ever
                        return n, self._to_paho(pos)
                    except BaseException as exc:
                        # mqtt5 0.8 panics (pyo3's PanicException, a BaseException) on a topic
                        # that is not UTF-8; paho's path hands that one to on_message instead.
                        if type(exc).__name__ != "PanicException":
                            raise
                        return n, self._to_paho(pos)
                    if type(packet) is _Publish and packet.qos == _QOS1:
                        topic = packet.topic
                        if topic:
                            pos += size
                            n += 1
                            callback(topic, packet.payload, packet.packet_id or 0)
                            continue
                    # Any other packet (CONNACK, SUBACK, PINGRESP, DISCONNECT, QoS 0, an
                    # aliased topic): paho reads it from the buffer and handles it.
                    self._stop = pos + size
                    return n, True
                if pos >= end:
                    self._ready = False
        finally:
            self._pos = pos
        return n, False

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def to_paho(self) -> None:
        """paho reads the stream itself from here (the client has no raw callback)."""
        self._to_paho(self._pos)

    def _to_paho(self, pos: int) -> bool:
        """From `pos` on, paho reads everything itself (for the rest of this connection)."""
        self.raw = False
        self._pos, self._stop = pos, len(self._buf)
        return True


class Client(mqtt.Client):
    """paho-mqtt Client with buffered reads, a raw QoS 1 path through mqtt5 and batched acks."""

    on_raw_message: RawMessageCallback | None = None

    def __init__(
        self,
        callback_api_version: CallbackAPIVersion = CallbackAPIVersion.VERSION2,
        client_id: str | None = "",
        clean_session: bool | None = None,
        userdata: Any = None,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
        transport: Literal["tcp", "websockets", "unix"] = "tcp",
        reconnect_on_failure: bool = True,
        manual_ack: bool = False,
    ) -> None:
        super().__init__(
            callback_api_version=callback_api_version,
            client_id=client_id,
            clean_session=clean_session,
            userdata=userdata,
            protocol=protocol,
            transport=transport,
            reconnect_on_failure=reconnect_on_failure,
            manual_ack=manual_ack,
        )
        self._raw_mqtt5 = protocol == mqtt.MQTTv5
        self._raw_manual_ack = manual_ack

    def manual_ack_set(self, on: bool) -> None:
        super().manual_ack_set(on)
        self._raw_manual_ack = on

    def _create_socket(self) -> Any:
        # Private, and the one way in: paho opens (and reopens) its socket here and has no
        # public hook to put a buffer in front of its reader. Without it a packet costs paho
        # three or more recv calls and one select: stock paho drained 13,000-17,000 msg/s here,
        # this buffered socket 40,000+ (benchmarks/ingest_bench.py, "raw" stage).
        sock = super()._create_socket()
        if isinstance(sock, socket.socket | ssl.SSLSocket):
            return _BufferedSocket(sock, raw=self._raw_mqtt5)
        return sock  # websockets and others: paho's own handling

    def ack_many(self, mids: Iterable[int]) -> None:
        """Acknowledge several QoS 1 messages with one queued write, in the given order.

        Through paho's private `_packet_queue`, the one thread-safe way to hand paho's network
        thread bytes to write (this is called from the database side's thread). paho's public
        `ack(mid, 1)` queues one packet per message, wakes the network thread with a byte on its
        socket pair each time, and writes each PUBACK with its own send; measured against this
        in benchmarks/mqtt_codec_bench.py ("ack a batch").
        """
        data = b"".join([_PubAck(mid).write() for mid in mids])
        if data:
            self._packet_queue(0x40, data, 0, 1)  # 0x40: PUBACK; mid 0, no message to track

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        sock = self.socket()
        callback = self.on_raw_message
        if not isinstance(sock, _BufferedSocket):
            return super().loop_read(max_packets)  # not connected, or not our socket
        if sock.raw and (callback is None or not self._raw_manual_ack):
            sock.to_paho()
        if not sock.raw or callback is None:
            return self._paho_read(max_packets)
        budget = _PACKETS_PER_READ
        while budget > 0:
            taken, handed = sock.take(callback, budget)
            budget -= taken
            if handed:  # a packet for paho (or the rest of the stream)
                rc = super().loop_read(1)
                budget -= 1
                if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or self.socket() is None:
                    return rc  # paho lost the connection, or closed it
                if not sock.raw:
                    return self._paho_read(max_packets)  # paho's from here on
                continue
            if budget > 0 and not sock.fill():
                if sock.failed:  # the socket failed or closed: paho's recv says so
                    return super().loop_read(1)
                break
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _paho_read(self, max_packets: int) -> mqtt.MQTTErrorCode:
        """paho reads one packet per loop_read; the buffer may hold thousands."""
        rc = super().loop_read(max_packets)
        for _ in range(_PACKETS_PER_READ):
            sock = self.socket()
            if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or not isinstance(sock, _BufferedSocket):
                break
            if sock.pending() == 0:
                break
            rc = super().loop_read(max_packets)
        return rc
