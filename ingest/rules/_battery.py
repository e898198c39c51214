"""battery: ERI (medium), 14 days or less to EOS or EOS itself (high).

Needs: telemetry `battery_eri` and, in contract v2, `eri_since` (the pump's own record of when
ERI began), or the ERI/EOS alarms. With `eri_since` the days to EOS are exact whenever
monitoring began and however long ago alerting restarted. A v1 pump says no date: an ERI seen
beginning is dated to the last reading without it (never late); one already active when
monitoring began has no date, and the alert says so. Works on every pump family.
"""

from __future__ import annotations

from typing import Any

from ingest.rules._facts import ABSENT, DAY_S, INF, Pump, Rule, Verdict
from pumpfleet.contract import Message, PumpAlarm, Telemetry


class _State:
    __slots__ = ("eri_since_s", "exact", "last_non_eri_s")

    def __init__(self) -> None:
        self.eri_since_s: float | None = None
        self.exact = False
        self.last_non_eri_s = -INF


def _eri(p: Pump) -> bool:
    return (p.tel is not None and p.tel.battery_eri) or PumpAlarm.ERI in p.alarms


class Battery(Rule):
    name = "battery"
    off_attr = "battery_off_s"
    timed = True

    def _st(self, p: Pump) -> _State:
        st = p.state.get(self.name)
        if st is None:
            st = p.state[self.name] = _State()
        return st

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        st = self._st(p)
        if isinstance(msg, Telemetry) and p.new_tel and msg.eri_since is not None:
            st.eri_since_s = msg.eri_since.timestamp()
            st.exact = True
        if not _eri(p):
            if isinstance(msg, Telemetry):  # only a reading says ERI is off (not a status)
                st.last_non_eri_s = t
            st.eri_since_s = None
            st.exact = False
        elif st.eri_since_s is None and st.last_non_eri_s > -INF:
            # Began between the last reading without ERI and now: the earlier, never late.
            st.eri_since_s = st.last_non_eri_s

    def days_to_eos(self, p: Pump, t: float) -> float | None:
        st = p.state.get(self.name)
        if st is None or st.eri_since_s is None:
            return None
        return p.th.eos_after_eri_days - (t - st.eri_since_s) / DAY_S

    def judge(self, p: Pump, t: float) -> Verdict:
        th = p.th
        eos = PumpAlarm.EOS in p.alarms
        eri = _eri(p)
        if not (eri or eos):
            return ABSENT
        days = self.days_to_eos(p, t)
        # Reported again when the pump's own ERI date replaces an inferred or unknown one.
        key = self._st(p).exact
        if eos or (days is not None and days <= th.battery_high_days_to_eos):
            return Verdict(th.battery_eos_priority, th.battery_on_s, th.battery_off_s, key)
        return Verdict(th.battery_eri_priority, th.battery_on_s, th.battery_off_s, key)

    def due(self, p: Pump, after_s: float) -> float:
        """The moment 14 days to EOS is reached, even if the pump falls silent."""
        st = p.state.get(self.name)
        if st is None or st.eri_since_s is None or p.priority(self.name) is None:
            return INF
        th = p.th
        return st.eri_since_s + (th.eos_after_eri_days - th.battery_high_days_to_eos) * DAY_S

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        th = p.th
        st = self._st(p)
        days = self.days_to_eos(p, p.last_time_s)
        details: dict[str, Any] = {
            "eri": _eri(p),
            "eos": PumpAlarm.EOS in p.alarms,
            "days_to_eos": round(days, 1) if days is not None else None,
            "eri_date": "reported by the pump" if st.exact else "inferred" if days else "unknown",
        }
        if not active:
            return "Battery ERI no longer reported", details
        if PumpAlarm.EOS in p.alarms:
            return "Battery EOS: the pump has stopped", details
        if days is None:
            return (
                "Battery ERI, active since before monitoring began: EOS is "
                f"{th.eos_after_eri_days:g} days after ERI, date unknown (contract v1 pumps do "
                "not report it)",
                details,
            )
        return f"Battery ERI: EOS in about {max(days, 0.0):.0f} days", details
