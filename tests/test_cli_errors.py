"""Every error a user can cause ends in one line saying what and how to fix, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from pumpfleet.cli import main


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("pumpfleet: ")
    return err


def test_a_database_url_that_is_not_postgresql(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUMPFLEET_DATABASE_URL", "mysql://x@127.0.0.1/y")
    err = _one_line(capsys, ["db", "migrate"])
    assert "not a PostgreSQL URL" in err and "PUMPFLEET_DATABASE_URL" in err


def test_a_pumpfleet_toml_that_does_not_parse(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = tmp_path / "pumpfleet.toml"
    bad.write_text("[ingest\n")
    monkeypatch.setenv("PUMPFLEET_CONFIG", str(bad))
    err = _one_line(capsys, ["db", "migrate"])
    assert "does not parse" in err and "line 1" in err


@pytest.mark.parametrize(("make", "what"), [("missing", "no such file"), ("dir", "a directory")])
def test_a_file_argument_that_is_missing_or_a_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make: str, what: str
) -> None:
    path = tmp_path / "payload.json"
    if make == "dir":
        path.mkdir()
    err = _one_line(capsys, ["contract", "validate", "pumps/P-1/telemetry", str(path)])
    assert what in err and str(path) in err


def test_a_database_never_migrated(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    monkeypatch.setenv("PUMPFLEET_DATABASE_URL", database_url)
    err = _one_line(capsys, ["alerts", "list"])
    assert "pumpfleet db migrate" in err


def test_a_broker_url_that_is_not_a_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUMPFLEET_MQTT__URL", "notaurl")
    err = _one_line(capsys, ["ingest"])
    assert "not mqtt://host:port" in err and "PUMPFLEET_MQTT__URL" in err


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (["alerts", "list", "--priority", "urgent"], "'--priority'"),
        (["alerts", "list", "--prio", "high"], "--prio"),
        (["sim", "run"], "SCENARIO"),
        (["agent", "--pump-id", "P-1", "--start", "2026-01-01"], "needs a UTC offset"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_a_bad_command_line(capsys: pytest.CaptureFixture[str], argv: list[str], what: str) -> None:
    err = _one_line(capsys, argv)
    assert what in err and "--help`" in err, err
