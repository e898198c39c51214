"""docs/safety.md agrees with the rule catalogue: one row per rule, the priorities each rule can
raise, and tests that exist.

The priorities of a rule are the defaults of its `*_priority` fields in `Thresholds`;
PRIORITY_FIELDS below says which fields belong to which rule. A new rule, a new priority field
or a changed default fails here until the document (and, for a new field, PRIORITY_FIELDS) says
so.
"""

from __future__ import annotations

import inspect
import re
from functools import cache
from pathlib import Path

import pytest

from ingest import RuleEngine, Thresholds
from pumpfleet.findings import PRIORITY_RANK, RULES, SERVICE_RULE_PRIORITY, SERVICE_RULES

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "safety.md"
COLUMNS = (
    "rule",
    "hazard (domain.md)",
    "priority",
    "data it needs",
    "pump families",
    "known blind spots",
    "tests",
)
TEST_DIRS = ("tests", "ingest", "sim_fleet")

PRIORITY_FIELDS: dict[str, tuple[str, ...]] = {
    "critical_pump_alarm": ("critical_priority",),
    "noncritical_pump_alarm": ("noncritical_priority",),
    "over_infusion": ("over_infusion_priority",),
    "under_infusion": ("under_infusion_priority",),
    "pocket_fill": ("pocket_fill_priority",),
    "refill_discrepancy": (
        "refill_discrepancy_priority",
        "refill_discrepancy_repeated_priority",
        "refill_drift_priority",
    ),
    "post_mri": ("post_mri_low_priority", "post_mri_medium_priority", "post_mri_priority"),
    "low_reservoir": ("low_reservoir_priority",),
    "refill_due": ("refill_due_medium_priority", "refill_due_high_priority"),
    "battery": ("battery_eri_priority", "battery_eos_priority"),
    "large_dose_change": ("large_dose_change_priority",),
    "telemetry_silence": ("silence_low_priority", "silence_medium_priority"),
    "sequence_gap": ("sequence_gap_priority",),
    "flow_not_observable": ("notice_priority",),
    "clinic_data_missing": ("notice_priority",),
}
"""Rule -> the Thresholds fields whose values are the priorities it raises."""

_BACKTICKED_LIST = re.compile(r"`[a-z]+`(, `[a-z]+`)*")
_RULE_CELL = re.compile(r"`([a-z_]+)`")
_TEST_NAME = re.compile(r"`(test_\w+)`")
_PRIORITY_ATTR = re.compile(r"\.(\w+_priority)\b")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@cache
def table() -> tuple[tuple[str, ...], list[list[str]]]:
    """(header, rows) of the one table whose header row starts with `| rule |`."""
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing: write the safety document"
    lines = DOC.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("| rule |")]
    assert len(starts) == 1, (
        f"docs/safety.md: expected exactly one table whose header starts with '| rule |', "
        f"found {len(starts)}"
    )
    start = starts[0]
    header = tuple(_cells(lines[start]))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return header, rows


def doc_rows() -> dict[str, list[str]]:
    """Rule name -> its row (first occurrence)."""
    out: dict[str, list[str]] = {}
    for row in table()[1]:
        m = _RULE_CELL.fullmatch(row[0])
        if m:
            out.setdefault(m.group(1), row)
    return out


