"""Fleet overview: what a clinic's on-call person looks at first."""

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
    sql,
    stat,
    steps,
    table,
    text,
)

UID = "pumpfleet-fleet"

_READ_ME = """\
Every figure is **as of the end of the selected range** (with the default range: now).

Most pumps **compute** their reservoir (refill entry minus rotor or valve counts): it falls as
programmed even when a catheter is blocked. Such pumps are listed below as *not independently
observable*; only a **measured** reservoir shows a blockage or over-infusion before the next refill.
"""


def build() -> Json:
    grid = Grid()
    panels = [
        stat(
            grid,
            "Pumps",
            "Registered pumps of the selected clinics: reporting (a reading within 3 reporting "
            "intervals of the end of the range), silent (none), and agents whose retained status "
            "says offline (their MQTT last will; the latest status, whatever the range).",
            [sql("fleet.reporting")],
            w=8,
            overrides=[
                by_name("reporting", color=fixed_color("green")),
                by_name("silent", thresholds=alert_thresholds("red")),
                by_name("offline (last will)", thresholds=alert_thresholds("orange")),
            ],
        ),
        stat(
            grid,
            "Open alerts by priority",
            "Alerts open at the end of the range, at the priority they had then. Standing "
            "notices (info) say what the rules cannot watch on a pump; they are not faults.",
            [sql("fleet.open_alerts")],
            w=9,
            overrides=[
                *(
                    by_name(p, thresholds=alert_thresholds(c))
                    for p, c in PRIORITY_COLORS.items()
                    if p != "info"
                ),
                by_name("standing notices", color=fixed_color(PRIORITY_COLORS["info"])),
            ],
        ),
        text(grid, "How to read this", _READ_ME, w=7),
        table(
            grid,
            "Closest to empty",
            "Days until the programmed daily dose brings each pump's reservoir down to its "
            "low-reservoir alarm volume (the higher of the pump's and the registry's), from its "
            "latest reading; 0 means at or below it. The 20 closest first.",
            "fleet.closest_to_empty",
            w=12,
            h=9,
            overrides=[
                by_name(
                    "days to alarm volume",
                    {"custom.cellOptions": {"type": "color-background"}},
                    decimals=1,
                    thresholds={
                        "mode": "absolute",
                        "steps": steps((None, "red"), (3, "orange"), (7, "green")),
                    },
                ),
                by_name("reservoir (mL)", decimals=2, unit="mlitre"),
                by_name("programmed (mL/day)", decimals=3),
            ],
        ),
        table(
            grid,
            "Refills due within 7 days",
            "Pumps that reach their alarm volume within 7 days of the end of the range on their "
            "programmed dose, and the refill_due alert the rules raised for it, if any (the "
            "rule projects the programmed schedule step by step; this table uses the daily dose).",
            "fleet.refills_due",
            w=12,
            h=9,
            overrides=[
                by_name("days to alarm volume", decimals=1),
                by_name("reservoir (mL)", decimals=2, unit="mlitre"),
            ],
        ),
        table(
            grid,
            "Pumps not infusing",
            "Pumps whose latest reading says the rotor is not delivering: stalled (not turning "
            "although programmed to), stopped (an alarm: empty, EOS, critical memory error) or "
            "suspended (on purpose: a clinician, or an MRI scan in progress).",
            "fleet.not_infusing",
            w=12,
        ),
        table(
            grid,
            "Silent pumps",
            "No reading within 3 of the pump's reporting intervals before the end of the range "
            "(or none in 30 days). The agent column is its retained MQTT status.",
            "fleet.silent",
            w=12,
            overrides=[by_name("silent for (h)", decimals=1)],
        ),
        table(
            grid,
            "Battery: ERI and days to EOS",
            "Pumps with the elective replacement indicator on. The pump stops (EOS) 90 days "
            "after ERI began (the date the pump recorded, contract v2); an empty date means a "
            "v1 pump that does not say, so it is listed first.",
            "fleet.battery",
            w=12,
            overrides=[
                by_name("days to EOS", decimals=1),
                by_name("battery (%)", decimals=1, unit="percent"),
            ],
        ),
        table(
            grid,
            "Flow not independently observable",
            "Pumps whose reservoir volume is calculated (the refill entry minus rotor or valve "
            "counts, or a v1 pump that does not say): a blocked catheter or over-infusion does "
            "not show in their telemetry, only at the next refill. 'notice open' says whether "
            "the rules' standing notice (flow_not_observable) is open for the pump.",
            "fleet.flow_not_observable",
            w=12,
        ),
    ]
    return dashboard(
        UID,
        "Fleet overview",
        "The fleet at a glance: pumps reporting and silent, open alerts, the pumps closest to "
        "empty and due for a refill, batteries, and the pumps the rules cannot fully watch.",
        panels,
        variables=[clinic_variable()],
    )
