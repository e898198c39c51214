"""Delivering the outbox: Prometheus Alertmanager (API v2) and a generic JSON webhook.

The book writes outbox rows in the transaction of the transition; this notifier sends them, per
receiver strictly in row order (a 'resolve' never overtakes its 'trigger'), and marks them
delivered. A receiver that cannot be reached keeps its rows and is retried with exponential
backoff; one that rejects a row for good (HTTP 4xx) gets it marked failed, so one bad row cannot
stall the rest. Ingestion never waits for any of this: the notifier is its own task with its
own database connection.

Alertmanager forgets an alert it has not heard about for `resolve_timeout`, and keeps no alerts
across its restarts, so open alerts are also re-sent every `alertmanager_resend_s`.

When several ingesters run, one notifier delivers at a time (a PostgreSQL advisory lock), so a
notification is not sent twice by two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from ingest.alerts._book import RECEIVERS, Receiver, Transition, event, load_open
from pumpfleet.settings import AlertSettings

log = logging.getLogger("pumpfleet.alerts.notify")

_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError)
"""The database is down or refuses us for now: wait it out."""
_LOCK_KEY = 0x70756E74  # advisory lock of the delivering notifier
_BATCH = 200
_RESERVED_ANNOTATIONS = {"summary", "figures", "alert_id", "phase", "acked_by", "description"}
_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")

SEVERITY = {"high": "critical", "medium": "error", "low": "warning", "info": "info"}
"""IEC 60601-1-8 priority -> PagerDuty-style severity for the webhook."""


class _Permanent(Exception):
    """The receiver refused the request and will refuse it again (HTTP 4xx)."""


class _Retry(Exception):
    """The receiver is there but cannot take it now (HTTP 5xx, 429, 408)."""


# rendering -------------------------------------------------------------------------------------


def receivers(cfg: AlertSettings) -> tuple[Receiver, ...]:
    """The receivers with a URL configured; only these get outbox rows."""
    urls = {"alertmanager": cfg.alertmanager_url, "webhook": cfg.webhook_url}
    return tuple(r for r in RECEIVERS if urls[r])


def am_labels(ev: Mapping[str, Any], *, previous: bool = False) -> dict[str, str]:
    """The label set that identifies the alert in Alertmanager."""
    priority = ev["previous_priority"] if previous else ev["priority"]
    escalated = ev["previous_escalated"] if previous else ev["escalated"]
    labels = {
        "alertname": ev["rule"],
        "pump_id": ev["pump_id"],
        "priority": priority,
        "clinic": ev["clinic"] or "unassigned",
    }
    if escalated:
        labels["escalation"] = "unacknowledged"
    return labels


def render_alertmanager(
    ev: Mapping[str, Any], generator_url: str, now: datetime | None = None
) -> list[dict[str, Any]]:
    """One postable alert, plus the ended old label set when the priority label changed.

    Timestamps are clamped to `now`: device clocks (or an accelerated simulation) may run
    ahead, and an endsAt in the future would keep a resolved alert firing until then.
    """
    now = now or datetime.now(UTC)
    starts = min(_parse(ev["started_at"]), now)
    labels = am_labels(ev)
    details = ev.get("details") or {}
    annotations = {
        "summary": ev["summary"],
        "figures": " ".join(f"{k}={_text(v)}" for k, v in details.items()),
        "alert_id": str(ev["alert_id"]),
        "phase": ev["phase"],
    }
    if ev.get("acked_by"):
        annotations["acked_by"] = ev["acked_by"]
    for key, value in details.items():
        name = _LABEL_NAME.sub("_", str(key))
        if name and not name[0].isdigit() and name not in _RESERVED_ANNOTATIONS:
            annotations[name] = _text(value)
    alert: dict[str, Any] = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": _iso(starts),
        "generatorURL": generator_url.format(alert_id=ev["alert_id"]),
    }
    if ev.get("ended_at"):
        alert["endsAt"] = _iso(max(min(_parse(ev["ended_at"]), now), starts))
    out = [alert]
    if ev.get("previous_priority") is not None:
        old = am_labels(ev, previous=True)
        if old != labels:
            out.insert(
                0,
                {
                    "labels": old,
                    "annotations": annotations,
                    "startsAt": _iso(starts),
                    "endsAt": _iso(now),
                    "generatorURL": alert["generatorURL"],
                },
            )
    return out


def render_webhook(ev: Mapping[str, Any], action: str, generator_url: str) -> dict[str, Any]:
    """The generic webhook body: PagerDuty Events v2 words, flat, with the pump's figures."""
    return {
        "dedup_key": f"pumpfleet-alert-{ev['alert_id']}",
        "event_action": action,
        "severity": SEVERITY.get(ev["priority"], "info"),
        "summary": ev["summary"],
        "source": ev["pump_id"],
        "timestamp": ev["at"],
        "alert_id": ev["alert_id"],
        "pump_id": ev["pump_id"],
        "clinic": ev["clinic"] or "unassigned",
        "rule": ev["rule"],
        "priority": ev["priority"],
        "phase": ev["phase"],
        "escalated": bool(ev.get("escalated")),
        "started_at": ev["started_at"],
        "ended_at": ev.get("ended_at"),
        "acked_at": ev.get("acked_at"),
        "acked_by": ev.get("acked_by"),
        "resolved_by": ev.get("resolved_by"),
        "actor": ev.get("actor"),
        "note": ev.get("note"),
        "details": ev.get("details") or {},
        "links": [{"href": generator_url.format(alert_id=ev["alert_id"]), "text": "alert"}],
    }


