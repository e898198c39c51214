"""telemetry_silence: no message for 3 reporting intervals (low), for 24 h (medium).

The interval is the pump's own (contract v2 `reporting_interval_s`), else the clinic's registry
value, else 10 min with a clinic_data_missing notice saying so. Silence counts from when messages
arrive (`received_at`) where the caller passes it, and from the watchdog's first tick at the
earliest, so a restart cannot page for every pump at once. Works on every pump family.
"""

from __future__ import annotations

from typing import Any

from ingest.rules._facts import ABSENT, INF, Pump, Rule, Verdict
from pumpfleet.findings import Priority


class TelemetrySilence(Rule):
    name = "telemetry_silence"
    timed = True

    def __init__(self, watch_since: Any) -> None:
        self._watch_since = watch_since
        """watch_since() -> float | None: when the watchdog started."""

    def silent_since(self, p: Pump) -> float:
        start = self._watch_since()
        if p.priority(self.name) is not None or start is None:
            return p.last_heard_s
        return max(p.last_heard_s, start)

    def raw(self, p: Pump, now_s: float) -> Priority | None:
        th = p.th
        silent = now_s - self.silent_since(p)
        if silent >= th.silence_medium_s:
            return th.silence_medium_priority
        if silent >= th.silence_low_intervals * p.interval_s + th.silence_slack_s:
            return th.silence_low_priority
        return None

    def judge(self, p: Pump, t: float) -> Verdict:
        p.state[self.name] = t - self.silent_since(p)
        raw = self.raw(p, t)
        return Verdict(raw) if raw is not None else ABSENT

    def due(self, p: Pump, after_s: float) -> float:
        th = p.th
        since = self.silent_since(p)
        if since == -INF:
            return INF
        current = p.priority(self.name)
        if current is None:
            return since + th.silence_low_intervals * p.interval_s + th.silence_slack_s
        if current != th.silence_medium_priority:
            return since + th.silence_medium_s
        return INF

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        silent_s = max(0.0, p.state.get(self.name, 0.0))
        minutes = silent_s / 60
        details = {
            "silent_min": round(minutes, 1),
            "reporting_interval_s": p.interval_s,
            "interval_from": p.interval_from,
            "intervals": round(silent_s / p.interval_s, 1),
        }
        if not active:
            return "Messages arrive again", details
        return (
            f"No message for {minutes:.0f} min ({silent_s / p.interval_s:.1f}x the "
            f"{p.interval_s / 60:g}-min reporting interval)",
            details,
        )
