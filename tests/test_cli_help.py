"""`pumpfleet --help` and every command's: the parts' commands arrive through the
`pumpfleet.commands` entry points, and each answers --help."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pumpfleet.cli import command, main


def _paths(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _paths(sub, (*path, name))


def test_every_command_answers_help(capsys: pytest.CaptureFixture[str]) -> None:
    paths = set(_paths(command()))
    parts = {("agent",), ("alerts", "ack"), ("dashboards", "build"), ("ingest",), ("alerting",)}
    assert parts | {("sim", "run"), ("db", "migrate"), ("soak",)} <= paths
    for path in sorted(paths):
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert " ".join(("Usage: pumpfleet", *path)) in out, out


def test_a_group_without_its_command_shows_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alerts"]) == 2
    out = capsys.readouterr().out
    assert "Usage: pumpfleet alerts" in out and "resolve" in out
