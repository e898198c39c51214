"""What an alert rule says about a pump, in the words every part shares.

The rules (ingest's rule engine) turn messages into Findings; the alert lifecycle turns Findings
into alerts; the simulator's scenario files name the alerts they expect by rule and priority;
docs/safety.md links each rule to its hazard. One vocabulary for all of them, kept here so that
none of them imports another part to learn a rule's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

__all__ = [
    "ALERT_RULES",
    "NOTICES",
    "PRIORITY_RANK",
    "RULES",
    "SERVICE_RULES",
    "SERVICE_RULE_PRIORITY",
    "Finding",
    "Priority",
    "Rule",
    "ServiceRule",
]

Priority = Literal["high", "medium", "low", "info"]
PRIORITY_RANK: dict[str, int] = {"info": 0, "low": 1, "medium": 2, "high": 3}
"""IEC 60601-1-8 levels, higher is more urgent."""

Rule = Literal[
    "critical_pump_alarm",
    "noncritical_pump_alarm",
    "over_infusion",
    "under_infusion",
    "pocket_fill",
    "refill_discrepancy",
    "post_mri",
    "low_reservoir",
    "refill_due",
    "battery",
    "large_dose_change",
    "telemetry_silence",
    "sequence_gap",
    "flow_not_observable",
    "clinic_data_missing",
]
"""The rule catalogue of domain.md, and the two standing notices that say what the rules cannot
see; the simulator's scenario files name alerts by these."""
NOTICES: tuple[str, ...] = ("flow_not_observable", "clinic_data_missing")
"""Standing notices (info priority): not a fault, a statement of what is not watched."""
RULES: tuple[str, ...] = get_args(Rule)

ServiceRule = Literal["unprovisioned_device"]
"""Alerts the alerting service raises itself, not the rule engine: the engine judges stored
messages, and what these alerts are about is never stored as a pump's data.

- `unprovisioned_device` (medium): a pump that is not provisioned, or revoked, is publishing;
  its messages are quarantined (dead letters, raw bytes kept) and the ingesters note it in
  `quarantine_seen`. One alert per pump, raised by the alerting service's watchdog while the
  pump was seen within the last hour, ended once the pump is provisioned (docs/security.md).
"""
SERVICE_RULES: tuple[str, ...] = get_args(ServiceRule)
SERVICE_RULE_PRIORITY: dict[str, Priority] = {"unprovisioned_device": "medium"}
ALERT_RULES: tuple[str, ...] = RULES + SERVICE_RULES
"""Every `alerts.rule` the pipeline can write."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule's verdict about one pump at one moment.

    active=True: the condition holds (the lifecycle starts an alert, or continues it, escalating
    or de-escalating when the priority differs from the open alert's). active=False: the
    condition has ended (the lifecycle ends the open alert, if any).
    """

    pump_id: str
    rule: str
    active: bool
    priority: Priority
    at: datetime
    """Device time of the message that decided it, or the watchdog's clock for silence."""
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)
    """The figures that fired it, e.g. {"reservoir_ml": 1.8, "alarm_ml": 2.0}."""
    seq: int | None = None
    """seq of the deciding message (None for the watchdog)."""
