"""pocket_fill and refill_discrepancy: reconciliation at every refill.

At a refill the clinician withdraws what is left (`withdrawn_ml`, entered, +-0.3 mL or so of
reading error) and the pump says what it expected to hold (`expected_ml`). Over-infusion,
under-infusion, occlusion and a pocket fill at the previous refill all leave a discrepancy
d = expected - withdrawn; on a calculated-volume pump this is the only place they show.

- The labelled accuracy (+-14.5 %) compounds over the volume infused since the previous refill
  (I = previous reservoir_after - expected), so d fires (medium) only outside
  max(2 mL, 14.5 % x I): a 40 mL pump with a +8 % bias (3 mL on 38 mL infused) stays silent.
  The first refill seen has no I: it assumes the pump was filled to capacity (the largest I, the
  widest limit).
- Each clean refill teaches the pump's own bias b = d / I. Once two are known, a refill whose d
  departs from b x I by more than max(2 mL, 6 % x I) fires too: a change inside the label.
- Two discrepant refills in a row: high. A bias moving one way over three refills by more than
  4 points (and more than the entry error could make it): low (a drift).

pocket_fill: drug injected that the reservoir does not hold went beside the pump. Judged at the
refill where the pump measures the volume after it (`reservoir_after_source: measured`; a v1
event's volume after was entered): injected - after > 1 mL (20 mL pump) or 2 mL (40 mL). A
calculated-volume pump takes the entered volume on trust, so a pocket fill there is invisible at
the refill; it shows at the next refill's reconciliation as d about equal to the pocket volume
(refill_discrepancy, which says so), or clinically.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from ingest.rules._facts import ABSENT, Pump, Rule, Verdict
from pumpfleet.contract import Message, Refill
from pumpfleet.findings import Priority

_HISTORY = 8
_MIN_INFUSED_FOR_BIAS_ML = 5.0


class RefillBook:
    """Per-pump refill history: shared by refill_discrepancy, pocket_fill and refill_due."""

    __slots__ = (
        "after_ml",
        "biases",
        "clean",
        "discrepant",
        "fig",
        "last_seq",
        "pocket",
        "verdict",
    )

    def __init__(self) -> None:
        self.after_ml: float | None = None
        self.biases: list[float] = []
        """b = d / I of refills with a known I, newest last."""
        self.clean: list[bool] = []
        """Whether each of those refills was within limits (only clean ones teach the bias)."""
        self.discrepant = 0
        self.fig: dict[str, Any] = {}
        self.last_seq = -1
        self.pocket: dict[str, Any] | None = None
        self.verdict: str | None = None
        """'discrepant', 'drift' or None, for the newest refill."""

    def learned_bias(self, th: Any) -> float | None:
        clean = [b for b, ok in zip(self.biases, self.clean, strict=True) if ok]
        if len(clean) < th.refill_bias_min_refills:
            return None
        return sum(clean) / len(clean)


def _book(p: Pump) -> RefillBook:
    book = p.state.get("refill")
    if book is None:
        book = p.state["refill"] = RefillBook()
    return book


def history(p: Pump) -> tuple[float | None, float | None]:
    """(volume after the last refill seen, learned bias) for refill_due."""
    book = p.state.get("refill")
    if book is None:
        return None, None
    return book.after_ml, book.learned_bias(p.th)


def pocket_limit_ml(capacity_ml: float | None, injected_ml: float, th: Any) -> float:
    """1 mL for a 20 mL pump, 2 mL for a 40 mL one; an unknown size is guessed from the
    injection (more than fits a small pump means a large one)."""
    if capacity_ml is None:
        capacity_ml = math.inf if injected_ml > th.small_reservoir_max_ml else 0.0
    return (
        th.pocket_fill_small_ml
        if capacity_ml <= th.small_reservoir_max_ml
        else th.pocket_fill_large_ml
    )


def reconcile(book: RefillBook, m: Refill, capacity_ml: float | None, th: Any) -> dict[str, Any]:
    """Judge one refill against the label and the pump's learned bias; update the book."""
    d = m.expected_ml - m.withdrawn_ml
    if book.after_ml is not None:
        infused, infused_from = book.after_ml - m.expected_ml, "previous refill"
    elif capacity_ml is not None:
        infused, infused_from = capacity_ml - m.expected_ml, "assumed full"
    else:
        infused, infused_from = None, "unknown"
    limit = th.refill_discrepancy_ml
    if infused is not None and infused > 0:
        entry_ml = th.refill_entry_allowance_sd * th.refill_entry_sd_ml
        limit = max(limit, th.refill_discrepancy_fraction * infused + entry_ml)
    outside = abs(d) > limit
    bias = book.learned_bias(th)
    change_limit = None
    changed = False
    if bias is not None and infused is not None and infused > 0:
        change_limit = max(th.refill_discrepancy_ml, th.refill_change_fraction * infused)
        changed = abs(d - bias * infused) > change_limit
    discrepant = outside or changed
    book.discrepant = book.discrepant + 1 if discrepant else 0
    if (
        infused_from == "previous refill"
        and infused is not None
        and infused >= _MIN_INFUSED_FOR_BIAS_ML
    ):
        book.biases.append(d / infused)
        book.clean.append(not discrepant)
        del book.biases[:-_HISTORY]
        del book.clean[:-_HISTORY]
    drift = None
    n = th.refill_drift_refills
    if len(book.biases) >= n and infused:
        last = book.biases[-n:]
        steps = [b - a for a, b in itertools.pairwise(last)]
        moved = last[-1] - last[0]
        noise = 4 * th.refill_entry_sd_ml * math.sqrt(2) / infused
        one_way = all(s > 0 for s in steps) or all(s < 0 for s in steps)
        if one_way and abs(moved) >= max(th.refill_drift_fraction, noise):
            drift = round(moved * 100, 1)
    book.verdict = "discrepant" if discrepant else "drift" if drift is not None else None
    book.after_ml = m.reservoir_after_ml
    book.fig = {
        "expected_ml": m.expected_ml,
        "withdrawn_ml": m.withdrawn_ml,
        "discrepancy_ml": round(d, 2),
        "limit_ml": round(limit, 2),
        "infused_since_last_refill_ml": round(infused, 2) if infused is not None else None,
        "infused_from": infused_from,
        "learned_bias_pct": round(bias * 100, 1) if bias is not None else None,
        "change_limit_ml": round(change_limit, 2) if change_limit is not None else None,
        "outside_label": outside,
        "departs_from_bias": changed,
        "consecutive_refills": book.discrepant,
        "drift_pct_points": drift,
    }
    return book.fig


