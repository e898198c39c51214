"""large_dose_change, and the rate reset that critical_pump_alarm reports.

Needs: reprogram events and the telemetry's programmed daily dose (flex: the day's total). A
reprogram with `session: false`, or a telemetry dose that falls by more than 20 % with no
reprogram event and no seq missing before it, is a rate reset without a programming session
(domain.md: reduced battery performance). Works on every pump family.
"""

from __future__ import annotations

import math
from typing import Any

from ingest.rules._facts import ABSENT, INF, Pump, Rule, Verdict
from pumpfleet.contract import Message, Reprogram, Telemetry
from pumpfleet.findings import Priority


def change_fraction(old_mcg_per_day: float, new_mcg_per_day: float) -> float:
    """Relative change of the programmed daily dose; from 0 to anything is infinite."""
    if old_mcg_per_day <= 0:
        return 0.0 if new_mcg_per_day <= 0 else math.inf
    return abs(new_mcg_per_day - old_mcg_per_day) / old_mcg_per_day


class _State:
    __slots__ = ("change", "seq", "until_s")

    def __init__(self) -> None:
        self.change: tuple[float, float, str] = (0.0, 0.0, "")
        self.until_s = -INF
        self.seq = -1


class LargeDoseChange(Rule):
    name = "large_dose_change"
    timed = True

    def __init__(self, complete: Any) -> None:
        self._complete = complete
        """complete(p, seq) -> bool: every seq after `seq` was received (no reprogram lost)."""

    def _st(self, p: Pump) -> _State:
        st = p.state.get(self.name)
        if st is None:
            st = p.state[self.name] = _State()
        return st

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        if isinstance(msg, Reprogram):
            old = msg.old_schedule.dose_mcg_per_day
            new = msg.new_schedule.dose_mcg_per_day
            if not msg.session:
                p.rate_reset = (old, new, "reprogram without a programming session")
            elif p.rate_reset is not None and msg.seq > p.dose_seq:
                p.rate_reset = None  # a clinician has programmed the pump since
            if msg.seq > p.dose_seq:
                p.dose = new
                p.dose_seq = msg.seq
                self._changed(p, old, new, "reprogram", t, msg.seq)
        elif isinstance(msg, Telemetry) and p.new_tel:
            dose = msg.programmed_dose_mcg_per_day
            if p.dose is None:
                p.dose, p.dose_seq = dose, msg.seq
            elif dose != p.dose and msg.seq > p.dose_seq:
                old = p.dose
                complete = self._complete(p, p.dose_seq)
                p.dose, p.dose_seq = dose, msg.seq
                self._changed(p, old, dose, "telemetry", t, msg.seq)
                drop = change_fraction(old, dose) if dose < old else 0.0
                if complete and drop > p.th.unexplained_drop_fraction and p.rate_reset is None:
                    p.rate_reset = (old, dose, "telemetry")

    def _changed(self, p: Pump, old: float, new: float, source: str, t: float, seq: int) -> None:
        if change_fraction(old, new) <= p.th.large_dose_change_fraction:
            return
        st = self._st(p)
        st.change = (old, new, source)
        st.until_s = t + p.th.large_dose_change_active_s
        st.seq = seq

    def judge(self, p: Pump, t: float) -> Verdict:
        st = p.state.get(self.name)
        if st is None or t >= st.until_s:
            return ABSENT
        return Verdict(p.th.large_dose_change_priority, 0.0, 0.0, st.seq)

    def due(self, p: Pump, after_s: float) -> float:
        st = p.state.get(self.name)
        return st.until_s if st is not None and st.until_s > -INF else INF

    def restore(self, p: Pump, priority: Priority, since_s: float) -> None:
        st = self._st(p)
        st.until_s = since_s + p.th.large_dose_change_active_s

    def reset(self, p: Pump) -> None:
        st = p.state.get(self.name)
        if st is not None:
            st.seq = -1

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        old, new, source = self._st(p).change
        change = (new - old) / old if old > 0 else math.inf
        details = {
            "old_dose_mcg_per_day": old,
            "new_dose_mcg_per_day": new,
            "change_pct": round(change * 100, 1) if old > 0 else None,
            "source": source,
        }
        text = f"Programmed dose changed {old:g} -> {new:g} mcg/day"
        if old > 0:
            text += f" ({change * 100:+.0f} %, limit {p.th.large_dose_change_fraction * 100:.0f} %)"
        return (text if active else text + ": notice over"), details
