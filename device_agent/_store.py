"""The agent's on-disk outbox: every message is written here first and deleted only when the
broker has acknowledged it, so a broker outage or a killed agent loses nothing that was queued.

One SQLite file per pump, in WAL mode with `synchronous=FULL`: a commit is on disk before the
agent publishes the message it holds, and before the sequence number it used is considered spent.
`NORMAL` would survive a killed process but not a power cut, and after a power cut it could hand
out a sequence number again that the broker had already seen with other content; at one message
per reporting interval the fsync costs nothing. Acknowledgements are deleted in batches.

The queue is bounded (`QueueLimits`). When full, old telemetry is thinned (see `_thin`); events
and status messages are never dropped, even if that means going over the bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pumpfleet.envelope import Entry

__all__ = [
    "AppendResult",
    "Entry",
    "QueueLimits",
    "Queued",
    "Store",
    "StoreError",
    "StoreLocked",
    "Will",
]

FIRST_SEQ = 1
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY,
    kind       TEXT    NOT NULL CHECK (kind IN ('telemetry', 'event', 'status')),
    topic      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    retain     INTEGER NOT NULL DEFAULT 0,
    duplicate  INTEGER NOT NULL DEFAULT 0,
    not_before REAL    NOT NULL DEFAULT 0,
    queued_at  REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_telemetry ON outbox (seq) WHERE kind = 'telemetry';
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL);
"""
_COLUMNS = "seq, kind, topic, payload, retain, duplicate, not_before"


class StoreError(Exception):
    """The store cannot be used as asked (wrong pump, newer schema); a user can fix it."""


class StoreLocked(StoreError):
    """Another agent holds this pump's store: two agents would fight over one client id."""


@dataclass(frozen=True)
class QueueLimits:
    """When the outbox counts as full; either bound triggers thinning."""

    max_messages: int = 100_000
    """About two years of telemetry at one message per 10 minutes."""
    max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1:
            raise ValueError("queue limits must be positive")


@dataclass(frozen=True)
class Queued:
    """A message waiting on disk for the broker's acknowledgement."""

    seq: int
    kind: str
    topic: str
    payload: bytes
    retain: bool
    duplicate: bool
    not_before: float


@dataclass(frozen=True)
class AppendResult:
    seqs: list[int]
    """Every seq spent, in order (`lost` entries' included)."""
    thinned: int = 0
    """Old telemetry messages deleted to stay within the bound."""
    over_limit: bool = False
    """Still over the bound after thinning: only events/status (never dropped) fill it."""


@dataclass(frozen=True)
class Will:
    """The seqs reserved for one broker connection's status messages.

    `online_seq` is published when the connection is up; `will_seq` (one higher) goes into the
    MQTT last will, so among a pump's status messages seq order is the order of what happened.
    `state`: `reserved` (never reached a broker, may be reused verbatim), `armed` (a broker
    accepted the connection: the will may fire, never reuse), `spent` (a clean stop published
    its offline status with `will_seq`).
    """

    online_seq: int
    will_seq: int
    payload: bytes
    state: Literal["reserved", "armed", "spent"]