@cache
def defined_functions() -> frozenset[str]:
    names: set[str] = set()
    pattern = re.compile(r"^\s*(?:async\s+)?def\s+(\w+)\(", re.MULTILINE)
    for top in TEST_DIRS:
        for path in (ROOT / top).rglob("*.py"):
            if ".venv" in path.parts:
                continue
            names.update(pattern.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(names)


def test_the_table_has_the_agreed_columns_and_rows_of_that_width() -> None:
    header, rows = table()
    assert header == COLUMNS, (
        f"docs/safety.md: the rule table's columns are {list(header)}, expected {list(COLUMNS)}"
    )
    for row in rows:
        assert len(row) == len(COLUMNS), (
            f"docs/safety.md: row {row[0]!r} has {len(row)} cells, expected {len(COLUMNS)} "
            "(a '|' inside a cell splits it)"
        )


def test_every_rule_of_the_catalogue_has_exactly_one_row() -> None:
    _, rows = table()
    names = []
    for row in rows:
        m = _RULE_CELL.fullmatch(row[0])
        assert m, f"docs/safety.md: first cell {row[0]!r} must be the rule name in backticks"
        names.append(m.group(1))
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"docs/safety.md: rules listed more than once: {twice}"
    missing = sorted(set(RULES) - set(names))
    assert not missing, (
        f"docs/safety.md: add a row for rules in pumpfleet.findings.RULES: {missing}"
    )
    unknown = sorted(set(names) - set(RULES))
    assert not unknown, (
        f"docs/safety.md: rows for rules not in pumpfleet.findings.RULES (remove or rename): "
        f"{unknown}"
    )


def test_every_cell_is_filled() -> None:
    for row in table()[1]:
        for column, cell in zip(COLUMNS, row, strict=False):
            assert cell and cell not in {"-", "—"}, (
                f"docs/safety.md: rule {row[0]} has an empty {column!r} cell: say what it is"
            )


def test_the_priority_mapping_covers_every_rule_and_every_priority_field() -> None:
    assert set(PRIORITY_FIELDS) == set(RULES), (
        "tests/test_safety_doc.py: PRIORITY_FIELDS must name exactly the rules in "
        f"pumpfleet.findings.RULES; missing {sorted(set(RULES) - set(PRIORITY_FIELDS))}, "
        f"unknown {sorted(set(PRIORITY_FIELDS) - set(RULES))}"
    )
    fields = {name for name in Thresholds.model_fields if name.endswith("_priority")}
    mapped = {f for names in PRIORITY_FIELDS.values() for f in names}
    unmapped = sorted(fields - mapped)
    assert not unmapped, (
        f"Thresholds has priority fields no rule claims: {unmapped}; add them to "
        "PRIORITY_FIELDS in tests/test_safety_doc.py and their priorities to docs/safety.md"
    )
    stale = sorted(mapped - fields)
    assert not stale, (
        f"tests/test_safety_doc.py: PRIORITY_FIELDS names fields Thresholds does not have: {stale}"
    )


def test_the_priority_mapping_is_what_each_rule_reads() -> None:
    """Each rule class reads exactly the priority fields PRIORITY_FIELDS gives it."""
    by_name = {rule.name: rule for rule in RuleEngine().rules}
    for name, expected in PRIORITY_FIELDS.items():
        assert name in by_name, f"RuleEngine has no rule named {name!r}"
        source = inspect.getsource(type(by_name[name]))
        read = set(_PRIORITY_ATTR.findall(source))
        assert read == set(expected), (
            f"rule {name} ({type(by_name[name]).__name__}) reads priority fields {sorted(read)}, "
            f"PRIORITY_FIELDS in tests/test_safety_doc.py says {sorted(expected)}: update the "
            "mapping, then docs/safety.md"
        )


@pytest.mark.parametrize("rule", RULES)
def test_each_rows_priorities_are_the_catalogues(rule: str) -> None:
    row = doc_rows().get(rule)
    assert row is not None, f"docs/safety.md: no row for rule {rule}"
    cell = row[COLUMNS.index("priority")]
    assert _BACKTICKED_LIST.fullmatch(cell), (
        f"docs/safety.md: rule {rule}: write priorities as backticked words separated by ', ' "
        f"(e.g. `medium`, `high`), not {cell!r}"
    )
    listed = re.findall(r"`([a-z]+)`", cell)
    assert len(listed) == len(set(listed)), (
        f"docs/safety.md: rule {rule} lists a priority twice: {cell}"
    )
    bad = sorted(set(listed) - set(PRIORITY_RANK))
    assert not bad, (
        f"docs/safety.md: rule {rule} lists {bad}, not IEC 60601-1-8 levels {list(PRIORITY_RANK)}"
    )
    fields = Thresholds.model_fields
    catalogue = {fields[f].default for f in PRIORITY_FIELDS[rule]}
    assert set(listed) == catalogue, (
        f"docs/safety.md: rule {rule} lists priorities {sorted(set(listed))}, the catalogue says "
        f"{sorted(catalogue)} (defaults of Thresholds {', '.join(PRIORITY_FIELDS[rule])})"
    )


@pytest.mark.parametrize("rule", RULES)
def test_each_rows_tests_exist(rule: str) -> None:
    row = doc_rows().get(rule)
    assert row is not None, f"docs/safety.md: no row for rule {rule}"
    names = _TEST_NAME.findall(row[COLUMNS.index("tests")])
    assert names, (
        f"docs/safety.md: rule {rule} lists no tests: name the test functions that prove it, "
        "in backticks"
    )
    missing = sorted(set(names) - defined_functions())
    assert not missing, (
        f"docs/safety.md: rule {rule} lists tests that no file under "
        f"{', '.join(TEST_DIRS)}/ defines: {missing} (renamed or removed? update the row)"
    )


def test_tests_named_outside_the_table_exist_too() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = sorted(set(_TEST_NAME.findall(text)) - defined_functions())
    assert not missing, f"docs/safety.md names tests that do not exist: {missing}"


def test_the_alerts_the_service_raises_itself_have_their_rows_too() -> None:
    """`pumpfleet.findings.SERVICE_RULES` (not the engine's): one row each in the `| alert |` table,
    with the catalogue's priority and tests that exist."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("| alert |")]
    assert len(starts) == 1, "docs/safety.md: expected one table whose header starts '| alert |'"
    header = _cells(lines[starts[0]])
    rows = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), f"docs/safety.md: {cells[0]} has {len(cells)} cells"
        rows[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    assert set(rows) == set(SERVICE_RULES)
    for name, row in rows.items():
        assert re.findall(r"`([a-z]+)`", row["priority"]) == [SERVICE_RULE_PRIORITY[name]]
        names = _TEST_NAME.findall(row["tests"])
        assert names and not set(names) - defined_functions(), f"{name}: tests {names}"
