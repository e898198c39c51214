"""Pump detail: one pump, picked by the `pump` variable."""

from __future__ import annotations

from dashboards._common import (
    PUMP_DETAIL_UID,
    Grid,
    Json,
    annotation,
    by_name,
    clinic_variable,
    dashboard,
    fixed_color,
    pump_variable,
    sql,
    stat,
    table,
    timeseries,
)

UID = PUMP_DETAIL_UID

_DASHED = {"custom.lineStyle": {"fill": "dash", "dash": [10, 10]}}
_BAND = {
    "custom.lineStyle": {"fill": "dot", "dash": [2, 6]},
    "custom.lineWidth": 1,
    "custom.fillOpacity": 0,
}


def build() -> Json:
    grid = Grid()
    panels = [
        stat(
            grid,
            "$pump now",
            "The pump's latest reading at or before the end of the range. 'reservoir volume' "
            "says whether the pump measures its reservoir or calculates it from its counts.",
            [sql("pump.now")],
            w=24,
            decimals=2,
            text_fields=True,
            overrides=[
                by_name("reservoir (mL)", unit="mlitre"),
                by_name("days to alarm volume", decimals=1),
                by_name("battery (%)", unit="percent", decimals=1),
                by_name("last reading", unit="dateTimeAsIso"),
            ],
        ),
        timeseries(
            grid,
            "Reservoir against the programmed projection",
            "The reservoir the pump reports, and what the programme says should be left: the "
            "volume at the start of the range (or after each refill) minus the programmed "
            "flow since. A calculated reservoir follows the projection by construction; only a "
            "measured one can depart from it (faster: over-infusion or a leak into the pocket; "
            "slower or flat: a blocked catheter). Raw readings up to 2 days, hourly beyond.",
            [sql("pump.reservoir")],
            w=12,
            h=9,
            unit="mlitre",
            overrides=[by_name("programmed projection", _DASHED, color=fixed_color("purple"))],
        ),
        timeseries(
            grid,
            "Delivered against programmed rate",
            "Flow from the rotor or valve counts against the flow the programme asked for "
            "(steps and boluses), with the labelled accuracy band of +-14.5 %. Counts far from "
            "the programme mean a mechanical fault (a stall, a worn gear train); a catheter "
            "problem does not show here. Raw readings up to 2 days, hourly beyond.",
            [sql("pump.delivery")],
            w=12,
            h=9,
            unit="suffix: µL/h",
            overrides=[
                by_name("programmed", _DASHED, color=fixed_color("purple")),
                by_name("programmed +14.5%", _BAND, color=fixed_color("text")),
                by_name("programmed -14.5%", _BAND, color=fixed_color("text")),
            ],
        ),
        timeseries(
            grid,
            "Battery",
            "Battery charge the pump reports. ERI comes about 90 days before the pump stops.",
            [sql("pump.battery")],
            w=8,
            unit="percent",
        ),
        table(
            grid,
            "Refills and their discrepancies",
            "Each refill in the range: the volume the pump expected to hold, what the "
            "clinician withdrew (discrepancy = expected - withdrawn), what was injected, and the "
            "refill alerts the rules raised within the hour (refill_discrepancy, pocket_fill).",
            "pump.refills",
            w=16,
            links_pump=False,
            overrides=[by_name("discrepancy (mL)", decimals=2)],
        ),
        table(
            grid,
            "Alerts on this pump",
            "Alerts open during the range, open ones first, most urgent first. The "
            "transitions (start, escalate, acknowledge, end) are the red annotations on the "
            "charts above; pump events are the blue ones.",
            "pump.alerts",
            w=24,
            links_pump=False,
        ),
    ]
    return dashboard(
        UID,
        "Pump detail",
        "One pump: its reservoir against the programme, delivery against the programmed rate, "
        "battery, refills and their discrepancies, with events and alert transitions drawn "
        "on the charts.",
        panels,
        variables=[clinic_variable(), pump_variable()],
        annotations=[
            annotation("Pump events", "pump.annotations.events", "blue"),
            annotation("Alert transitions", "pump.annotations.alerts", "red"),
        ],
        time_from="now-2d",
    )
