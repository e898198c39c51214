"""Test helpers: Findings and a capturing HTTP receiver (deadlines: `pumpfleet.testing.until`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg

from ingest.findings import Finding, Priority

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
"""Device time of the tests' first Finding; in the past, as real device times are."""


def finding(
    pump_id: str = "P-1",
    rule: str = "low_reservoir",
    *,
    active: bool = True,
    priority: Priority = "medium",
    minutes: float = 0,
    seq: int | None = None,
    summary: str | None = None,
    **details: Any,
) -> Finding:
    return Finding(
        pump_id=pump_id,
        rule=rule,
        active=active,
        priority=priority,
        at=T0 + timedelta(minutes=minutes),
        summary=summary or f"{rule} on {pump_id}",
        details=details,
        seq=seq,
    )


async def add_pumps(conn: asyncpg.Connection, pumps: Iterable[tuple[str, str]]) -> None:
    await conn.executemany("INSERT INTO pumps (pump_id, clinic) VALUES ($1, $2)", list(pumps))


class Sink:
    """A tiny HTTP server that records every JSON POST; answers `statuses` in turn, then 200."""

    def __init__(self, port: int = 0, statuses: Iterable[int] = ()) -> None:
        self.requests: list[dict[str, Any]] = []
        self._statuses = list(statuses)
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._lock:
                    status = sink._statuses.pop(0) if sink._statuses else 200
                    if status < 300:
                        sink.requests.append(
                            {
                                "path": self.path,
                                "headers": dict(self.headers),
                                "body": json.loads(raw),
                            }
                        )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def bodies(self) -> list[Any]:
        with self._lock:
            return [r["body"] for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