class Store:
    """A pump's outbox; single-threaded (the agent drives it from its one loop thread)."""

    def __init__(
        self,
        path: Path | str,
        pump_id: str,
        limits: QueueLimits | None = None,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.pump_id = pump_id
        self.limits = limits or QueueLimits()
        self._wall = wall_clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.path.with_name(self.path.name + ".lock"), pump_id)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._depth = 0
            self._open(synchronous)
        except BaseException:
            self._lock.close()
            raise

    def _open(self, synchronous: str) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer agent (schema {version}); upgrade the agent"
            )
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            owner = self._meta("pump_id")
            if owner is None:
                self._set_meta("pump_id", self.pump_id)
            elif owner != self.pump_id:
                raise StoreError(
                    f"{self.path} holds the queue of pump {owner}, not {self.pump_id}; "
                    "use one state file per pump"
                )
            top = db.execute("SELECT max(seq) FROM outbox").fetchone()[0]
            floor = max(FIRST_SEQ, (top or 0) + 1)
            if int(self._meta("next_seq") or 0) < floor:
                self._set_meta("next_seq", floor)
        count, size = db.execute("SELECT count(*), total(length(payload)) FROM outbox").fetchone()
        self._count, self._bytes = int(count), int(size)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._lock.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One durable commit for everything inside; nests (only the outermost commits)."""
        if self._depth == 0:
            self._db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("ROLLBACK")
                self._recount()
            raise
        self._depth -= 1
        if self._depth == 0:
            self._db.execute("COMMIT")

    # sequence numbers ---------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return int(self._meta("next_seq"))

    def reserve(self, n: int = 1) -> int:
        """Spend `n` consecutive seqs without queueing anything; returns the first."""
        with self.transaction():
            first = self.next_seq
            self._set_meta("next_seq", first + n)
        return first

    # queue --------------------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> AppendResult:
        """Queue messages under the next seqs, in order, in one commit; then enforce the bound.

        Every entry gets a seq; a `lost` one (a simulated loss) is not stored.
        """
        if not entries:
            return AppendResult([])
        with self.transaction():
            first = self.reserve(len(entries))
            seqs = list(range(first, first + len(entries)))
            for seq, entry in zip(seqs, entries, strict=True):
                if not entry.lost:
                    self._insert(seq, entry)
            thinned, over = self._enforce_limits()
        return AppendResult(seqs, thinned, over)

    def put(self, seq: int, entry: Entry) -> None:
        """Queue a message under a seq reserved earlier (a connection's status messages)."""
        if seq >= self.next_seq:
            raise ValueError(f"seq {seq} was not reserved (next is {self.next_seq})")
        with self.transaction():
            self._insert(seq, entry)

    def _insert(self, seq: int, entry: Entry) -> None:
        payload = entry.payload(seq)
        now = self._wall()
        self._db.execute(
            f"INSERT INTO outbox ({_COLUMNS}, queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                seq,
                entry.kind,
                entry.topic,
                payload,
                int(entry.retain),
                int(entry.duplicate),
                now + entry.delay_s if entry.delay_s > 0 else 0.0,
                now,
            ),
        )
        self._count += 1
        self._bytes += len(payload)

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages (unknown seqs are ignored: thinned or acked twice)."""
        wanted = sorted(set(seqs))
        deleted = 0
        if not wanted:
            return 0
        with self.transaction():
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"DELETE FROM outbox WHERE seq IN ({marks}) RETURNING length(payload)", chunk
                ).fetchall()
                deleted += len(rows)
                self._count -= len(rows)
                self._bytes -= sum(r[0] for r in rows)
        return deleted

    def due(
        self, limit: int, exclude: Collection[int] = (), now: float | None = None
    ) -> list[Queued]:
        """The `limit` lowest-seq messages that may be sent now, skipping `exclude` (in flight)."""
        if limit <= 0:
            return []
        now = self._wall() if now is None else now
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE not_before <= ? ORDER BY seq LIMIT ?",
            (now, limit + len(exclude)),
        ).fetchall()
        out = [_queued(r) for r in rows if r[0] not in exclude]
        return out[:limit]

    def next_release(self, now: float | None = None) -> float | None:
        """When the earliest held-back message (a `delay_s` fault) becomes due, if any."""
        now = self._wall() if now is None else now
        value = self._db.execute(
            "SELECT min(not_before) FROM outbox WHERE not_before > ?", (now,)
        ).fetchone()[0]
        return None if value is None else float(value)

    def messages(self) -> list[Queued]:
        """Everything queued, by seq (for tests and inspection)."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY seq").fetchall()
        return [_queued(r) for r in rows]

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    # the bound ----------------------------------------------------------------------------------

    def _over(self) -> bool:
        return self._count > self.limits.max_messages or self._bytes > self.limits.max_bytes

    def _enforce_limits(self) -> tuple[int, bool]:
        thinned = 0
        while self._over():
            removed = self._thin()
            if removed == 0:
                return thinned, True
            thinned += removed
        return thinned, False

    def _thin(self) -> int:
        """Delete every second message of the oldest half of the queued telemetry.

        Repeated passes leave old telemetry at every 2nd, 4th, 8th... reading while recent
        telemetry stays complete; the newest reading is never thinned. Events and status
        messages are never touched. The ingester sees the gaps as a sequence gap, as it should.
        """
        rows = self._db.execute(
            """
            DELETE FROM outbox WHERE seq IN (
                SELECT seq FROM (
                    SELECT seq, row_number() OVER (ORDER BY seq) AS rn, count(*) OVER () AS n
                    FROM outbox WHERE kind = 'telemetry'
                ) WHERE rn < n AND rn <= n / 2 AND rn % 2 = 0
            ) RETURNING length(payload)
            """
        ).fetchall()
        self._count -= len(rows)
        self._bytes -= sum(r[0] for r in rows)
        return len(rows)

    # the will -----------------------------------------------------------------------------------

    def will(self) -> Will | None:
        seq = self._meta("will_seq")
        if seq is None:
            return None
        return Will(
            int(seq) - 1, int(seq), bytes(self._meta("will_payload")), self._meta("will_state")
        )

    def reserve_will(self, payload: Callable[[int], bytes]) -> Will:
        """Reserve the next connection's two status seqs and store its will payload."""
        with self.transaction():
            online = self.reserve(2)
            data = payload(online + 1)
            self._set_meta("will_seq", online + 1)
            self._set_meta("will_payload", data)
            self._set_meta("will_state", "reserved")
        return Will(online, online + 1, data, "reserved")

    def set_will_state(self, state: Literal["reserved", "armed", "spent"]) -> None:
        self._set_meta("will_state", state)

    # helpers ------------------------------------------------------------------------------------

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: object) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _recount(self) -> None:
        count, size = self._db.execute(
            "SELECT count(*), total(length(payload)) FROM outbox"
        ).fetchone()
        self._count, self._bytes = int(count), int(size)


def _queued(row: tuple[Any, ...]) -> Queued:
    seq, kind, topic, payload, retain, duplicate, not_before = row
    return Queued(seq, kind, topic, bytes(payload), bool(retain), bool(duplicate), not_before)


def _lock(path: Path, pump_id: str) -> IO[str]:
    handle = open(path, "a+")  # noqa: SIM115 - held open for the store's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StoreLocked(
            f"another agent ({holder}) is running for pump {pump_id} with {path.parent}; "
            "stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle
