"""A lean, non-blocking MQTT 5 publisher: many pumps' QoS 1 messages over one connection.

Why not paho: one paho client publishes about 9k QoS 1 msg/s here, most of it spent in
per-message bookkeeping (message objects, locks, callbacks). The simulator has to publish tens of
thousands a second from a 2-core machine that also runs the broker, so this client does only what
a publisher needs: CONNECT, PUBLISH at QoS 0/1 written in batches,
PUBACKs parsed in bulk, PINGREQ and DISCONNECT. It owns no thread: the caller's loop writes and
reads (`fileno()` goes into a selector), so one thread can drive many connections.

Message ids: MQTT has 65,535 of them per connection, so at most that many publishes can wait for
their PUBACK; `window` is also capped by the broker's Receive Maximum. `publish` refuses when the
window is full (`free == 0`): the caller waits for acknowledgements.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

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
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"  # reason 0: normal disconnection
_CONNACK_REASONS = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x9F: "connection rate exceeded",
}


class ConnectError(Exception):
    """The broker cannot be reached or refused us; the message says which and how to fix it."""


class ConnectionLost(Exception):
    """An established connection ended; unacknowledged publishes may not have arrived."""


AckHandler = Callable[[Any, int, float], None]
"""`on_ack(token, reason_code, latency_s)`: reason_code >= 0x80 means the broker refused it."""


class Connection:
    """One MQTT 5 connection that only publishes. Single-threaded, non-blocking after connect.

    Hot path: `publish_encoded(topic_header(topic), payload, ...)` appends the packet to an
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
        self._topics: dict[str, bytes] = {}

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
        flags = 0x02
        props = b""
        body = _string(self.client_id)
        if self.broker.username is not None:
            flags |= 0x80
            body += _string(self.broker.username)
            if self.broker.password is not None:
                flags |= 0x40
                body += _string(self.broker.password)
        variable = (
            b"\x00\x04MQTT\x05"
            + bytes([flags])
            + struct.pack("!H", self.keepalive_s)
            + _varint(len(props))
            + props
        )
        return _packet(0x10, variable + body)

    def _read_connack(self, sock: socket.socket) -> None:
        data = bytearray()
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            parsed = _split_packet(data, 0)
            if parsed is not None:
                break
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
        kind, start, end = parsed
        if kind & 0xF0 != 0x20:
            raise ConnectError(f"expected CONNACK from {self.broker.url}, got packet {kind:#x}")
        if end - start == 2:  # MQTT 3.1.1 CONNACK: the broker refused protocol version 5
            raise ConnectError(f"MQTT broker at {self.broker.url} does not accept MQTT 5")
        reason = data[start + 1]
        if reason >= 0x80:
            what = _CONNACK_REASONS.get(reason, f"reason {reason:#x}")
            hint = ""
            if reason in (0x86, 0x87):
                hint = "; check PUMPFLEET_MQTT__USERNAME / PUMPFLEET_MQTT__PASSWORD and the ACL"
            raise ConnectError(f"MQTT broker at {self.broker.url} refused us: {what}{hint}")
        props = _properties(data, start + 2, end)
        receive_max = props.get(0x21)
        if isinstance(receive_max, int) and receive_max > 0:
            self.window = min(self.max_inflight, receive_max)
        keepalive = props.get(0x13)
        if isinstance(keepalive, int):
            self.keepalive_s = keepalive
        del data[:end]
        self._in = data  # anything after the CONNACK

    # publishing ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def free(self) -> int:
        """Publishes that can be handed over now without exceeding the window."""
        return self.window - self.inflight

    def topic_header(self, topic: str) -> bytes:
        """The topic as it goes on the wire (length + UTF-8), cached per topic."""
        header = self._topics.get(topic)
        if header is None:
            header = self._topics[topic] = _string(topic)
        return header

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
        """Queue one PUBLISH; returns its message id (0 for QoS 0). Call `write()` to send."""
        return self.publish_encoded(
            self.topic_header(topic), payload, qos=qos, retain=retain, token=token, now=now
        )

    def publish_encoded(
        self,
        topic_header: bytes,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        token: Any = None,
        now: float | None = None,
    ) -> int:
        """`publish` with the topic already encoded (see `topic_header`): the hot path."""
        if self._sock is None:
            raise ConnectionLost("not connected")
        self.published += 1
        if qos == 0:
            self._out += _header(0x30 | retain, len(topic_header) + 1 + len(payload))
            self._out += topic_header
            self._out += b"\x00"
            self._out += payload
            return 0
        if self.inflight >= self.window:
            raise RuntimeError("in-flight window full: wait for acknowledgements (see `free`)")
        sent_at = self._sent_at
        mid = self._next_mid
        while sent_at[mid] != _FREE:
            mid = mid % MAX_MESSAGE_IDS + 1
        self._next_mid = mid % MAX_MESSAGE_IDS + 1
        sent_at[mid] = time.monotonic() if now is None else now
        if token is not None:
            self._tokens[mid] = token
        self.inflight += 1
        out = self._out
        out += _header(0x32 | retain, len(topic_header) + 3 + len(payload))
        out += topic_header
        out += mid.to_bytes(2, "big")
        out += b"\x00"  # no properties
        out += payload
        return mid

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
        buf = self._in
        n = len(buf)
        pos = 0
        acks = 0
        sent_at = self._sent_at
        latency = self.latency
        while n - pos >= 2:
            kind = buf[pos]
            if kind == 0x40 and buf[pos + 1] < 0x80:  # PUBACK, one-byte remaining length
                end = pos + 2 + buf[pos + 1]
                if end > n:
                    break
                mid = (buf[pos + 2] << 8) | buf[pos + 3]
                reason = buf[pos + 4] if end - pos > 4 else 0
                pos = end
                t = sent_at[mid]
                if t == _FREE:
                    continue  # not ours (a stale id after a reconnect)
                sent_at[mid] = _FREE
                self.inflight -= 1
                acks += 1
                if reason >= 0x80:
                    self.refused += 1
                else:
                    self.acked += 1
                if latency is not None:
                    latency.add(now - t)
                token = self._tokens.pop(mid, None) if self._tokens else None
                if self.on_ack is not None:
                    self.on_ack(token, reason, now - t)
                continue
            parsed = _split_packet(buf, pos)
            if parsed is None:
                break
            kind, start, end = parsed
            pos = end
            packet = kind & 0xF0
            if packet == 0xE0:  # the broker disconnects us
                reason = buf[start] if end > start else 0
                del buf[:pos]
                raise self._lost(f"broker sent DISCONNECT ({_CONNACK_REASONS.get(reason, reason)})")
            # PINGRESP (0xD0) needs nothing; we never subscribe, so nothing else is expected.
        del buf[:pos]
        return acks

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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_HEADERS: dict[tuple[int, int], bytes] = {}


