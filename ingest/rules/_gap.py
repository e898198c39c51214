"""sequence_gap: seqs skipped on the way (data lost), after a grace for late arrivals.

A seq still missing 30 min after a later one arrived is lost (low); late arrivals fill a gap
silently. The alert ends when every lost message turns up, or 6 h after the last loss. A gap
larger than 64 seqs is lost at once (a late arrival from it is ignored). The seq an agent
reserves for its last will (online status + 1) is not a gap. Works on every pump family.
"""

from __future__ import annotations

from typing import Any

from ingest.findings import Priority
from ingest.rules._facts import ABSENT, INF, Pump, Rule, Verdict
from pumpfleet.contract import Message, Status

NEW, LATE, SEEN = 0, 1, 2
"""What a seq means: newer than all before, a late arrival filling a gap, or already seen."""


class Gaps:
    __slots__ = ("fig", "loss_until_s", "lost", "lost_count", "max_lost_seq", "missing", "will_seq")

    def __init__(self) -> None:
        self.missing: dict[int, float] = {}
        self.lost: set[int] = set()
        self.lost_count = 0
        self.fig: tuple[int, int] = (0, 0)
        self.loss_until_s = -INF
        self.max_lost_seq = -1
        self.will_seq = -1


def gaps(p: Pump) -> Gaps:
    g = p.state.get("gaps")
    if g is None:
        g = p.state["gaps"] = Gaps()
    return g


def accept(p: Pump, seq: int, t: float) -> int:
    """Track seqs: open a gap when some are skipped, fill it when they arrive late, and drop
    what was already seen (redeliveries never count twice)."""
    if seq > p.max_seq:
        if p.max_seq >= 0 and seq > p.max_seq + 1:
            _open(p, p.max_seq + 1, seq, t)
        p.max_seq = seq
        return NEW
    g = p.state.get("gaps")
    if g is not None:
        if seq in g.missing:
            del g.missing[seq]
            return LATE
        if seq in g.lost:
            g.lost.discard(seq)
            g.lost_count -= 1
            if g.lost_count <= 0:
                g.loss_until_s = t  # whole again: the alert may end now
            return LATE
    if t > p.last_time_s:
        return -1  # an old seq with a newer time: the agent lost its seq store
    return SEEN


def complete_since(p: Pump, seq: int) -> bool:
    """Every seq after `seq` arrived so far (nothing missing or lost after it)."""
    g = p.state.get("gaps")
    if g is None:
        return True
    return not any(s > seq for s in g.missing) and g.max_lost_seq < seq


def _open(p: Pump, first: int, end: int, t: float) -> None:
    th = p.th
    g = gaps(p)
    if end - first > th.sequence_gap_max_tracked - len(g.missing):
        _lose(g, list(range(first, end)), t, th, remember=False)
    else:
        for s in range(first, end):
            if s != g.will_seq:
                g.missing[s] = t


def _lose(g: Gaps, seqs: list[int], t: float, th: Any, remember: bool = True) -> None:
    if not seqs:
        return
    if remember:
        for s in seqs:
            if len(g.lost) < th.sequence_gap_max_tracked:
                g.lost.add(s)
    g.fig = (
        (min(g.fig[0], seqs[0]), max(g.fig[1], seqs[-1])) if g.lost_count else (seqs[0], seqs[-1])
    )
    g.lost_count += len(seqs)
    g.max_lost_seq = max(g.max_lost_seq, seqs[-1])
    g.loss_until_s = t + th.sequence_gap_active_s


class SequenceGap(Rule):
    name = "sequence_gap"
    timed = True

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        if isinstance(msg, Status) and msg.online:
            g = gaps(p)
            g.will_seq = msg.seq + 1
            g.missing.pop(g.will_seq, None)

    def judge(self, p: Pump, t: float) -> Verdict:
        g = p.state.get("gaps")
        if g is None:
            return ABSENT
        th = p.th
        if g.missing:
            cutoff = t - th.sequence_gap_grace_s
            expired = sorted(s for s, seen in g.missing.items() if seen <= cutoff)
            for s in expired:
                del g.missing[s]
            _lose(g, expired, t, th)
        if g.lost_count > 0 and t < g.loss_until_s:
            return Verdict(th.sequence_gap_priority)
        if g.lost_count > 0 and t >= g.loss_until_s:
            g.lost_count = 0
            g.lost.clear()
        return ABSENT

    def due(self, p: Pump, after_s: float) -> float:
        g = p.state.get("gaps")
        if g is None:
            return INF
        due = INF
        if g.missing:
            due = min(g.missing.values()) + p.th.sequence_gap_grace_s
        if g.lost_count > 0:
            due = min(due, g.loss_until_s)
        return due

    def restore(self, p: Pump, priority: Priority, since_s: float) -> None:
        g = gaps(p)
        g.lost_count = max(g.lost_count, 1)
        g.loss_until_s = since_s + p.th.sequence_gap_active_s

    def reset(self, p: Pump) -> None:
        g = p.state.get("gaps")
        if g is not None:
            g.missing.clear()
            g.lost.clear()
            g.max_lost_seq = -1
            g.will_seq = -1

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        g = gaps(p)
        first, last = g.fig
        details = {"lost_messages": g.lost_count, "first_seq": first, "last_seq": last}
        if not active:
            return "No messages lost recently", details
        return f"{g.lost_count} message(s) lost on the way (seq {first}-{last})", details
