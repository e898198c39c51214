"""The ingester's figures: plain counters on the hot path, turned into Prometheus metrics only
when scraped, and a tiny HTTP endpoint for /metrics and /healthz.

This module knows nothing of the ingester itself: it is handed the counters and two callables
(what is pending, whether it is healthy), so `ingest._service` imports it and not the reverse."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from ingest._store import WriteResult
    from pumpfleet.settings import IngestSettings

Health = Callable[[], tuple[bool, dict[str, object]]]
"""(healthy, detail) for /healthz and the `up` gauge."""

log = logging.getLogger("pumpfleet.ingest")

_COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000)


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", self.n))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)


@dataclass
class Stats:
    received: int = 0
    written: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    statuses_superseded: int = 0
    stale_acks_skipped: int = 0
    registered_pumps: int = 0
    quarantined: int = 0
    """Messages of pumps not provisioned or revoked (dead letters too)."""
    rate_limited: int = 0
    """Messages over their pump's rate limit (dead letters too, or duplicates of one)."""
    db_errors: int = 0
    hook_errors: int = 0
    batches: int = 0
    last_lag_s: float = 0.0
    last_commit_at: float = 0.0
    commit_s: _Histogram = field(default_factory=lambda: _Histogram(_COMMIT_BUCKETS))
    batch_size: _Histogram = field(default_factory=lambda: _Histogram(_BATCH_BUCKETS))
    receive_to_commit_s: _Histogram = field(default_factory=lambda: _Histogram(_COMMIT_BUCKETS))

    def observe_commit(self, seconds: float) -> None:
        self.commit_s.observe(seconds)

    def observe_batch(
        self,
        size: int,
        oldest_received: float,
        result: WriteResult,
        stale: int,
        now: float,
        rate_limited: int = 0,
    ) -> None:
        """A committed batch of `size` messages, the first received at `oldest_received`."""
        self.batches += 1
        self.received += size
        self.written += len(result.new)
        self.dead_lettered += result.dead_letters
        self.duplicates += result.duplicates
        self.statuses_superseded += result.statuses_superseded
        self.stale_acks_skipped += stale
        self.registered_pumps += len(result.registered)
        self.quarantined += result.quarantined
        self.rate_limited += rate_limited
        self.batch_size.observe(size)
        self.last_lag_s = now - oldest_received
        self.receive_to_commit_s.observe(self.last_lag_s)
        self.last_commit_at = now

    def summary(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "written": self.written,
            "dead_lettered": self.dead_lettered,
            "duplicates": self.duplicates,
            "statuses_superseded": self.statuses_superseded,
            "quarantined": self.quarantined,
            "rate_limited": self.rate_limited,
            "batches": self.batches,
            "db_errors": self.db_errors,
        }


class _Collector:
    def __init__(self, stats: Stats, pending: Callable[[], int], health: Health) -> None:
        self.stats = stats
        self.pending = pending
        self.health = health

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, value, doc in (
            ("messages_received", s.received, "Messages taken from the broker and committed"),
            ("messages_written", s.written, "Messages stored for the first time"),
            ("messages_dead_lettered", s.dead_lettered, "Rejected messages kept in dead_letter"),
            ("duplicates_dropped", s.duplicates, "Redelivered messages already stored"),
            (
                "statuses_superseded",
                s.statuses_superseded,
                "Statuses no newer than the stored one (retained statuses come again)",
            ),
            (
                "stale_acks_skipped",
                s.stale_acks_skipped,
                "Acks not sent because the delivering connection was gone",
            ),
            ("pumps_registered", s.registered_pumps, "Pumps registered from a first message"),
            (
                "messages_quarantined",
                s.quarantined,
                "Messages of pumps not provisioned or revoked, kept in dead_letter",
            ),
            (
                "rate_limited",
                s.rate_limited,
                "Messages over their pump's rate limit, kept in dead_letter",
            ),
            ("database_errors", s.db_errors, "Failed database connects and writes"),
            ("alert_hook_errors", s.hook_errors, "Batches whose alert evaluation failed"),
            ("batches", s.batches, "Committed batches"),
        ):
            yield CounterMetricFamily(f"pumpfleet_ingest_{name}", doc, value=value)
        yield s.commit_s.family("pumpfleet_ingest_commit_seconds", "Batch commit latency")
        yield s.batch_size.family("pumpfleet_ingest_batch_size", "Messages per batch")
        yield s.receive_to_commit_s.family(
            "pumpfleet_ingest_receive_to_commit_seconds",
            "Oldest message of a batch: receive to ack",
        )
        yield GaugeMetricFamily(
            "pumpfleet_ingest_pending",
            "Messages held, not yet committed",
            value=self.pending(),
        )
        yield GaugeMetricFamily(
            "pumpfleet_ingest_lag_seconds",
            "Receive-to-commit time of the last batch's oldest message",
            value=s.last_lag_s,
        )
        ok, _ = self.health()
        yield GaugeMetricFamily(
            "pumpfleet_ingest_up",
            "1 when broker and database are reachable",
            value=1.0 if ok else 0.0,
        )


async def serve(
    cfg: IngestSettings, stats: Stats, pending: Callable[[], int], health: Health
) -> asyncio.Server | None:
    """Serve /metrics and /healthz on the configured port (0 picks a free one; None disables)."""
    if cfg.metrics_port is None:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, pending, health))
    return await http_endpoint(cfg.metrics_host, cfg.metrics_port, registry, health)


async def http_endpoint(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: Health,
) -> asyncio.Server | None:
    """/metrics (Prometheus text) and /healthz (200 or 503, JSON) for any of our services."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            path = request.split(b" ")[1].decode() if request.count(b" ") >= 2 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    generate_latest(registry),
                )
            elif path.startswith("/healthz"):
                ok, detail = health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps({"ok": ok, **detail}).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, IndexError):
            pass
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, host, port)
    except OSError as exc:
        log.error("metrics endpoint not started", extra={"port": port, "error": str(exc)})
        return None
    bound = server.sockets[0].getsockname()[1]
    log.info("metrics endpoint", extra={"url": f"http://{host}:{bound}/metrics"})
    return server