def _header(first: int, length: int) -> bytes:
    key = (first, length)
    header = _HEADERS.get(key)
    if header is None:
        header = bytes([first]) + _varint(length)
        if len(_HEADERS) < 100_000:
            _HEADERS[key] = header
    return header


def _string(text: str) -> bytes:
    data = text.encode()
    if len(data) > 65_535:
        raise ValueError("MQTT strings are at most 65,535 bytes")
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _split_packet(buf: bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, body start, body end) of the packet at `pos`, or None if incomplete."""
    n = len(buf)
    if n - pos < 2:
        return None
    length, mult, i = 0, 1, pos + 1
    while True:
        if i >= n:
            return None
        byte = buf[i]
        length += (byte & 0x7F) * mult
        i += 1
        if byte < 0x80:
            break
        mult *= 128
        if mult > 128**3:
            raise ConnectionLost("malformed packet from the broker")
    end = i + length
    return (buf[pos], i, end) if end <= n else None


_FIXED = {1: 1, 2: 4, 3: 0, 8: 0, 9: 0, 11: -1, 17: 4, 18: 0, 19: 2, 21: 0, 22: 0, 23: 1}
_FIXED |= {24: 4, 25: 1, 26: 0, 28: 0, 31: 0, 33: 2, 34: 2, 35: 2, 36: 1, 37: 1, 38: 0, 39: 4}
_FIXED |= {40: 1, 41: 1, 42: 1}


def _properties(buf: bytearray, pos: int, end: int) -> dict[int, int | bytes]:
    """MQTT 5 properties at `pos` (length first) as {id: int or bytes}; user properties skipped."""
    if pos >= end:
        return {}
    length, mult = 0, 1
    while True:
        byte = buf[pos]
        pos += 1
        length += (byte & 0x7F) * mult
        if byte < 0x80:
            break
        mult *= 128
    stop = min(end, pos + length)
    out: dict[int, int | bytes] = {}
    while pos < stop:
        ident = buf[pos]
        pos += 1
        size = _FIXED.get(ident)
        if size is None:
            break  # unknown property: stop rather than misread the rest
        if size in (1, 2, 4):
            out[ident] = int.from_bytes(buf[pos : pos + size], "big")
            pos += size
        elif size == -1:  # variable byte integer
            value, mult = 0, 1
            while True:
                byte = buf[pos]
                pos += 1
                value += (byte & 0x7F) * mult
                if byte < 0x80:
                    break
                mult *= 128
            out[ident] = value
        else:  # string or binary; a user property (38) is a pair of them
            for _ in range(2 if ident == 38 else 1):
                size = int.from_bytes(buf[pos : pos + 2], "big")
                if ident != 38:
                    out[ident] = bytes(buf[pos + 2 : pos + 2 + size])
                pos += 2 + size
    return out
