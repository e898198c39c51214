"""Which alerting instance is active: a lease row in the database.

The active instance renews the lease every `ttl/4`; a standby takes it over once it has
expired by the database's clock (one clock for all instances). Each takeover raises the epoch,
and every write of the active instance checks its holder and epoch in the same transaction
(`check`, which share-locks the row so a takeover waits for that transaction to end): an
instance paused past its lease (SIGSTOP, a frozen VM) cannot write a transition after another
has taken over; it finds out at its next write and stands down.

Why a lease and not a session advisory lock: a paused host keeps its TCP connection, so the
database would hold its lock forever and no standby could take over. For the same reason a
takeover ends the old holder's database sessions (each instance names them after itself in
`application_name`): a holder frozen inside a transaction would otherwise keep its share lock
on the lease row, and with it the lease.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import uuid

import asyncpg

NAME = "alerting"

_ACQUIRE_SQL = """
INSERT INTO alerting_lease AS l (name, holder, epoch, expires_at)
VALUES ($1, $2, 1, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
    SET holder = EXCLUDED.holder, epoch = l.epoch + 1, expires_at = EXCLUDED.expires_at,
        since = now()
    WHERE l.expires_at < now()
RETURNING epoch
"""
_EXPIRED_SQL = """
SELECT holder FROM alerting_lease WHERE name = $1 AND expires_at < now()
"""
# A holder's sessions, by the application_name it gave them (`session_name`).
_FENCE_SQL = """
SELECT count(pg_terminate_backend(pid))::int FROM pg_stat_activity
WHERE application_name = $1 AND pid <> pg_backend_pid()
"""
_RENEW_SQL = """
UPDATE alerting_lease SET expires_at = now() + make_interval(secs => $4)
WHERE name = $1 AND holder = $2 AND epoch = $3
RETURNING epoch
"""
_CHECK_SQL = """
SELECT 1 FROM alerting_lease WHERE name = $1 AND holder = $2 AND epoch = $3 FOR SHARE
"""
_RELEASE_SQL = """
UPDATE alerting_lease SET expires_at = now() WHERE name = $1 AND holder = $2 AND epoch = $3
"""
_WHO_SQL = "SELECT holder, epoch, expires_at > now() AS live FROM alerting_lease WHERE name = $1"


class LeaseLost(Exception):
    """Another instance holds the lease now: stop writing, stand by."""


def holder_id() -> str:
    """Unique per process, readable in logs: host, pid and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Lease:
    def __init__(self, ttl_s: float = 5.0, holder: str | None = None, name: str = NAME) -> None:
        self.ttl_s = ttl_s
        self.holder = holder or holder_id()
        self.name = name
        self.epoch: int | None = None

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 4

    @property
    def session_name(self) -> str:
        return session_name(self.holder)

    def dsn(self, dsn: str) -> str:
        """`dsn` with this holder's application_name, so a takeover can end its sessions."""
        return with_application_name(dsn, self.session_name)

    async def try_acquire(self, conn: asyncpg.Connection) -> bool:
        """Take the lease if it is free or expired; an expired holder's sessions are ended
        first (fencing), so none of its transactions can still commit."""
        expired = await conn.fetchval(_EXPIRED_SQL, self.name)
        if expired is not None and expired != self.holder:
            await conn.fetchval(_FENCE_SQL, session_name(expired))
        epoch = await conn.fetchval(_ACQUIRE_SQL, self.name, self.holder, self.ttl_s)
        self.epoch = int(epoch) if epoch is not None else None
        return self.epoch is not None

    async def renew(self, conn: asyncpg.Connection) -> bool:
        if self.epoch is None:
            return False
        ok = await conn.fetchval(_RENEW_SQL, self.name, self.holder, self.epoch, self.ttl_s)
        if ok is None:
            self.epoch = None
        return ok is not None

    async def check(self, conn: asyncpg.Connection) -> None:
        """Inside the caller's transaction: raise LeaseLost unless we still hold the lease."""
        if (
            self.epoch is None
            or await conn.fetchval(_CHECK_SQL, self.name, self.holder, self.epoch) is None
        ):
            self.epoch = None
            raise LeaseLost(f"{self.holder} no longer holds the {self.name} lease")

    async def release(self, conn: asyncpg.Connection) -> None:
        """Hand over at once (a clean stop): the standby need not wait for the expiry."""
        if self.epoch is not None:
            await conn.execute(_RELEASE_SQL, self.name, self.holder, self.epoch)
            self.epoch = None

    @staticmethod
    async def who(conn: asyncpg.Connection, name: str = NAME) -> tuple[str, int, bool] | None:
        row = await conn.fetchrow(_WHO_SQL, name)
        return None if row is None else (row["holder"], int(row["epoch"]), bool(row["live"]))


def session_name(holder: str) -> str:
    return f"pumpfleet-alerting {holder}"[:63]  # PostgreSQL keeps 63 bytes of it


def with_application_name(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "application_name"]
    query.append(("application_name", name))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
