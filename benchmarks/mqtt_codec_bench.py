"""Micro-benchmark: the MQTT bytes of the simulator's publisher, mqtt5 against the hand-written
encoder it replaced, side by side in one run.

- The codec alone, on a QoS 1 PUBLISH with a 600-byte telemetry payload and its PUBACK: the
  replaced hand-written encoder (header cache + byte joins); `mqtt5.PublishPacket(...).write()`
  per packet; mqtt5's head encoded once with the packet id appended (what `Connection` does);
  `mqtt5.read()` of the PUBLISH and of the PUBACK; and a PUBACK matched against the bytes mqtt5
  writes for one (what `Connection` does for success PUBACKs).
- The publisher (`sim_fleet._mqtt.Connection`), old and new, connected over loopback to a stub
  broker: QoS 1 publishes queued per second (encoding, message id and send-time bookkeeping),
  and PUBACKs handled per second by `read()` (decoding, matching, latency histogram), both
  success PUBACKs and mosquitto's 0x10 (no matching subscribers: every topic nobody subscribes
  to), in rounds of 8,192 with the load generator's own payloads, old and new alternating.

Each figure is the best of `--rounds`: on a machine shared with other work, the fastest round is
the one least disturbed, and the ratio of the bests is the steadiest new / old figure.

The old code is `sim_fleet/mqtt.py` (today `_mqtt.py`) at `--old-rev` (default: the last commit
with the hand-written encoder), loaded from `git show` into a temporary module.

    .venv/bin/python benchmarks/mqtt_codec_bench.py [--rounds 15] [--old-rev REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import mqtt5

from pumpfleet.broker import BrokerOptions
from sim_fleet import _mqtt as new_mqtt
from sim_fleet._load import LoadConfig, render, templates

_ROOT = Path(__file__).resolve().parent.parent
_BATCH = 8192
_CONNACK = mqtt5.ConnAckPacket().write()


def old_module(rev: str) -> ModuleType:
    """`sim_fleet/mqtt.py` as it was at `rev` (today `_mqtt.py`), imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:sim_fleet/mqtt.py"],
        cwd=_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="old-sim-mqtt-") as tmp:
        path = Path(tmp) / "old_sim_mqtt.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("old_sim_mqtt", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def rate(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Calls of `fn` per second, over about `seconds`."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(1000):
            fn()
        n += 1000
    return n / elapsed


# The codec alone ------------------------------------------------------------------------------


