"""Every figure a rule compares against, and what the engine knows about each pump.

Defaults are domain.md's values (flow accuracy, refill limits, MRI recovery, refill-due days,
battery, dose change, silence); the hysteresis durations are our design choices, chosen so the
scenario deadlines in sim_fleet/scenarios/faults.yaml hold with room to spare.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pumpfleet.findings import Priority

_H = 3600.0
_DAY = 86_400.0


class Thresholds(BaseModel):
    """Thresholds, priorities and hold durations of every rule (seconds, mL, uL, fractions).

    `*_on_s`: how long a condition must hold before its alert starts; `*_off_s`: how long it must
    be gone before the alert ends (and before a lower priority replaces a higher one). A higher
    priority always applies at once: escalation is never delayed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # critical pump alarm ------------------------------------------------------------------
    critical_priority: Priority = "high"
    critical_off_s: float = Field(
        default=600.0, ge=0, description="Causes gone this long end it: flapping is one alert."
    )
    unexplained_drop_fraction: float = Field(
        default=0.20,
        gt=0,
        le=1,
        description="A programmed daily dose that falls by more than this with no programming "
        "session in the message stream is a battery-fault rate reset.",
    )

    critical_explains_no_delivery: tuple[str, ...] = Field(
        default=("empty_reservoir", "eos", "critical_memory_error", "motor_stall"),
        description="Pump alarms that explain 'no delivery': while one is active the "
        "under-infusion page is inhibited and attached to the critical alarm as context.",
    )
    noncritical_priority: Priority = "low"

    # over- and under-infusion ---------------------------------------------------------------
    flow_accuracy: float = Field(default=0.145, gt=0, lt=1, description="Labelled +-14.5 %.")
    flow_clear_fraction: float = Field(
        default=0.10,
        gt=0,
        lt=1,
        description="An open flow alert ends only once the deviation is back inside this "
        "(and stays there for the off duration): clearly absent, not just under the limit.",
    )
    counts_window_s: float = Field(
        default=6 * _H, gt=0, description="Delivered (rotor/valve counts) against scheduled."
    )
    counts_min_span_s: float = Field(
        default=3 * _H, gt=0, description="Judge the counts window once it spans this long."
    )
    counts_min_scheduled_ul: float = Field(
        default=5.0, gt=0, description="...and the programme asked for at least this much."
    )
    counts_quantum_ul: float = Field(
        default=4.0,
        ge=0,
        description="Counting resolution allowed on top of the accuracy: two valve strokes of "
        "about 2 uL (a rotor counts far finer); a slow valve pump's 6 h holds only ~11 uL.",
    )
    counts_off_s: float = Field(default=2 * _H, ge=0)
    trend_window_s: float = Field(
        default=24 * _H,
        gt=0,
        description="Measured-volume trend: least-squares slope of the measured reservoir "
        "against the rotor count over this window (and over the short one).",
    )
    trend_short_window_s: float = Field(default=6 * _H, gt=0)
    trend_bucket_s: float = Field(
        default=2 * _H, gt=0, description="The trend keeps sums per bucket: memory is bounded."
    )
    trend_min_span_fraction: float = Field(
        default=0.75, gt=0, le=1, description="A window is judged once it is this full."
    )
    trend_z: float = Field(
        default=3.5,
        gt=0,
        description="Confidence: the slope's bound at z standard errors (Student-t on few "
        "readings). A pump is judged at every reading for years, so 3 would page a healthy "
        "pump near the label edge every few weeks.",
    )
    trend_short_min_rotor_ul: float = Field(
        default=50.0,
        gt=0,
        description="The short window judges only once the rotor counted this much in it: a "
        "slow pump's 6 h holds too little drug to tell 14.5 % from a few uL of noise.",
    )
    trend_min_readings: int = Field(
        default=12,
        ge=4,
        description="A window with fewer readings is not judged (an hourly pump's 6 h window).",
    )
    trend_max_se: float = Field(
        default=0.04,
        gt=0,
        description="A full long window whose slope is less precise than this cannot judge "
        "+-14.5 %: the pump gets the flow_not_observable notice instead of silence.",
    )
    trend_jump_ml: float = Field(
        default=0.5,
        gt=0,
        description="A measured rise above the fit by this much is a refill whose event was "
        "lost: the trend starts again.",
    )
    trend_off_s: float = Field(default=6 * _H, ge=0)
    no_delivery_on_s: float = Field(
        default=1200.0, ge=0, description="Rotor at 0 while programmed > 0 this long: a stall."
    )
    no_delivery_min_ul: float = Field(
        default=4.0,
        gt=0,
        description="...and the programme asked for at least this much meanwhile: a valve pump "
        "counts in strokes of about 2 uL, so a slow one shows intervals of 0 when healthy.",
    )
    no_delivery_off_s: float = Field(default=1200.0, ge=0)
    over_infusion_priority: Priority = "high"
    under_infusion_priority: Priority = "high"

    # refills ------------------------------------------------------------------------------------
    pocket_fill_small_ml: float = Field(
        default=1.0, gt=0, description="Injected minus measured above this: pocket fill (20 mL)."
    )
    pocket_fill_large_ml: float = Field(default=2.0, gt=0, description="The same, 40 mL pump.")
    small_reservoir_max_ml: float = Field(
        default=20.0, gt=0, description="Pumps up to this capacity use the small limit."
    )
    pocket_fill_priority: Priority = "high"
    refill_discrepancy_ml: float = Field(
        default=2.0, gt=0, description="A discrepancy below this never fires (entry error)."
    )
    refill_discrepancy_fraction: float = Field(
        default=0.145,
        gt=0,
        description="Labelled accuracy: of the volume infused since the previous refill.",
    )
    refill_change_fraction: float = Field(
        default=0.06,
        gt=0,
        description="Once the pump's own bias is learned, a refill that departs from it by "
        "more than this share of the infused volume (and the 2 mL floor) fires too.",
    )
    refill_bias_min_refills: int = Field(
        default=2, ge=1, description="Refills with a known infused volume before the bias counts."
    )
    refill_drift_refills: int = Field(default=3, ge=3, description="Refills a drift spans.")
    refill_drift_fraction: float = Field(
        default=0.04,
        gt=0,
        description="Bias moving one way by more than this over the drift refills: low alert.",
    )
    refill_entry_sd_ml: float = Field(
        default=0.3, ge=0, description="Clinician's withdrawn-volume reading error (SD)."
    )
    refill_entry_allowance_sd: float = Field(
        default=3.0,
        ge=0,
        description="The label's share of the infused volume is widened by this many reading "
        "SDs: a pump at +14 % with a 0.3 mL misreading is still inside its label.",
    )
    refill_discrepancy_priority: Priority = "medium"
    refill_discrepancy_repeated_priority: Priority = "high"
    refill_drift_priority: Priority = "low"

    # MRI ------------------------------------------------------------------------------------
    mri_recovery_s: float = Field(
        default=24 * _H, gt=0, description="No recovery this long after the scan: high."
    )
    mri_medium_s: float = Field(
        default=6 * _H, gt=0, description="Stall still ongoing this long after the scan: medium."
    )
    mri_max_scan_s: float = Field(
        default=2 * _H, gt=0, description="Scan length assumed when the mri_end event is missing."
    )
    post_mri_low_priority: Priority = "low"
    post_mri_medium_priority: Priority = "medium"
    post_mri_priority: Priority = "high"

    # low reservoir ----------------------------------------------------------------------------
    low_reservoir_alarm_ml: float | None = Field(
        default=None, gt=0, le=100, description="None: the alarm volume the pump reports."
    )
    high_risk_low_reservoir_ml: float = Field(
        default=4.0, gt=0, le=100, description="Advised alarm volume for high-risk patients."
    )
    low_reservoir_clear_margin_ml: float = Field(default=0.5, ge=0)
    low_reservoir_on_s: float = Field(default=0.0, ge=0)
    low_reservoir_off_s: float = Field(default=600.0, ge=0)
    low_reservoir_priority: Priority = "medium"

    # refill due ---------------------------------------------------------------------------------
    refill_due_medium_days: float = Field(default=7.0, gt=0)
    refill_due_high_days: float = Field(default=3.0, ge=0)
    refill_due_clear_margin_days: float = Field(default=0.5, ge=0)
    refill_due_on_s: float = Field(default=0.0, ge=0)
    refill_due_off_s: float = Field(default=_H, ge=0)
    bolus_average_s: float = Field(
        default=7 * _DAY, gt=0, description="Time constant of the patient-bolus volume average."
    )
    refill_due_medium_priority: Priority = "medium"
    refill_due_high_priority: Priority = "high"

    # battery --------------------------------------------------------------------------------
    eos_after_eri_days: float = Field(default=90.0, gt=0)
    battery_high_days_to_eos: float = Field(default=14.0, ge=0)
    battery_on_s: float = Field(default=0.0, ge=0)
    battery_off_s: float = Field(default=_H, ge=0)
    battery_eri_priority: Priority = "medium"
    battery_eos_priority: Priority = "high"

    # large dose change --------------------------------------------------------------------------
    large_dose_change_fraction: float = Field(default=0.20, gt=0)
    large_dose_change_active_s: float = Field(
        default=24 * _H, gt=0, description="A notice: it ends by itself after this."
    )
    large_dose_change_priority: Priority = "low"

    # telemetry silence --------------------------------------------------------------------------
    silence_low_intervals: float = Field(default=3.0, gt=0)
    silence_slack_s: float = Field(
        default=120.0,
        ge=0,
        description="Transport latency allowed on top: the reading due exactly at 3 intervals "
        "(two lost in a row) is not silence.",
    )
    silence_medium_s: float = Field(default=24 * _H, gt=0)
    default_reporting_interval_s: float = Field(
        default=600.0,
        gt=0,
        description="Used only when neither the pump (contract v2) nor the clinic says; the "
        "pump then gets the clinic_data_missing notice.",
    )
    silence_low_priority: Priority = "low"
    silence_medium_priority: Priority = "medium"

    # sequence gap -----------------------------------------------------------------------------
    sequence_gap_grace_s: float = Field(
        default=1800.0,
        ge=0,
        description="A missing seq is lost once it has been missing this long; a late arrival "
        "before then fills it silently.",
    )
    sequence_gap_active_s: float = Field(
        default=6 * _H, gt=0, description="The alert ends this long after the last loss."
    )
    sequence_gap_max_tracked: int = Field(
        default=64, ge=1, description="Missing seqs remembered per pump; beyond, lost at once."
    )
    sequence_gap_priority: Priority = "low"

    notice_priority: Priority = "info"

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.refill_due_high_days >= self.refill_due_medium_days:
            raise ValueError("refill_due_high_days must be below refill_due_medium_days")
        if self.mri_medium_s >= self.mri_recovery_s:
            raise ValueError("mri_medium_s must be below mri_recovery_s")
        if self.flow_clear_fraction >= self.flow_accuracy:
            raise ValueError("flow_clear_fraction must be below flow_accuracy")
        if self.battery_high_days_to_eos >= self.eos_after_eri_days:
            raise ValueError("battery_high_days_to_eos must be below eos_after_eri_days")
        return self

    def with_overrides(self, overrides: Mapping[str, Any]) -> Thresholds:
        """A copy with some values replaced, validated like the original."""
        if not overrides:
            return self
        return type(self).model_validate({**self.model_dump(), **overrides})

    @classmethod
    def from_toml(cls, text: str, section: str | None = "rules") -> Thresholds:
        """Read a TOML document (or one `[section]` of it, dotted for nesting)."""
        data: Any = tomllib.loads(text)
        for part in section.split(".") if section else ():
            data = data.get(part, {})
            if not isinstance(data, dict):
                raise ValueError(f"[{section}] must be a table of thresholds")
        return cls.model_validate(data)