# delivery --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Backoff:
    """A receiver's failures in a row and when to try it again. Not a blocking retry: the
    other receiver (and the next poll) must not wait, so the notifier keeps the schedule and
    tenacity's wait strategy says how long each pause is."""

    failures: int = 0
    next_try: float = 0.0


@dataclass(slots=True)
class NotifierStats:
    delivered: int = 0
    failed: int = 0
    errors: int = 0
    resent: int = 0


class Notifier:
    """Sends outbox rows to the configured receivers; `await run(stop)` until stop is set."""

    def __init__(
        self,
        cfg: AlertSettings,
        database_url: str,
        *,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.cfg = cfg
        self.database_url = database_url
        self.receivers = receivers(cfg)
        self._client = client
        self._own_client = False
        self._backoff: dict[str, _Backoff] = {r: _Backoff() for r in RECEIVERS}
        self._retrying = AsyncRetrying(
            retry=retry_if_exception_type(_DB_ERRORS),
            wait=wait_exponential_jitter(
                multiplier=cfg.retry_min_s, max=cfg.retry_max_s, jitter=cfg.retry_min_s
            ),
            before_sleep=self._db_unavailable,
        )
        """Reconnecting to the database; its wait also paces a receiver's retries."""
        self._db_lost = False
        self._wake = asyncio.Event()
        self._next_resend = 0.0
        self._next_prune = 0.0
        self._resend_ok = True
        self.stats = NotifierStats()

    def wake(self) -> None:
        """New rows were written: deliver now rather than at the next poll."""
        self._wake.set()

    async def __aenter__(self) -> Notifier:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.cfg.http_timeout_s)
            self._own_client = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client, self._own_client = None, False

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; database outages are waited out, never raised."""
        if not self.receivers:
            return
        async with self:
            while not stop.is_set():
                conn = await self._connect(stop)
                if conn is None:
                    return
                try:
                    await self._serve(conn, stop)
                except (*_DB_ERRORS, asyncpg.InterfaceError) as exc:
                    log.warning("notifier: database error", extra={"error": _one_line(exc)})
                    await _wait(stop, self.cfg.retry_min_s)
                finally:
                    with contextlib.suppress(Exception):  # closing also frees the advisory lock
                        await asyncio.wait_for(conn.close(), timeout=5)

    async def _connect(self, stop: asyncio.Event) -> asyncpg.Connection | None:
        """A connection, waiting out an outage with backoff; None when `stop` came first."""

        async def attempt() -> asyncpg.Connection | None:
            if stop.is_set():
                return None
            return await asyncpg.connect(self.database_url, timeout=10)

        conn: asyncpg.Connection | None = await self._retrying.copy(
            sleep=lambda seconds: _wait(stop, seconds)
        )(attempt)
        if conn is not None and self._db_lost:
            self._db_lost = False
            log.info("notifier: database reachable again")
        return conn

    def _db_unavailable(self, attempt: RetryCallState) -> None:
        """Once per outage, not once per retry."""
        if not self._db_lost:
            self._db_lost = True
            exc = attempt.outcome.exception() if attempt.outcome is not None else None
            log.warning(
                "notifier: database unavailable; retrying",
                extra={"error": _one_line(exc) if exc else "unknown error"},
            )

    async def _serve(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        # One deliverer at a time across processes; the others wait for the lock.
        while not stop.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
                break
            await _wait(stop, self.cfg.poll_s * 5)
        log.info("notifier delivering", extra={"receivers": ",".join(self.receivers)})
        while not stop.is_set():
            self._wake.clear()  # before the step: rows written during it wake the next one
            await self.step(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.poll_s)

    async def step(self, conn: asyncpg.Connection) -> int:
        """One round: deliver what is pending, re-send open alerts if due, prune old rows."""
        sent = 0
        now = time.monotonic()
        # What is new first: a re-send of every open alert (thousands of standing notices in a
        # fleet) must not delay a page queued meanwhile.
        for receiver in self.receivers:
            sent += await self.deliver(conn, receiver)
        if "alertmanager" in self.receivers and now >= self._next_resend:
            ok = await self.resend_open(conn)
            # Failed: try again soon, not at every poll (the outbox has its own backoff).
            wait = self.cfg.alertmanager_resend_s if ok else 10 * self.cfg.retry_min_s
            self._next_resend = now + min(wait, self.cfg.alertmanager_resend_s)
        if now >= self._next_prune:
            await conn.execute(
                "DELETE FROM alert_outbox WHERE coalesce(delivered_at, failed_at) "
                "< now() - make_interval(secs => $1)",
                self.cfg.outbox_keep_days * 86400,
            )
            self._next_prune = now + 3600
        return sent

    async def deliver(self, conn: asyncpg.Connection, receiver: Receiver) -> int:
        """Send this receiver's pending rows in order until done or it fails; return how many."""
        backoff = self._backoff[receiver]
        if time.monotonic() < backoff.next_try:
            return 0
        sent = 0
        while True:
            rows = await conn.fetch(
                # Pages before standing notices: a fleet's first minutes queue one info
                # notice per pump, and a critical alarm must not wait behind them. An alert
                # never changes between info and another priority, so its rows keep their order.
                "SELECT id, alert_id, action, event FROM alert_outbox WHERE receiver = $1 "
                "AND delivered_at IS NULL AND failed_at IS NULL "
                "ORDER BY event->>'priority' = 'info', id LIMIT $2",
                receiver,
                _BATCH,
            )
            if not rows:
                return sent
            # Alertmanager takes a list per request; the webhook one event per request.
            queue = deque([rows] if receiver == "alertmanager" else [[r] for r in rows])
            while queue:
                batch = queue.popleft()
                ids = [r["id"] for r in batch]
                try:
                    await self._send(receiver, batch)
                except _Permanent as exc:
                    if len(batch) > 1:  # find the row it refuses by sending one at a time
                        queue.extendleft([r] for r in reversed(batch))
                        continue
                    await self._mark(conn, ids, error=str(exc), failed=True)
                    self.stats.failed += 1
                    log.error(
                        "notification refused; not retried",
                        extra={"receiver": receiver, "outbox_id": ids[0], "error": str(exc)},
                    )
                    continue
                except (httpx.HTTPError, _Retry) as exc:
                    await self._mark(conn, ids, error=_one_line(exc))
                    self.stats.errors += 1
                    backoff.failures += 1
                    pause = self._pause_s(backoff.failures)
                    backoff.next_try = time.monotonic() + pause
                    log.warning(
                        "notification delivery failed; retrying",
                        extra={
                            "receiver": receiver,
                            "error": _one_line(exc),
                            "attempt": backoff.failures,
                            "retry_s": round(pause, 2),
                        },
                    )
                    return sent
                await self._mark(conn, ids, delivered=True)
                if backoff.failures:
                    log.info(
                        "receiver reachable again",
                        extra={"receiver": receiver, "after_attempts": backoff.failures},
                    )
                backoff.failures = 0
                sent += len(batch)
                self.stats.delivered += len(batch)

    def _pause_s(self, failures: int) -> float:
        """The retrying policy's wait after `failures` failed tries in a row."""
        state = RetryCallState(self._retrying, None, (), {})
        state.attempt_number = failures
        return float(self._retrying.wait(state))

    async def resend_open(self, conn: asyncpg.Connection) -> bool:
        """Tell Alertmanager again about every open alert (it expires silent ones)."""
        open_alerts = await load_open(conn)
        now = datetime.now(UTC)
        alerts: list[dict[str, Any]] = []
        for a in open_alerts:
            ev = event(Transition(a, a.phase, a.updated_at, "resend"))
            alerts.extend(render_alertmanager(ev, self.cfg.generator_url, now))
        try:
            for i in range(0, len(alerts), 1000):
                await self._post_alertmanager(alerts[i : i + 1000])
        except (httpx.HTTPError, _Retry, _Permanent) as exc:
            if self._resend_ok:  # once per outage, not once per try
                log.warning(
                    "re-sending open alerts to alertmanager failed",
                    extra={"error": _one_line(exc), "open": len(open_alerts)},
                )
            self._resend_ok = False
            return False
        self._resend_ok = True
        self.stats.resent += len(open_alerts)
        return True

    async def _send(self, receiver: Receiver, rows: Sequence[Mapping[str, Any]]) -> None:
        now = datetime.now(UTC)
        if receiver == "alertmanager":
            alerts = [
                a for r in rows for a in render_alertmanager(_event(r), self.cfg.generator_url, now)
            ]
            await self._post_alertmanager(alerts)
        else:
            (row,) = rows
            body = render_webhook(_event(row), row["action"], self.cfg.generator_url)
            headers = {}
            if self.cfg.webhook_token is not None:
                headers["Authorization"] = f"Bearer {self.cfg.webhook_token.get_secret_value()}"
            assert self.cfg.webhook_url is not None
            await self._post(self.cfg.webhook_url.get_secret_value(), body, headers)

    async def _post_alertmanager(self, alerts: list[dict[str, Any]]) -> None:
        assert self.cfg.alertmanager_url is not None
        await self._post(self.cfg.alertmanager_url.rstrip("/") + "/api/v2/alerts", alerts, {})

    async def _post(self, url: str, body: Any, headers: dict[str, str]) -> None:
        if self._client is None:
            raise RuntimeError("Notifier used outside run() without an http client")
        resp = await self._client.post(url, json=body, headers=headers)
        if resp.is_success:
            return
        text = resp.text.strip().replace("\n", " ")[:200]
        if resp.status_code in (408, 425, 429) or resp.status_code >= 500:
            raise _Retry(f"HTTP {resp.status_code}: {text}")
        raise _Permanent(f"HTTP {resp.status_code}: {text}")

    async def _mark(
        self,
        conn: asyncpg.Connection,
        ids: list[int],
        *,
        delivered: bool = False,
        failed: bool = False,
        error: str | None = None,
    ) -> None:
        await conn.execute(
            """UPDATE alert_outbox SET attempts = attempts + 1, last_attempt_at = now(),
                   last_error = coalesce($2, last_error),
                   delivered_at = CASE WHEN $3 THEN now() END,
                   failed_at = CASE WHEN $4 THEN now() END
               WHERE id = ANY($1::int8[])""",
            ids,
            error,
            delivered,
            failed,
        )


def _event(row: Mapping[str, Any]) -> dict[str, Any]:
    ev = row["event"]
    out: dict[str, Any] = json.loads(ev) if isinstance(ev, str) else dict(ev)
    return out


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}".splitlines()[0][:300]
