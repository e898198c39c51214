"""Alerts: what is open and acknowledged, what ended, history, response times, escalations."""

from __future__ import annotations

from dashboards._common import (
    PRIORITY_COLORS,
    Grid,
    Json,
    alert_thresholds,
    by_name,
    clinic_variable,
    dashboard,
    fixed_color,
    priority_variable,
    sql,
    stat,
    table,
    timeseries,
)

UID = "pumpfleet-alerts"


def build() -> Json:
    grid = Grid()
    panels = [
        stat(
            grid,
            "Alerts",
            "Open at the end of the range (not acknowledged / acknowledged: someone is on it, "
            "the condition still holds), ended within the range, and high alerts that escalated "
            "within the range because nobody acknowledged them in time.",
            [sql("alerts.state")],
            w=24,
            overrides=[
                by_name("open, not acknowledged", thresholds=alert_thresholds("red")),
                by_name("acknowledged", thresholds=alert_thresholds("orange")),
                by_name("ended", color=fixed_color("green")),
                by_name("escalated unacknowledged", thresholds=alert_thresholds("red")),
            ],
        ),
        table(
            grid,
            "Open and acknowledged",
            "Alerts open at the end of the range, most urgent first, unacknowledged before "
            "acknowledged, oldest first. One alert per pump and rule (IHE PCD ACM).",
            "alerts.open",
            w=24,
            h=10,
            overrides=[
                by_name("open for (min)", decimals=0),
                by_name(
                    "priority",
                    {"custom.cellOptions": {"type": "color-text"}},
                    mappings=[
                        {
                            "type": "value",
                            "options": {
                                p: {"color": c, "index": i}
                                for i, (p, c) in enumerate(PRIORITY_COLORS.items())
                            },
                        }
                    ],
                ),
            ],
        ),
        timeseries(
            grid,
            "Alerts started, by priority",
            "How many alerts started per interval, stacked by the priority they started at.",
            [sql("alerts.started")],
            w=12,
            bars=True,
            stacked=True,
            overrides=[by_name(p, color=fixed_color(c)) for p, c in PRIORITY_COLORS.items()],
        ),
        table(
            grid,
            "Time to acknowledge and to end, by priority",
            "For alerts started in the range: how many, how many were acknowledged and ended, "
            "and the median and 90th percentile minutes from start to acknowledgement and from "
            "start to end. Acknowledgements use the wall clock, starts the device's.",
            "alerts.response_times",
            w=12,
            links_pump=False,
            overrides=[
                by_name(name, decimals=1)
                for name in (
                    "to acknowledge, median (min)",
                    "to acknowledge, p90 (min)",
                    "to end, median (min)",
                    "to end, p90 (min)",
                )
            ],
        ),
        table(
            grid,
            "Escalations",
            "Every escalation in the range: a high alert nobody acknowledged in time (it was "
            "notified again), or a condition that worsened (a higher priority).",
            "alerts.escalations",
            w=10,
            h=10,
            overrides=[by_name("after (min)", decimals=0)],
        ),
        table(
            grid,
            "History",
            "Every transition in the range but the figure updates (continue), newest first: who "
            "(rules, escalation, or the person who acknowledged or resolved) and their note.",
            "alerts.history",
            w=14,
            h=10,
        ),
    ]
    return dashboard(
        UID,
        "Alerts",
        "Alerts open, acknowledged and ended; their history, response times by priority and "
        "escalations.",
        panels,
        variables=[clinic_variable(), priority_variable()],
        time_from="now-7d",
    )