def codec(old: ModuleType, topic: str, payload: bytes, rounds: int) -> None:
    qos1 = mqtt5.QoS.AT_LEAST_ONCE
    mid = 4321
    publish = mqtt5.PublishPacket(topic, payload, qos=qos1, packet_id=mid).write()
    puback = mqtt5.PubAckPacket(mid).write()
    header = old._string(topic)
    n = len(payload)
    # What Connection.publish appends: mqtt5's bytes before the packet id, encoded once
    head = mqtt5.PublishPacket(topic, bytes(n), qos=qos1, packet_id=0xFFFF).write()[: -n - 3]
    ack0, ack1 = mqtt5.PubAckPacket(1).write()[:2]

    def old_encode() -> bytes:
        return b"".join(
            (
                old._header(0x32, len(header) + 3 + n),
                header,
                mid.to_bytes(2, "big"),
                b"\x00",
                payload,
            )
        )

    def per_packet() -> bytes:
        return mqtt5.PublishPacket(topic, payload, qos=qos1, packet_id=mid).write()

    def cached_head() -> bytes:
        return b"".join((head, mid.to_bytes(2, "big"), b"\x00", payload))

    view, ack_view = memoryview(publish), memoryview(puback)

    def read_puback() -> tuple[int, int]:
        packet, _ = mqtt5.read(ack_view)
        assert isinstance(packet, mqtt5.PubAckPacket)
        return packet.packet_id, packet.reason_code.value

    def match_puback() -> tuple[int, int]:
        b = puback
        if b[0] == ack0 and len(b) >= 4 and b[1] == ack1:
            return (b[2] << 8) | b[3], 0
        raise AssertionError("not a success PUBACK")

    assert old_encode() == per_packet() == cached_head() == publish, "the same bytes"
    assert read_puback() == match_puback() == (mid, 0)
    cases: dict[str, Callable[[], object]] = {
        "PUBLISH encode, old hand-written": old_encode,
        "PUBLISH encode, mqtt5 per packet": per_packet,
        "PUBLISH encode, mqtt5 head + id (used)": cached_head,
        "PUBLISH decode, mqtt5.read": lambda: mqtt5.read(view),
        "PUBACK decode, mqtt5.read + fields": read_puback,
        "PUBACK matched to mqtt5's bytes (used)": match_puback,
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            results[name].append(rate(fn, 0.5))
    print(f"codec alone: QoS 1 PUBLISH, {n}-byte payload ({len(publish)} B packet), PUBACK:")
    for name, rates in results.items():
        r = max(rates)
        print(f"  {name:<40} {r:>11,.0f} /s {1e6 / r:>6.2f} us  (best of {rounds})")


# The publisher, old and new -------------------------------------------------------------------


class StubBroker:
    """Answers CONNECT with a CONNACK, swallows whatever the client sends, acks on request."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.peer: socket.socket | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        peer, _ = self.server.accept()
        peer.recv(65536)  # the CONNECT
        peer.sendall(_CONNACK)
        self.peer = peer
        self._ready.set()
        while True:
            try:
                if not peer.recv(1 << 20):
                    return
            except OSError:
                return

    def ack(self, mids: list[int], reason: mqtt5.PubAckReasonCode) -> None:
        self._ready.wait(10)
        assert self.peer is not None
        self.peer.sendall(b"".join(mqtt5.PubAckPacket(m, reason_code=reason).write() for m in mids))

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.server.close()


def publisher_round(
    module: ModuleType,
    conn: Any,
    broker: StubBroker,
    topics: list[str],
    payloads: list[bytes],
    reason: mqtt5.PubAckReasonCode,
) -> tuple[float, float]:
    """(publishes queued per second, PUBACKs handled per second) for one batch."""
    now = time.monotonic()
    items = list(zip(topics, payloads, strict=True))
    if module is new_mqtt:
        publish = conn.publish
        start = time.perf_counter()
        mids = [publish(topic, payload, qos=1, now=now) for topic, payload in items]
    else:  # the old hot path: the topic encoded once per pump, then `publish_encoded`
        headers = {topic: conn.topic_header(topic) for topic in topics}
        publish = conn.publish_encoded
        start = time.perf_counter()
        mids = [publish(headers[topic], payload, qos=1, now=now) for topic, payload in items]
    encode_s = time.perf_counter() - start
    conn.flush(10)
    broker.ack(mids, reason)
    start = time.perf_counter()
    deadline = start + 10
    while conn.inflight and time.perf_counter() < deadline:
        conn.read()
    decode_s = time.perf_counter() - start
    assert conn.inflight == 0, "every PUBACK handled"
    return len(mids) / encode_s, len(mids) / decode_s


def publishers(old: ModuleType, rounds: int) -> None:
    config = LoadConfig(pumps=1000, id_prefix="LOAD")
    shard = templates(config, range(config.pumps))
    t0 = int(time.time()) - (_BATCH // len(shard) + 2) * 600
    topics = [shard[i % len(shard)].topic for i in range(_BATCH)]
    payloads = [
        render(shard[i % len(shard)], i // len(shard), 1_700_000_000_000_000, t0, 600)
        for i in range(_BATCH)
    ]
    size = statistics.mean(len(p) for p in payloads)
    variants = {"old (hand-written)": old, "new (mqtt5)": new_mqtt}
    setups = {}
    for name, module in variants.items():
        broker = StubBroker()
        conn = module.Connection(
            BrokerOptions(host="127.0.0.1", port=broker.port),
            f"bench-{name[:3]}",
            latency=module.Histogram(),
        )
        conn.connect()
        setups[name] = (module, conn, broker)
    # success, and what mosquitto answers for a topic nobody subscribes to (every benchmark
    # without an ingester)
    reasons = (mqtt5.PubAckReasonCode.SUCCESS, mqtt5.PubAckReasonCode.NO_MATCHING_SUBSCRIBERS)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {
        (name, r.value): [] for name in variants for r in reasons
    }
    for _ in range(rounds):
        for name, (module, conn, broker) in setups.items():
            for r in reasons:
                got = publisher_round(module, conn, broker, topics, payloads, r)
                results[name, r.value].append(got)
    print()
    print(
        f"publisher (sim_fleet._mqtt.Connection), QoS 1, {len(shard)} pumps' load payloads "
        f"({size:.0f} B on average), rounds of {_BATCH:,}, best of {rounds}:"
    )
    print(
        f"  {'':<20} {'publish/s':>12} {'us each':>8} {'PUBACK/s':>12} {'us each':>8}"
        f" {'PUBACK 0x10/s':>14} {'us each':>8}"
    )
    best = {}
    for name in variants:
        enc = max(p[0] for r in reasons for p in results[name, r.value])
        ok, why = (max(p[1] for p in results[name, r.value]) for r in reasons)
        best[name] = (enc, ok, why)
        print(
            f"  {name:<20} {enc:>12,.0f} {1e6 / enc:>8.2f} {ok:>12,.0f} {1e6 / ok:>8.2f}"
            f" {why:>14,.0f} {1e6 / why:>8.2f}"
        )
    (old_enc, old_ok, old_why), (new_enc, new_ok, new_why) = best.values()
    print(
        f"  new / old: publish {new_enc / old_enc:.2f}x, PUBACK {new_ok / old_ok:.2f}x, "
        f"PUBACK 0x10 {new_why / old_why:.2f}x"
    )
    for _, conn, broker in setups.values():
        conn.close()
        broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds per case (15)")
    parser.add_argument(
        "--old-rev",
        default="98aa747",
        help="git revision whose sim_fleet/mqtt.py is the old code (98aa747)",
    )
    args = parser.parse_args()
    old = old_module(args.old_rev)
    config = LoadConfig(pumps=1, id_prefix="LOAD")
    (template,) = templates(config, range(1))
    payload = render(template, 0, 1_700_000_000_000_000, int(time.time()) - 600, 600)
    payload = payload.ljust(600)  # JSON allows trailing whitespace: a 600-byte telemetry
    codec(old, template.topic, payload, args.rounds)
    publishers(old, args.rounds)


if __name__ == "__main__":
    main()
