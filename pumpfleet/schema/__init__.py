"""Versioned SQL migrations for TimescaleDB and plain PostgreSQL.

Files in migrations/ are named `NNNN_name.sql` (both flavours), `NNNN_name.timescaledb.sql` or
`NNNN_name.postgres.sql` (one flavour). A version's SQL for a flavour is its common file followed
by its flavour file. Both flavours create the same table and view names, so every query,
dashboard and rule runs on either.

`migrate()` is idempotent and safe from two processes at once: it holds an advisory lock, applies
each pending version in its own transaction and records it in `schema_migrations` with a
checksum, and refuses to run over a migration whose file changed after it was applied.

Beside the migrations, the SQL that runs against these tables from more than one place, so
that no part writes its own against another's tables: `panels` (every dashboard figure),
`queries` (the on-call queries), `registry` (the clinic's pump registry) and `alerts` (the
alerts a run raised, as checks read them back).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import asyncpg

Flavour = Literal["timescaledb", "postgres"]
FLAVOURS: tuple[Flavour, ...] = ("timescaledb", "postgres")
_LOCK_KEY = 0x70756D70  # "pump": one advisory lock for every migrating process
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(timescaledb|postgres))?\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(flavour: Flavour) -> list[Migration]:
    """The ordered migrations for one flavour, as they would be applied."""
    parts: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        m = _FILE.match(entry.name)
        if not m:
            continue
        version, name, only = int(m[1]), m[2], m[3]
        if only is not None and only != flavour:
            continue
        parts.setdefault((version, name), []).append((0 if only is None else 1, entry.read_text()))
    versions = [v for v, _ in parts]
    if len(versions) != len(set(versions)):
        raise MigrationError("two migrations share a version number")
    return [
        Migration(version, name, "\n".join(sql for _, sql in sorted(chunks)))
        for (version, name), chunks in sorted(parts.items())
    ]


async def detect_flavour(conn: asyncpg.Connection) -> Flavour:
    """TimescaleDB when the server offers the extension, plain PostgreSQL otherwise."""
    available = await conn.fetchval(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    return "timescaledb" if available else "postgres"


async def migrate(dsn: str, flavour: Flavour | None = None) -> list[Migration]:
    """Apply pending migrations; return those applied by this call."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            return await _migrate_locked(conn, flavour)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _migrate_locked(conn: asyncpg.Connection, flavour: Flavour | None) -> list[Migration]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer PRIMARY KEY,
               name       text NOT NULL,
               flavour    text NOT NULL,
               checksum   text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    applied = {r["version"]: r for r in await conn.fetch("SELECT * FROM schema_migrations")}
    if flavour is None:
        flavours = {r["flavour"] for r in applied.values()}
        flavour = flavours.pop() if flavours else await detect_flavour(conn)
    if flavour == "timescaledb":
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    done = []
    for mig in migrations(flavour):
        row = applied.get(mig.version)
        if row is not None:
            if row["checksum"] != mig.checksum:
                raise MigrationError(
                    f"migration {mig.version:04d}_{mig.name} changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        async with conn.transaction():
            await conn.execute(mig.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, flavour, checksum) "
                "VALUES ($1, $2, $3, $4)",
                mig.version,
                mig.name,
                flavour,
                mig.checksum,
            )
        done.append(mig)
    return done


async def applied_versions(dsn: str) -> list[tuple[int, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT version, name, flavour FROM schema_migrations ORDER BY version"
        )
    finally:
        await conn.close()
    return [(r["version"], r["name"], r["flavour"]) for r in rows]
