"""critical_pump_alarm and noncritical_pump_alarm: the pump's own alarms, ranked.

Needs: alarm events or the telemetry alarm list (ordered by seq per alarm), motor_stall events,
reprogram events and the programmed dose (for a rate reset with no programming session). Works
on every pump family: these are what the pump itself says.
"""

from __future__ import annotations

from typing import Any

from ingest.rules._facts import ABSENT, Pump, Rule, Verdict
from pumpfleet.contract import PumpAlarm

CRITICAL = frozenset(
    {
        PumpAlarm.EMPTY_RESERVOIR,
        PumpAlarm.EOS,
        PumpAlarm.MOTOR_STALL,
        PumpAlarm.CRITICAL_MEMORY_ERROR,
        PumpAlarm.REDUCED_BATTERY_PERFORMANCE,
    }
)
NONCRITICAL = frozenset({PumpAlarm.NONCRITICAL_MEMORY_ERROR})
RATE_RESET = "unexplained_rate_drop"


def critical_causes(p: Pump) -> list[str]:
    causes = {a.value for a in p.alarms & CRITICAL}
    if p.stall_event:
        causes.add(PumpAlarm.MOTOR_STALL.value)
    if p.rate_reset is not None:
        causes.add(RATE_RESET)
    return sorted(causes)


def _stopped(p: Pump) -> bool:
    """No delivery while programmed, explained by a pump alarm (under_infusion inhibited)."""
    return bool(p.explained_stop()) and p.scheduled_ul_per_h > 0 and not p.delivering


class CriticalPumpAlarm(Rule):
    name = "critical_pump_alarm"
    off_attr = "critical_off_s"

    def judge(self, p: Pump, t: float) -> Verdict:
        causes = critical_causes(p)
        if not causes:
            return ABSENT
        th = p.th
        # The consequence it explains is part of what the alert is about: reported again when
        # the stop shows, so the page carries it instead of a second page.
        return Verdict(th.critical_priority, 0.0, th.critical_off_s, (*causes, _stopped(p)))

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        causes = critical_causes(p)
        tel = p.tel
        details: dict[str, Any] = {
            "causes": causes,
            "pump_state": tel.pump_state.value if tel is not None else None,
        }
        if not active:
            return "Critical pump alarm cleared", details
        parts = [c.replace("_", " ") for c in causes if c != RATE_RESET]
        if p.rate_reset is not None:
            old, new, source = p.rate_reset
            details |= {"old_dose_mcg_per_day": old, "new_dose_mcg_per_day": new, "source": source}
            parts.append(
                f"programmed dose {old:g} -> {new:g} mcg/day with no programming session "
                "(battery fault?)"
            )
        explained = p.explained_stop()
        if _stopped(p):
            # One cause, one page: the consequence rides on the alert that explains it.
            details["inhibited"] = [
                {
                    "rule": "under_infusion",
                    "cause": "no_delivery",
                    "explained_by": sorted(a.value for a in explained),
                }
            ]
            parts.append("no delivery (explained by this alarm)")
        return "Critical pump alarm: " + "; ".join(parts), details


class NoncriticalPumpAlarm(Rule):
    """domain.md: a non-critical memory error keeps infusing, but the clinic should know."""

    name = "noncritical_pump_alarm"
    off_attr = "critical_off_s"

    def judge(self, p: Pump, t: float) -> Verdict:
        if not p.alarms & NONCRITICAL:
            return ABSENT
        th = p.th
        return Verdict(th.noncritical_priority, 0.0, th.critical_off_s)

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        names = sorted(a.value for a in p.alarms & NONCRITICAL)
        details = {"alarms": names}
        if not active:
            return "Non-critical pump alarm cleared", details
        return (
            "Pump alarm: " + ", ".join(n.replace("_", " ") for n in names) + " (therapy continues)",
            details,
        )
