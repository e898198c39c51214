"""Shared fixtures for every part's tests: one real mosquitto + PostgreSQL per test session,
a fresh database per test.

Nothing is skipped when the binaries are missing: the tests fail with the StackError that says
what to install, so a CI image without them cannot pass by testing nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pumpfleet import alertmanager
from pumpfleet import stack as stack_mod
from pumpfleet.testing import Sink


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_mod.StackInfo]:
    # purge: the PostgreSQL data may live outside the tmp dir (see pumpfleet.stack), and
    # pytest's own tmp cleanup would not reach it.
    with stack_mod.running_stack(tmp_path_factory.mktemp("stack"), purge=True) as info:
        yield info


@pytest.fixture
def database_url(stack: stack_mod.StackInfo) -> Iterator[str]:
    """An empty database of its own, so tests neither see nor clean up after each other."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = stack_mod.create_database(stack, name)
    try:
        yield url
    finally:
        # A test may have stopped the database (fault tests); bring it back to drop ours.
        stack_mod.start_database(stack)
        stack_mod.drop_database(stack, name)


@pytest.fixture
def broker(stack: stack_mod.StackInfo) -> Iterator[stack_mod.StackInfo]:
    """The session's stack, with mosquitto running again after a test that stopped it."""
    stack_mod.start_broker(stack)
    try:
        yield stack
    finally:
        stack_mod.start_broker(stack)


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A local HTTP receiver that records every JSON POST (webhooks, Alertmanager)."""
    s = Sink()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def am(tmp_path: Path, sink: Sink) -> Iterator[alertmanager.Alertmanager]:
    """A real Alertmanager whose single receiver is the test's `sink`."""
    with alertmanager.running(tmp_path / "alertmanager", sink.url) as running:
        yield running
