"""Hysteresis: a duration before starting, before ending, before de-escalating; none to escalate."""

from __future__ import annotations

from ingest.rules import Latch
from pumpfleet.findings import Priority


def test_starts_only_after_holding_for_the_on_duration() -> None:
    latch = Latch()
    assert not latch.update("high", 0.0, 600.0, 600.0)
    assert not latch.update("high", 599.0, 600.0, 600.0)
    assert latch.update("high", 600.0, 600.0, 600.0)
    assert latch.priority == "high"


def test_a_blip_shorter_than_the_on_duration_never_starts() -> None:
    latch = Latch()
    latch.update("high", 0.0, 600.0, 600.0)
    latch.update(None, 300.0, 600.0, 600.0)
    assert not latch.update("high", 700.0, 600.0, 600.0)  # the clock started again at 700
    assert latch.priority is None and not latch.idle


def test_ends_only_after_the_condition_is_gone_for_the_off_duration() -> None:
    latch = Latch()
    latch.update("medium", 0.0, 0.0, 600.0)
    assert not latch.update(None, 100.0, 0.0, 600.0)
    assert not latch.update("medium", 200.0, 0.0, 600.0)  # back: the end is cancelled
    assert not latch.update(None, 300.0, 0.0, 600.0)
    assert not latch.update(None, 800.0, 0.0, 600.0)
    assert latch.update(None, 900.0, 0.0, 600.0)
    assert latch.priority is None and latch.idle


def test_flapping_condition_gives_one_start_and_one_end() -> None:
    latch = Latch()
    changes = 0
    for i in range(100):
        raw: Priority | None = "high" if i % 2 == 0 else None
        changes += latch.update(raw, i * 60.0, 0.0, 600.0)
    for i in range(100, 112):
        changes += latch.update(None, i * 60.0, 0.0, 600.0)
    assert changes == 2


def test_escalates_at_once_and_de_escalates_after_the_off_duration() -> None:
    latch = Latch()
    latch.update("medium", 0.0, 0.0, 3600.0)
    assert latch.update("high", 10.0, 0.0, 3600.0)
    assert latch.priority == "high"
    assert not latch.update("medium", 20.0, 0.0, 3600.0)
    assert not latch.update("medium", 3000.0, 0.0, 3600.0)
    assert latch.update("medium", 3620.0, 0.0, 3600.0)
    assert latch.priority == "medium"
