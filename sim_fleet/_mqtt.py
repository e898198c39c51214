"""A lean, non-blocking MQTT 5 publisher: many pumps' QoS 1 messages over one connection.

Why not paho: one paho client publishes about 9k QoS 1 msg/s here, most of it spent in
per-message bookkeeping (message objects, locks, callbacks). The simulator has to publish tens of
thousands a second from a 2-core machine that also runs the broker, so this client does only what
a publisher needs: CONNECT, PUBLISH at QoS 0/1 written in batches,
PUBACKs parsed in bulk, PINGREQ and DISCONNECT. It owns no thread: the caller's loop writes and
reads (`fileno()` goes into a selector), so one thread can drive many connections.

The packet bytes come from `mqtt5` (a sans-I/O MQTT 5 codec in Rust): this module keeps the
socket, the in-flight window and the bookkeeping of acknowledgements. Three small pieces are
not plain codec calls, each for a reason measured or stated where it is: a PUBLISH is mqtt5's
encoded head (cached) + packet id + payload (`_head`); the common PUBACKs are matched against
the bytes mqtt5 writes for them (`_parse`); an MQTT 3.1.1 CONNACK, which mqtt5 cannot decode,
is recognised by its length (`_read_connack`).

Message ids: MQTT has 65,535 of them per connection, so at most that many publishes can wait for
their PUBACK; `window` is also capped by the broker's Receive Maximum. `publish` refuses when the
window is full (`free == 0`): the caller waits for acknowledgements.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import mqtt5

from pumpfleet.broker import BrokerOptions

__all__ = [
    "MAX_MESSAGE_IDS",
    "ConnectError",
    "Connection",
    "ConnectionLost",
    "Histogram",
]

MAX_MESSAGE_IDS = 65_535
"""Packet ids are 16-bit and never 0: the most QoS 1 publishes one connection can have unacked."""

_FREE = -1.0
_PINGREQ = mqtt5.PingReqPacket().write()
_DISCONNECT = mqtt5.DisconnectPacket().write()  # reason 0: normal disconnection
_QOS1 = mqtt5.QoS.AT_LEAST_ONCE
_SUCCESS = mqtt5.PubAckReasonCode.SUCCESS
_read = mqtt5.read
_Publish = mqtt5.PublishPacket
_PubAck = mqtt5.PubAckPacket
_Disconnect = mqtt5.DisconnectPacket


def _puback_layout() -> tuple[int, int, int, frozenset[int]]:
    """How mqtt5 writes the PUBACKs a broker sends for nearly every publish: (first byte,
    second byte of a success PUBACK, second byte of one with a reason code, those codes).

    Success is (first, second, packet id); with a reason code and no properties (mosquitto's
    0x10 "no matching subscribers" for every topic nobody subscribes to) it is (first, second,
    packet id, code). Checked for every code here, so a codec that writes them otherwise fails
    at import rather than on the wire.
    """
    codes = mqtt5.PubAckReasonCode
    ok = mqtt5.PubAckPacket(0x1234).write()
    why = mqtt5.PubAckPacket(0x1234, reason_code=codes.NO_MATCHING_SUBSCRIBERS).write()
    reasons = frozenset(getattr(codes, n).value for n in dir(codes) if n.isupper()) - {0}
    if ok[2:] != b"\x12\x34" or len(ok) != 4 or why[0] != ok[0] or why[2:4] != b"\x12\x34":
        raise ImportError(f"mqtt5 writes a PUBACK unexpectedly ({ok!r}): update sim_fleet._mqtt")
    for code in reasons:
        written = mqtt5.PubAckPacket(0x1234, reason_code=codes(code)).write()
        if written != why[:4] + bytes([code]):
            raise ImportError(f"mqtt5 writes PUBACK {code:#x} unexpectedly: update sim_fleet._mqtt")
    return ok[0], ok[1], why[1], reasons


_ACK0, _ACK_OK, _ACK_WHY, _ACK_REASONS = _puback_layout()
_MAX_HEADS = 100_000
"""PUBLISH heads cached per connection: one per (topic, QoS, retain), for the last length."""


class ConnectError(Exception):
    """The broker cannot be reached or refused us; the message says which and how to fix it."""


class ConnectionLost(Exception):
    """An established connection ended; unacknowledged publishes may not have arrived."""


AckHandler = Callable[[Any, int, float], None]
"""`on_ack(token, reason_code, latency_s)`: reason_code >= 0x80 means the broker refused it."""


class Connection:
    """One MQTT 5 connection that only publishes. Single-threaded, non-blocking after connect.

    Hot path: `publish(topic, payload, ...)` appends the packet (encoded by mqtt5) to an
    output buffer; `write()` hands the buffer to the socket; `read()` parses whatever PUBACKs have
    arrived, counts them, times them into `latency` and calls `on_ack` for those published with a
    token.
    """

    def __init__(
        self,
        broker: BrokerOptions,
        client_id: str,
        *,
        max_inflight: int = MAX_MESSAGE_IDS,
        connect_timeout_s: float = 10.0,
        on_ack: AckHandler | None = None,
        latency: Histogram | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not 1 <= max_inflight <= MAX_MESSAGE_IDS:
            raise ValueError(f"max_inflight must be in 1..{MAX_MESSAGE_IDS}")
        self.broker = broker
        self.client_id = client_id
        self.max_inflight = max_inflight
        self.connect_timeout_s = connect_timeout_s
        self.on_ack = on_ack
        self.latency = latency
        self._tls = tls if tls is not None else (broker.tls_context() if broker.tls else None)
        self.keepalive_s = broker.keepalive_s
        self.window = max_inflight
        """Most publishes awaiting a PUBACK: ours, capped by the broker's Receive Maximum."""
        self.inflight = 0
        self.published = 0
        self.acked = 0
        self.refused = 0
        """PUBACKs with an error reason code (>= 0x80): the broker did not take the message."""
        self._sock: socket.socket | None = None
        self._sent_at = [_FREE] * (MAX_MESSAGE_IDS + 1)
        self._tokens: dict[int, Any] = {}
        self._next_mid = 1
        self._out = bytearray()
        self._in = bytearray()
        self._last_write = 0.0
        self._last_read = 0.0
        self._ping_sent = False
        self._heads: dict[tuple[str, int, bool], tuple[int, bytes]] = {}

    # connecting ---------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open TCP (and TLS), send CONNECT, wait for CONNACK; blocking, bounded by the timeout."""
        host, port = self.broker.host, self.broker.port
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to the MQTT broker at {self.broker.url} ({exc.strerror or exc}); "
                "is it running? start one with `pumpfleet stack up` or set PUMPFLEET_MQTT__URL"
            ) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=host)
            sock.sendall(self._connect_packet())
            self._read_connack(sock)
        except ConnectError:
            sock.close()
            raise
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ConnectError(
                f"MQTT broker at {self.broker.url} did not complete the connection ({exc}); "
                "check the URL, TLS settings (PUMPFLEET_MQTT__TLS_*) and that it speaks MQTT 5"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        now = time.monotonic()
        self._last_write = self._last_read = now
        self._ping_sent = False

    def _connect_packet(self) -> bytes:
        # Clean start, no session: after a reconnect the caller publishes what was not
        # acknowledged again, under new message ids.
        username = self.broker.username
        password = self.broker.password
        return mqtt5.ConnectPacket(
            self.client_id,
            username=username,
            password=password.encode() if username is not None and password is not None else None,
            clean_start=True,
            keep_alive=self.keepalive_s,
        ).write()

    def _read_connack(self, sock: socket.socket) -> None:
        data = bytearray()
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            # mqtt5 decodes MQTT 5 only: a 3.1.1 CONNACK (type 2, exactly two bytes, no
            # properties) is "Missing property length" to it, so that one case is checked here.
            if data[:2] == b"\x20\x02":
                raise ConnectError(f"MQTT broker at {self.broker.url} does not accept MQTT 5")
            try:
                with memoryview(data) as view:
                    packet, size = _read(view)
                break
            except IndexError:  # incomplete: read more
                pass
            except ValueError as exc:
                raise ConnectError(
                    f"MQTT broker at {self.broker.url} sent a CONNACK we cannot read ({exc}); "
                    "check that it speaks MQTT 5"
                ) from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectError(f"no CONNACK from {self.broker.url} within the timeout")
            sock.settimeout(left)
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectError(
                    f"MQTT broker at {self.broker.url} closed the connection during CONNECT; "
                    "check the credentials (PUMPFLEET_MQTT__USERNAME/PASSWORD) and that it "
                    "speaks MQTT 5"
                )
            data += chunk
        if not isinstance(packet, mqtt5.ConnAckPacket):
            raise ConnectError(
                f"expected CONNACK from {self.broker.url}, got {type(packet).__name__}"
            )
        reason = packet.reason_code.value
        if reason >= 0x80:
            hint = ""
            if reason in (0x86, 0x87):
                hint = "; check PUMPFLEET_MQTT__USERNAME / PUMPFLEET_MQTT__PASSWORD and the ACL"
            raise ConnectError(
                f"MQTT broker at {self.broker.url} refused us: "
                f"{_reason_text(packet.reason_code)}{hint}"
            )
        # Receive Maximum is 65,535 when the broker does not say.
        self.window = min(self.max_inflight, packet.receive_max)
        if packet.server_keep_alive is not None:
            self.keepalive_s = packet.server_keep_alive
        del data[:size]
        self._in = data  # anything after the CONNACK

    # publishing ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def free(self) -> int:
        """Publishes that can be handed over now without exceeding the window."""
        return self.window - self.inflight

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        token: Any = None,
        now: float | None = None,
    ) -> int:
        """Queue one PUBLISH; returns its message id (0 for QoS 0). Call `write()` to send.

        The hot path of the load generator. The bytes before the packet id are mqtt5's (see
        `_head`, cached); the packet id and the payload are appended to them here.
        """
        if self._sock is None:
            raise ConnectionLost("not connected")
        length = len(payload)
        cached = self._heads.get((topic, qos, retain))
        if cached is not None and cached[0] == length:
            head = cached[1]
        else:  # a topic the codec refuses (wildcards, too long) raises ValueError here
            head = self._head(topic, length, qos, retain)
        if qos == 0:
            self._out += head
            self._out += payload
            self.published += 1
            return 0
        if self.inflight >= self.window:
            raise RuntimeError("in-flight window full: wait for acknowledgements (see `free`)")
        sent_at = self._sent_at
        mid = self._next_mid
        while sent_at[mid] != _FREE:
            mid = mid % MAX_MESSAGE_IDS + 1
        out = self._out
        out += head
        out += mid.to_bytes(2, "big")
        out += b"\x00"  # no properties (checked in `_head`)
        out += payload
        self._next_mid = mid % MAX_MESSAGE_IDS + 1
        sent_at[mid] = time.monotonic() if now is None else now
        if token is not None:
            self._tokens[mid] = token
        self.inflight += 1
        self.published += 1
        return mid

    def _head(self, topic: str, length: int, qos: int, retain: bool) -> bytes:
        """The bytes of a PUBLISH before its packet id (QoS 1) or payload (QoS 0), from mqtt5.

        Why not `mqtt5.PublishPacket(...).write()` per message: a new packet object each time
        made `publish` 0.7-0.8x as fast as the hand-written encoder it replaced, and the head
        + id 1.0-1.15x (benchmarks/mqtt_codec_bench.py). A packet cannot be reused (mqtt5's
        attributes are read-only), so one is encoded with packet id 0xFFFF and a zero payload
        of the same length, and the caller appends the real id and payload where they were.
        Cached per (topic, QoS, retain) for the last payload length: a load pump's length
        changes rarely (its reservoir passing 10 mL), and memory stays one entry per topic.
        """
        if qos == 0:
            packet = _Publish(topic, bytes(length), retain=retain).write()
            head = packet[: len(packet) - length]
            ok = head.endswith(b"\x00")  # empty properties
        else:
            packet = _Publish(
                topic, bytes(length), qos=_QOS1, retain=retain, packet_id=0xFFFF
            ).write()
            head = packet[: len(packet) - length - 3]
            ok = packet[len(head) : len(head) + 3] == b"\xff\xff\x00"  # the id, no properties
        if not ok:
            raise RuntimeError(f"mqtt5 laid out a PUBLISH unexpectedly: {packet[:40]!r}")
        if len(self._heads) >= _MAX_HEADS:
            self._heads.clear()
        self._heads[topic, qos, retain] = (length, head)
        return head

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def write(self) -> int:
        """Hand buffered packets to the socket (as many bytes as it takes now); bytes written."""
        sock = self._require()
        if not self._out:
            return 0
        try:
            n = sock.send(self._out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except OSError as exc:
            raise self._lost(f"write failed: {exc}") from None
        del self._out[:n]
        self._last_write = time.monotonic()
        return n

    def flush(self, timeout_s: float) -> None:
        """Write everything buffered, waiting for the socket up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._out:
            if not self.write():
                if time.monotonic() > deadline:
                    raise self._lost("broker not reading: write timed out")
                time.sleep(0.001)

    # acknowledgements ---------------------------------------------------------------------------

    def read(self, now: float | None = None) -> int:
        """Read what has arrived and handle it; returns the number of PUBACKs handled."""
        sock = self._require()
        got = False
        while True:
            try:
                chunk = sock.recv(262_144)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                raise self._lost(f"read failed: {exc}") from None
            if not chunk:
                raise self._lost("broker closed the connection")
            self._in += chunk
            got = True
            if len(chunk) < 262_144 and not (self._tls and sock.pending()):  # type: ignore[attr-defined]
                break
        if not got and not self._in:
            return 0
        now = time.monotonic() if now is None else now
        self._last_read = now
        self._ping_sent = False
        return self._parse(now)

    def _parse(self, now: float) -> int:
        """Handle the whole packets in the input buffer; returns the number of PUBACKs.

        The PUBACKs a broker sends for nearly every publish (success, or a bare reason code
        such as mosquitto's 0x10 when nobody subscribes) are recognised by the bytes mqtt5
        writes for them (`_puback_layout`) without a call into the codec: `mqtt5.read` for
        every PUBACK (a memoryview slice, a packet object, its reason code object) made this
        0.6-0.75x as fast as the inline parser it replaced, and the match 1.0-1.4x
        (benchmarks/mqtt_codec_bench.py). Everything else (properties, PINGRESP, DISCONNECT,
        malformed bytes) is decoded by `mqtt5.read`.
        """
        buf = self._in
        pos = 0
        acked = refused = 0
        sent_at = self._sent_at
        latency = self.latency
        on_ack = self.on_ack
        tokens = self._tokens
        ack0, ack_ok, ack_why, ack_reasons, free = _ACK0, _ACK_OK, _ACK_WHY, _ACK_REASONS, _FREE
        problem = ""
        with memoryview(buf) as view:
            n = len(view)
            while pos < n:
                size = 0
                if buf[pos] == ack0 and pos + 4 <= n:
                    second = buf[pos + 1]
                    if second == ack_ok:
                        size, reason = 4, 0
                    elif second == ack_why and pos + 5 <= n and buf[pos + 4] in ack_reasons:
                        size, reason = 5, buf[pos + 4]
                if size:
                    mid = (buf[pos + 2] << 8) | buf[pos + 3]
                    pos += size
                else:
                    try:
                        packet, size = _read(view[pos:])
                    except IndexError:
                        break  # incomplete: the rest comes with the next read
                    except ValueError as exc:
                        problem = f"malformed packet from the broker ({exc})"
                        break
                    pos += size
                    if type(packet) is _Disconnect:  # the broker disconnects us
                        problem = f"broker sent DISCONNECT ({_reason_text(packet.reason_code)})"
                        break
                    if type(packet) is not _PubAck:
                        continue  # PINGRESP needs nothing; we never subscribe
                    mid = packet.packet_id
                    code = packet.reason_code
                    reason = 0 if code is _SUCCESS else code.value
                t = sent_at[mid]
                if t == free:
                    continue  # not ours (a stale id after a reconnect)
                sent_at[mid] = free
                if reason >= 0x80:
                    refused += 1
                else:
                    acked += 1
                if latency is not None:
                    latency.add(now - t)
                token = tokens.pop(mid, None) if tokens else None
                if on_ack is not None:
                    on_ack(token, reason, now - t)
        del buf[:pos]
        self.acked += acked
        self.refused += refused
        self.inflight -= acked + refused
        if problem:
            raise self._lost(problem)
        return acked + refused

    def tick(self, now: float | None = None) -> None:
        """Keep the connection alive: PINGREQ when idle; give up on a broker that went silent."""
        self._require()
        if not self.keepalive_s:
            return
        now = time.monotonic() if now is None else now
        if self._ping_sent and now - self._last_read > 1.5 * self.keepalive_s:
            raise self._lost(f"no reply from the broker within {1.5 * self.keepalive_s:g}s")
        if not self._ping_sent and now - max(self._last_write, self._last_read) > (
            self.keepalive_s / 2
        ):
            self._out += _PINGREQ
            self._ping_sent = True
            self._last_read = now  # the reply is due within the keepalive from now

    # ending -------------------------------------------------------------------------------------

    def unacked(self) -> list[Any]:
        """Tokens of publishes still waiting for a PUBACK, in publish order."""
        return list(self._tokens.values())  # a dict keeps insertion order

    def close(self, *, clean: bool = True, timeout_s: float = 5.0) -> None:
        """Send DISCONNECT (if `clean`) and close the socket."""
        sock = self._sock
        if sock is None:
            return
        if clean:
            try:
                self._out += _DISCONNECT
                self.flush(timeout_s)
            except ConnectionLost:
                pass
        self._drop()

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionLost("not connected")
        return self._sock

    def _lost(self, why: str) -> ConnectionLost:
        self._drop()
        return ConnectionLost(f"{self.client_id}: {why}")

    def _drop(self) -> None:
        """Forget the socket and the in-flight ids (their tokens stay for `unacked`)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._out.clear()
        self._in.clear()

    def reset(self) -> list[Any]:
        """After a lost connection: the unacked tokens (oldest first), and a clean slate."""
        tokens = self.unacked()
        self._tokens.clear()
        self._sent_at = [_FREE] * (MAX_MESSAGE_IDS + 1)
        self.inflight = 0
        self._next_mid = 1
        return tokens

    def fileno(self) -> int:
        return self._require().fileno()


# Latency histogram ----------------------------------------------------------------------------

_BUCKET_RATIO = 1.02
_K = 1.0 / math.log(_BUCKET_RATIO)
_MIN_S = 1e-6
_OFFSET = -math.floor(_K * math.log(_MIN_S))
_BUCKETS = _OFFSET + int(_K * math.log(1e4)) + 2


class Histogram:
    """Latencies in buckets 2 % wide (1 us to 10^4 s): cheap to add, exact count, mergeable
    across processes, percentiles within 2 %."""

    __slots__ = ("counts", "max_s", "n", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.n = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        i = math.floor(_K * math.log(seconds)) + _OFFSET if seconds > _MIN_S else 0
        self.counts[min(max(i, 0), _BUCKETS - 1)] += 1
        self.n += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.n += other.n
        self.total_s += other.total_s
        self.max_s = max(self.max_s, other.max_s)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) in seconds (a bucket's upper edge), or None if empty."""
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return min(self.max_s, math.exp((i + 1 - _OFFSET) / _K))
        return self.max_s

    @property
    def mean_s(self) -> float | None:
        return self.total_s / self.n if self.n else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (sparse), for sending between processes."""
        counts = {str(i): c for i, c in enumerate(self.counts) if c}
        return {"counts": counts, "n": self.n, "total_s": self.total_s, "max_s": self.max_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        for i, c in data["counts"].items():
            h.counts[int(i)] = int(c)
        h.n, h.total_s, h.max_s = int(data["n"]), float(data["total_s"]), float(data["max_s"])
        return h


# Wire helpers ---------------------------------------------------------------------------------


def _reason_text(code: mqtt5.ConnAckReasonCode | mqtt5.DisconnectReasonCode) -> str:
    """`bad user name or password` for 0x86, from the codec's name for the reason code.

    (The stub says IntEnum; at run time mqtt5's codes are Rust enums with `name` and `value`,
    comparable with `==` and `is` but not ordered: compare `.value`.)
    """
    return code.name.lower().replace("_", " ")