class RefillDiscrepancy(Rule):
    name = "refill_discrepancy"

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        if not isinstance(msg, Refill):
            return
        book = _book(p)
        if msg.seq <= book.last_seq:
            return  # an older refill arriving late: the newer one already judged
        book.last_seq = msg.seq
        capacity = p.profile.reservoir_capacity_ml if p.profile else None
        capacity = capacity or p.capacity_ml
        reconcile(book, msg, capacity, p.th)
        limit = pocket_limit_ml(capacity, msg.injected_ml, p.th)
        gap = msg.injected_ml - msg.reservoir_after_ml
        # v1 said "entered after refill": only a v2 pump that measured it can be judged here.
        measured = msg.reservoir_after_source == "measured"
        book.pocket = (
            {
                "injected_ml": msg.injected_ml,
                "reservoir_after_ml": msg.reservoir_after_ml,
                "gap_ml": round(gap, 2),
                "limit_ml": limit,
            }
            if measured and gap > limit
            else None
        )

    def judge(self, p: Pump, t: float) -> Verdict:
        book = p.state.get("refill")
        if book is None or book.verdict is None:
            return ABSENT
        th = p.th
        key = book.last_seq
        if book.verdict == "drift":
            return Verdict(th.refill_drift_priority, key=key)
        if book.discrepant >= 2:
            return Verdict(th.refill_discrepancy_repeated_priority, key=key)
        return Verdict(th.refill_discrepancy_priority, key=key)

    def restore(self, p: Pump, priority: Priority, since_s: float) -> None:
        book = _book(p)
        th = p.th
        if priority == th.refill_drift_priority:
            book.verdict = "drift"
        else:
            book.verdict = "discrepant"
            repeated = priority == th.refill_discrepancy_repeated_priority
            book.discrepant = max(book.discrepant, 2 if repeated else 1)

    def reset(self, p: Pump) -> None:
        book = p.state.get("refill")
        if book is not None:
            book.last_seq = -1

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        book = _book(p)
        fig = dict(book.fig)
        if not active:
            return "Refill matched the expected volume", fig
        d = fig.get("discrepancy_ml", 0.0)
        text = (
            f"Refill discrepancy: expected {fig.get('expected_ml', 0):.2f} mL, withdrew "
            f"{fig.get('withdrawn_ml', 0):.2f} mL ({d:+.2f} mL, limit "
            f"{fig.get('limit_ml', 0):g} mL)"
        )
        if book.verdict == "drift":
            text = (
                f"Refill drift: the pump's bias moved {fig.get('drift_pct_points')} points over "
                f"{p.th.refill_drift_refills} refills (each within the label)"
            )
        elif fig.get("departs_from_bias"):
            text += f"; departs from the pump's own bias ({fig.get('learned_bias_pct')} %)"
        if book.verdict == "discrepant" and d > 0:
            text += (
                "; less drug left than expected: over-infusion, a leak, or a pocket fill at the "
                "previous refill"
            )
        elif book.verdict == "discrepant" and d < 0:
            text += "; more drug left than expected: under-infusion or occlusion"
        if book.discrepant >= 2:
            text += f"; {book.discrepant} refills in a row"
        return text, fig


class PocketFill(Rule):
    name = "pocket_fill"

    def judge(self, p: Pump, t: float) -> Verdict:
        book = p.state.get("refill")
        if book is None or book.pocket is None:
            return ABSENT
        return Verdict(p.th.pocket_fill_priority, key=book.last_seq)

    def restore(self, p: Pump, priority: Priority, since_s: float) -> None:
        book = _book(p)
        if book.pocket is None:
            book.pocket = {}

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        fig = dict(_book(p).pocket or {})
        if not active:
            return "Refill without pocket fill: the previous one is resolved", fig
        return (
            f"Suspected pocket fill: {fig.get('injected_ml', 0):.1f} mL injected but the reservoir "
            f"holds {fig.get('reservoir_after_ml', 0):.1f} mL ({fig.get('gap_ml', 0):.1f} mL "
            f"unaccounted, limit {fig.get('limit_ml', 0):.1f} mL)",
            fig,
        )
