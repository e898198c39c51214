"""Fixtures: a migrated database of the test's own, a connection to it, a capturing receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from ingest.alerts.tests.helpers import add_pumps
from pumpfleet import schema


@pytest.fixture
async def db(database_url: str) -> str:
    await schema.migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await add_pumps(conn, [("P-1", "north"), ("P-2", "north"), ("P-3", "south")])
    finally:
        await conn.close()
    return database_url


@pytest.fixture
async def conn(db: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db)
    try:
        yield c
    finally:
        await c.close()
