"""`pumpfleet alerts list|show|ack|resolve` against real PostgreSQL: output and one-line errors."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
import pytest

from ingest.alerts._book import Book, BookPolicy
from ingest.alerts.tests.helpers import finding
from pumpfleet.cli import main

pytestmark = pytest.mark.integration


async def _seed(db: str) -> list[int]:
    conn = await asyncpg.connect(db)
    try:
        book = Book(BookPolicy())
        ids = []
        for f in (
            finding("P-1", rule="low_reservoir", priority="medium", reservoir_ml=1.9),
            finding("P-2", rule="over_infusion", priority="high", minutes=1, excess_pct=22.5),
            finding("P-3", rule="sequence_gap", priority="low", minutes=2, missing=3),
        ):
            (t,) = await book.apply(conn, [f])
            ids.append(t.alert.alert_id)
        await book.apply(conn, [finding("P-3", rule="sequence_gap", active=False, minutes=3)])
        return ids
    finally:
        await conn.close()


@pytest.fixture
def cli_env(db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    monkeypatch.setenv("PUMPFLEET_DATABASE_URL", db)
    monkeypatch.setenv("PUMPFLEET_RUN_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setenv("PUMPFLEET_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PUMPFLEET_ALERTS__WEBHOOK_URL", "http://127.0.0.1:9/hook")
    return asyncio.run(_seed(db))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(["alerts", *argv])
    out, err = capsys.readouterr()
    # rich pads each cell to its column's width, the last column's too
    return code, [line.rstrip() for line in out.splitlines()], err


def test_list_is_an_aligned_table_most_urgent_first(
    cli_env: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    low_reservoir, over_infusion, gap = cli_env
    code, lines, _ = run(capsys, "list")
    assert code == 0
    assert lines[0].split() == [
        "ID",
        "PRIORITY",
        "PUMP",
        "RULE",
        "PHASE",
        "STARTED",
        "ACKED",
        "ENDED",
        "SUMMARY",
    ]
    assert [int(line.split()[0]) for line in lines[1:]] == [over_infusion, low_reservoir, gap]
    # Every column starts where its header does.
    for name in ("PRIORITY", "RULE", "SUMMARY"):
        col = lines[0].index(name)
        assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines[1:]), name
    assert lines[1].endswith("over_infusion on P-2") and " open " in lines[1]

    _, lines, _ = run(capsys, "list", "--open")
    assert [int(line.split()[0]) for line in lines[1:]] == [over_infusion, low_reservoir]
    _, lines, _ = run(capsys, "list", "--priority", "medium", "--pump", "P-1")
    assert [int(line.split()[0]) for line in lines[1:]] == [low_reservoir]
    _, lines, _ = run(capsys, "list", "--rule", "sequence_gap", "--limit", "1")
    assert len(lines) == 2 and "sequence_gap" in lines[1]
    _, lines, _ = run(capsys, "list", "--pump", "P-404")
    assert lines == ["no alerts match"]


def test_ack_show_resolve_and_their_errors(
    cli_env: list[int], capsys: pytest.CaptureFixture[str], db: str
) -> None:
    _, over_infusion, gap = cli_env
    code, lines, _ = run(capsys, "ack", str(over_infusion), "--by", "alice", "--note", "paged")
    assert code == 0
    assert re.fullmatch(
        rf"alert {over_infusion} acknowledged by alice at \S+ \S+Z; it stays open until its "
        "condition ends",
        lines[0],
    )
    code, _, err = run(capsys, "ack", str(over_infusion), "--by", "bob")
    assert code == 2
    assert re.fullmatch(
        rf"pumpfleet: alert {over_infusion} already acknowledged by alice at .*\n", err
    )

    code, lines, _ = run(capsys, "resolve", str(over_infusion), "--by", "bob", "--note", "fixed")
    assert code == 0 and lines[0].startswith(f"alert {over_infusion} resolved by bob at ")

    code, lines, _ = run(capsys, "show", str(over_infusion))
    assert code == 0
    fields = dict(line.split(":", 1) for line in lines[: lines.index("")])
    assert fields["pump"].strip() == "P-2 (clinic north)"
    assert fields["priority"].strip() == "high"
    assert fields["acked"].strip().startswith("alice at ")
    assert fields["ended"].strip().endswith("(resolved by bob)")
    assert fields["details"].strip() == "excess_pct=22.5"
    assert fields["notified"].strip() == "webhook 0/2 delivered"  # no notifier ran here
    history = lines[lines.index("history:") + 1 :]
    assert history[0].split() == ["AT", "PHASE", "PRIORITY", "ACTOR", "NOTE", "DETAILS"]
    assert [row.split()[2:5] for row in history[1:]] == [
        ["start", "high", "rules"],
        ["ack", "high", "alice"],
        ["end", "high", "bob"],
    ]
    assert "paged" in history[2] and "fixed" in history[3]

    for argv, message in (
        (
            ("resolve", str(gap), "--by", "bob"),
            rf"alert {gap} already ended at .* \(condition ended\)",
        ),
        (("show", "999"), "no alert 999; `pumpfleet alerts list` shows the ids"),
        (("ack", "999", "--by", "x"), "no alert 999"),
        (("ack", str(over_infusion), "--by", " "), "--by needs a name"),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == [], argv
        assert len(err.splitlines()) == 1 and re.search(message, err), (argv, err)


def test_ack_and_resolve_queue_webhook_notifications(
    cli_env: list[int], capsys: pytest.CaptureFixture[str], db: str
) -> None:
    low_reservoir = cli_env[0]
    run(capsys, "ack", str(low_reservoir), "--by", "alice")
    run(capsys, "resolve", str(low_reservoir), "--by", "alice")

    async def actions() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(db)
        try:
            rows = await conn.fetch(
                "SELECT receiver, action FROM alert_outbox WHERE alert_id = $1 ORDER BY id",
                low_reservoir,
            )
            return [tuple(r) for r in rows]
        finally:
            await conn.close()

    # Only the webhook is configured: Alertmanager gets no rows; the seed wrote none either.
    assert asyncio.run(actions()) == [("webhook", "acknowledge"), ("webhook", "resolve")]
