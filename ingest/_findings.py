"""The seam between the rules (ingest/rules/) and the alert lifecycle (ingest/alerts/): the rules
turn messages and per-pump state into Findings, the lifecycle turns Findings into alerts with
one persistent id per (pump, rule), phases, acknowledgement, history and notifications.

The vocabulary itself (rule names, priorities, `Finding`) is the core's, `pumpfleet.findings`,
because the simulator and the docs speak it too; this module passes it on to the ingester's
own modules.
"""

from pumpfleet.findings import (
    ALERT_RULES,
    NOTICES,
    PRIORITY_RANK,
    RULES,
    SERVICE_RULE_PRIORITY,
    SERVICE_RULES,
    Finding,
    Priority,
    Rule,
    ServiceRule,
)

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
