"""sequence_gap: seqs skipped on the way (data lost), after a grace for late arrivals.

A seq still missing 30 min after a later one arrived is lost (low); late arrivals fill a gap
silently. The alert ends when every lost message turns up, or 6 h after the last loss. A gap
larger than 64 seqs is lost at once (a late arrival from it is ignored). The seq an agent
reserves for its last will (online status + 1) is not a gap. Works on every pump family.

The 30 min are counted on the pump's own readings (the newest telemetry's device time), not on
its events or the fleet's clock: the ingesters' urgent lane stores an event at once while the
readings before it may still wait in the main lane's backlog, so an event (or another pump's
reading) saying time has passed proves nothing lost. For the same reason a large gap that an
event opens is kept as one range (not lost at once): the backlog behind it fills it, and what
is still missing once the pump's readings are 30 min past the event is lost.
"""

from __future__ import annotations

from typing import Any

from ingest.rules._facts import ABSENT, INF, Pump, Rule, Verdict
from pumpfleet.contract import Message, Status
from pumpfleet.findings import Priority

NEW, LATE, SEEN = 0, 1, 2
"""What a seq means: newer than all before, a late arrival filling a gap, or already seen."""


class Gaps:
    __slots__ = (
        "fig",
        "loss_until_s",
        "lost",
        "lost_count",
        "max_lost_seq",
        "missing",
        "span",
        "span_filled",
        "will_seq",
    )

    def __init__(self) -> None:
        self.missing: dict[int, float] = {}
        self.lost: set[int] = set()
        self.lost_count = 0
        self.fig: tuple[int, int] = (0, 0)
        self.loss_until_s = -INF
        self.max_lost_seq = -1
        self.will_seq = -1
        self.span: tuple[int, int, float] | None = None
        """A large gap an event opened: (first seq, end seq, when), filled by what arrives."""
        self.span_filled = 0


def gaps(p: Pump) -> Gaps:
    g = p.state.get("gaps")
    if g is None:
        g = p.state["gaps"] = Gaps()
    return g


def accept(p: Pump, seq: int, t: float, event: bool = False) -> int:
    """Track seqs: open a gap when some are skipped, fill it when they arrive late, and drop
    what was already seen (redeliveries never count twice). `event`: the message may have
    overtaken the pump's readings (the urgent lane)."""
    if seq > p.max_seq:
        if p.max_seq >= 0 and seq > p.max_seq + 1:
            _open(p, p.max_seq + 1, seq, t, event)
        p.max_seq = seq
        return NEW
    g = p.state.get("gaps")
    if g is not None:
        span = g.span
        if span is not None and span[0] <= seq < span[1]:
            g.span_filled += 1
            return LATE
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
    if g.span is not None and g.span[1] > seq + 1:
        return False
    return not any(s > seq for s in g.missing) and g.max_lost_seq < seq


def _open(p: Pump, first: int, end: int, t: float, event: bool = False) -> None:
    th = p.th
    g = gaps(p)
    if event and end - first > th.sequence_gap_max_tracked - len(g.missing):
        _close_span(g, t, th)  # a second one before the first was judged: judge it now
        g.span, g.span_filled = (first, end, t), 0
        return
    if end - first > th.sequence_gap_max_tracked - len(g.missing):
        _lose(g, list(range(first, end)), t, th, remember=False)
    else:
        for s in range(first, end):
            if s != g.will_seq:
                g.missing[s] = t


def _close_span(g: Gaps, t: float, th: Any) -> None:
    """Lose what of the span never arrived (a count: its seqs are not remembered)."""
    span = g.span
    if span is None:
        return
    g.span = None
    missing = span[1] - span[0] - g.span_filled
    if missing > 0:
        _lose(g, list(range(span[1] - missing, span[1])), t, th, remember=False)


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
        cutoff = min(t, p.tel_s) - th.sequence_gap_grace_s  # the pump's readings' clock
        if g.missing:
            expired = sorted(s for s, seen in g.missing.items() if seen <= cutoff)
            for s in expired:
                del g.missing[s]
            _lose(g, expired, t, th)
        if g.span is not None and g.span[2] <= cutoff:
            _close_span(g, t, th)
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
        if g.span is not None:
            due = min(due, g.span[2] + p.th.sequence_gap_grace_s)
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
            g.span = None

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        g = gaps(p)
        first, last = g.fig
        details = {"lost_messages": g.lost_count, "first_seq": first, "last_seq": last}
        if not active:
            return "No messages lost recently", details
        return f"{g.lost_count} message(s) lost on the way (seq {first}-{last})", details
