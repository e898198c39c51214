"""low_reservoir and refill_due: how long the drug lasts.

low_reservoir needs the reported volume (either source) and the alarm volume (the clinic's, never
below the pump's own, at least 4 mL for a high-risk patient), or the pump's low-reservoir alarm.

refill_due projects from the programmed schedule plus the patient boluses actually taken, with
the labelled accuracy as a margin twice over: on a calculated volume the pump's estimate may be
high by up to 14.5 % of what it infused since the refill (the worst case is taken, so a pump
with a +12 % bias is warned well before it really runs dry), and the flow may be 14.5 % faster
than programmed. Once refills have taught the engine the pump's own bias (refill
reconciliation), that bias plus a 5-point margin replaces the label where it is narrower. A
measured volume needs only the flow margin.
"""

from __future__ import annotations

import math
from typing import Any

from ingest.rules._facts import ABSENT, DAY_S, Pump, Rule, Verdict
from pumpfleet.contract import Bolus, Message, PumpAlarm, ReservoirSource
from pumpfleet.findings import Priority

LEARNED_BIAS_MARGIN = 0.05
"""Added to a learned bias before it replaces the labelled accuracy (design choice)."""


class LowReservoir(Rule):
    name = "low_reservoir"
    off_attr = "low_reservoir_off_s"

    def judge(self, p: Pump, t: float) -> Verdict:
        th = p.th
        low = PumpAlarm.LOW_RESERVOIR in p.alarms
        if not low and p.tel is not None and p.alarm_ml is not None:
            margin = th.low_reservoir_clear_margin_ml if p.priority(self.name) else 0.0
            low = p.tel.reservoir_ml <= p.alarm_ml + margin + 1e-9
        if not low:
            return ABSENT
        return Verdict(th.low_reservoir_priority, th.low_reservoir_on_s, th.low_reservoir_off_s)

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        alarm_ml = p.alarm_ml or 0.0
        res = p.tel.reservoir_ml if p.tel is not None else None
        details: dict[str, Any] = {
            "reservoir_ml": res,
            "alarm_ml": alarm_ml,
            "alarm_ml_from": p.alarm_from,
            "pump_alarm": PumpAlarm.LOW_RESERVOIR in p.alarms,
        }
        if res is None:
            if active:
                return "Pump raised its low-reservoir alarm (no reading yet)", details
            return "Pump cleared its low-reservoir alarm", details
        if not active:
            return f"Reservoir {res:.1f} mL, above alarm volume {alarm_ml:.1f} mL", details
        return f"Reservoir {res:.1f} mL at or below alarm volume {alarm_ml:.1f} mL", details


_Projection = tuple[float, float, float, float, float, float, bool]
"""days, reservoir, worst case, alarm volume, daily volume, margin, bias learned"""


def _figures(raw: _Projection) -> dict[str, Any]:
    days, res, worst_ml, alarm_ml, daily_ml, margin, learned = raw
    return {
        "days_to_alarm": days,
        "reservoir_ml": res,
        "worst_case_ml": round(worst_ml, 2),
        "alarm_ml": alarm_ml,
        "daily_ml": round(daily_ml, 4),
        "margin_pct": round(margin * 100, 1),
        "margin_from": "learned bias" if learned else "label",
    }


class _Due:
    __slots__ = ("bolus_ml", "bolus_s", "fig")

    def __init__(self) -> None:
        self.bolus_ml = 0.0
        self.bolus_s = 0.0
        self.fig: _Projection | None = None


class RefillDue(Rule):
    name = "refill_due"
    off_attr = "refill_due_off_s"

    def __init__(self, refill_history: Any) -> None:
        self._history = refill_history
        """history(p) -> (last_after_ml or None, learned bias or None)."""

    def _st(self, p: Pump) -> _Due:
        st = p.state.get(self.name)
        if st is None:
            st = p.state[self.name] = _Due()
        return st

    def _bolus_ml(self, st: _Due, p: Pump, t: float) -> float:
        if st.bolus_ml <= 0:
            return 0.0
        return st.bolus_ml * math.exp(-max(0.0, t - st.bolus_s) / p.th.bolus_average_s)

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        if isinstance(msg, Bolus) and msg.source == "patient" and p.conc:
            st = self._st(p)
            st.bolus_ml = self._bolus_ml(st, p, t) + msg.dose_mcg / p.conc
            st.bolus_s = t

    def _project(self, p: Pump, t: float) -> _Projection | None:
        """Days until the worst-case volume reaches the alarm volume, and the numbers behind
        it (at every reading; made into figures only when a finding is reported)."""
        tel = p.tel
        if tel is None or p.alarm_ml is None or p.dose is None:
            return None
        th = p.th
        st = self._st(p)
        bolus_per_day = self._bolus_ml(st, p, t) / th.bolus_average_s * DAY_S
        daily_ml = p.dose / tel.concentration_mcg_per_ml + bolus_per_day
        if daily_ml <= 0:
            return None
        last_after, bias = self._history(p)
        # A learned bias may only narrow the label's margin: a pump beyond the label is
        # refill_discrepancy's to report, and a clinic books refills by the label.
        margin = th.flow_accuracy
        if bias is not None:
            margin = min(margin, max(0.0, bias) + LEARNED_BIAS_MARGIN)
        res = tel.reservoir_ml
        infused = 0.0
        if tel.source is ReservoirSource.CALCULATED:
            # The estimate errs by the pump's bias times what it infused since the refill;
            # unknown refill: at most the capacity was in it.
            start = last_after if last_after is not None else tel.reservoir_capacity_ml
            infused = max(0.0, start - res)
        worst_ml = res - margin * infused
        worst_daily_ml = daily_ml * (1.0 + margin)
        days = (worst_ml - p.alarm_ml) / worst_daily_ml
        return days, res, worst_ml, p.alarm_ml, daily_ml, margin, bias is not None

    def judge(self, p: Pump, t: float) -> Verdict:
        raw_fig = self._project(p, t)
        if raw_fig is None:
            return ABSENT
        th = p.th
        self._st(p).fig = raw_fig
        days = raw_fig[0]
        current = p.priority(self.name)
        margin = th.refill_due_clear_margin_days
        raw: Priority | None = None
        if days <= th.refill_due_high_days or (
            current == th.refill_due_high_priority and days <= th.refill_due_high_days + margin
        ):
            raw = th.refill_due_high_priority
        elif days <= th.refill_due_medium_days or (
            current is not None and days <= th.refill_due_medium_days + margin
        ):
            raw = th.refill_due_medium_priority
        if raw is None:
            return ABSENT
        return Verdict(raw, th.refill_due_on_s, th.refill_due_off_s)

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        raw_fig = self._st(p).fig
        fig = _figures(raw_fig) if raw_fig else {}
        days = fig.get("days_to_alarm")
        if days is not None:
            fig["days_to_alarm"] = round(days, 2)
        if not active:
            return "Refill no longer due within the week", fig
        return (
            f"Refill due: reservoir reaches alarm volume {fig.get('alarm_ml', 0):.1f} mL in "
            f"{max(days or 0.0, 0.0):.1f} days at worst ({fig.get('reservoir_ml', 0):.2f} mL "
            f"reported, {fig.get('daily_ml', 0):.3f} mL/day, margin {fig.get('margin_pct')} %)",
            fig,
        )
