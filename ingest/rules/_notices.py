"""Standing notices (info): what the rules cannot see, said out loud.

- flow_not_observable: the pump's volume is `calculated` (refill entry minus rotor or valve
  counts; every v1 pump), so the reservoir trend cannot see an occlusion, a leak or an
  over-infusion that the rotor counts do not show: detection rests on the delivery counts and
  on refill reconciliation. Also on a `measured` pump whose sensor is too noisy for its flow to
  judge +-14.5 % within 24 h.
- clinic_data_missing: the clinic has not confirmed this pump (no registry profile, or a row the
  ingester registered from a first message): high-risk status unknown (so the alarm volume is the
  pump's own), and, for a v1 pump, the reporting interval assumed.
"""

from __future__ import annotations

from typing import Any

from ingest.rules._facts import ABSENT, Pump, Rule, Verdict
from ingest.rules._flow import flow_state
from pumpfleet.contract import ReservoirSource

_OFF_S = 3600.0


class FlowNotObservable(Rule):
    name = "flow_not_observable"

    def _why(self, p: Pump) -> str | None:
        if p.tel is None:
            return None
        if p.source is ReservoirSource.CALCULATED:
            return "calculated"
        if flow_state(p).trend_blind:
            return "noisy_sensor"
        return None

    def judge(self, p: Pump, t: float) -> Verdict:
        why = self._why(p)
        if why is None:
            return ABSENT
        return Verdict(p.th.notice_priority, 0.0, _OFF_S, why)

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        why = self._why(p)
        details: dict[str, Any] = {
            "reservoir_source": p.source.value if p.source else None,
            "reason": why,
            "watched_by": ["delivery_counts", "refill_reconciliation", "pump_alarms"],
        }
        if not active:
            return "Flow is observable again: the measured reservoir trend is judged", details
        if why == "noisy_sensor":
            fig = flow_state(p).trend_fig
            details["standard_error_pct"] = fig.get("standard_error_pct")
            return (
                "Flow not independently observable: the reservoir sensor is too noisy for this "
                "flow to judge +-14.5 % within 24 h; watched by rotor counts and refill "
                "reconciliation only",
                details,
            )
        return (
            "Flow not independently observable: the reservoir volume is calculated from the "
            "refill entry and rotor counts, so occlusion, leaks and over-infusion show only in "
            "rotor counts and at the next refill",
            details,
        )


class ClinicDataMissing(Rule):
    name = "clinic_data_missing"

    def _missing(self, p: Pump) -> list[str]:
        if p.tel is None:
            return []
        missing = []
        if not p.confirmed_profile():
            missing.append("high_risk")
        if p.interval_from == "default":
            missing.append("reporting_interval")
        return missing

    def judge(self, p: Pump, t: float) -> Verdict:
        missing = self._missing(p)
        if not missing:
            return ABSENT
        return Verdict(p.th.notice_priority, 0.0, 0.0, tuple(missing))

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        missing = self._missing(p)
        details: dict[str, Any] = {
            "missing": missing,
            "alarm_ml": p.alarm_ml,
            "alarm_ml_from": p.alarm_from,
            "reporting_interval_s": p.interval_s,
            "interval_from": p.interval_from,
        }
        if not active:
            return "Clinic data complete", details
        parts = []
        if "high_risk" in missing:
            parts.append(
                f"no clinic profile: high-risk status unknown, alarm volume {p.alarm_ml or 0:g} mL "
                "is the pump's own (4 mL is advised for high-risk patients)"
            )
        if "reporting_interval" in missing:
            parts.append(
                "reporting interval unknown: silence judged on an assumed "
                f"{p.interval_s / 60:g} min"
            )
        return "Clinic data missing: " + "; ".join(parts), details
