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

from ingest.findings import Priority

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

    # over- and under-infusion ---------------------------------------------------------------
    flow_accuracy: float = Field(default=0.145, gt=0, lt=1, description="Labelled +-14.5 %.")
    trend_window_s: float = Field(
        default=3 * _H, gt=0, description="Shortest reservoir-trend window judged."
    )
    trend_min_rotor_ul: float = Field(
        default=20.0,
        gt=0,
        description="Judge a window only once the rotor counted this much; slow pumps get "
        "longer windows.",
    )
    reservoir_resolution_ul: float = Field(
        default=1.0,
        ge=0,
        description="Reading resolution; the trend tolerates this on top of the accuracy.",
    )
    telemetry_gap_intervals: float = Field(
        default=1.5,
        gt=1,
        description="Telemetry further apart than this many intervals restarts the trend: the "
        "rotor count of a lost reading is unknown.",
    )
    trend_on_s: float = Field(default=1800.0, ge=0)
    trend_off_s: float = Field(default=2 * _H, ge=0)
    no_delivery_on_s: float = Field(
        default=1200.0, ge=0, description="Rotor at 0 while programmed > 0 this long: a stall."
    )
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
    refill_discrepancy_ml: float = Field(default=2.0, gt=0)
    refill_discrepancy_fraction: float = Field(
        default=0.145,
        gt=0,
        description="Of the volume infused since the previous refill (needs that refill seen).",
    )
    refill_discrepancy_floor_ml: float = Field(
        default=0.5,
        ge=0,
        description="Below this the fraction test is reading noise (withdrawal +-0.15 mL).",
    )
    refill_discrepancy_priority: Priority = "medium"
    refill_discrepancy_repeated_priority: Priority = "high"

    # MRI ------------------------------------------------------------------------------------
    mri_recovery_s: float = Field(default=24 * _H, gt=0)
    mri_max_scan_s: float = Field(
        default=2 * _H, gt=0, description="Scan length assumed when the mri_end event is missing."
    )
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

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.refill_due_high_days >= self.refill_due_medium_days:
            raise ValueError("refill_due_high_days must be below refill_due_medium_days")
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
    reporting_interval_s: float = Field(default=600.0, gt=0, le=86_400)
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
        return cls.model_validate({k: v for k, v in row.items() if k in known and v is not None})

    def thresholds(self, base: Thresholds) -> Thresholds:
        """`base` with this pump's overrides applied."""
        return base.with_overrides(self.overrides)