class PumpProfile(BaseModel):
    """What the clinic knows about one pump that its telemetry does not say."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pump_id: str
    low_reservoir_alarm_ml: float | None = Field(
        default=None, gt=0, le=100, description="None: the alarm volume the pump reports."
    )
    reporting_interval_s: float | None = Field(
        default=None, gt=0, le=86_400, description="None: the interval the pump reports."
    )
    confirmed: bool = Field(
        default=True,
        description="False for a row the ingester registered from a first message: the clinic "
        "has not said whether the patient is high-risk.",
    )
    high_risk: bool = Field(
        default=False, description="High spinal cord injury or prior withdrawal: 4 mL advised."
    )
    reservoir_capacity_ml: float | None = Field(
        default=None, gt=0, le=100, description="None: the capacity the pump reports."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Threshold values for this pump only."
    )

    @field_validator("overrides")
    @classmethod
    def _known_thresholds(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(Thresholds.model_fields))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a threshold")
        try:
            Thresholds().with_overrides(value)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "overrides"
            raise ValueError(f"{where}: {first['msg']}") from None
        return value

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PumpProfile:
        """From a `pumps` registry row (or any mapping): the columns it knows, nulls skipped."""
        known = set(cls.model_fields)
        values = {k: v for k, v in row.items() if k in known and v is not None}
        if row.get("registered_by") == "ingest":
            values["confirmed"] = False
        return cls.model_validate(values)

    def thresholds(self, base: Thresholds) -> Thresholds:
        """`base` with this pump's overrides applied."""
        return base.with_overrides(self.overrides)
