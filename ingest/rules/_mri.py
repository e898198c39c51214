"""post_mri: a stall that goes on after an MRI scan, as a notice that escalates.

The rotor stops for the whole scan and normally recovers within 2 to 24 h (domain.md); the
recovery may be logged late. While the rotor stays stopped after the scan ends: low at the scan's
end (after 15 min, so a pump that restarts at once raises nothing), medium 6 h after it, high 24 h
after it with no recovery. It ends when the rotor turns again: a `motor_stall_recovery` event,
or telemetry showing delivery (so a recovery logged late still ends it on time). Deadlines are
kept by the watchdog, so a pump that falls silent still escalates. No `mri_end` event: the scan
is assumed to end 2 h after its start. Needs mri_start/mri_end events, telemetry; every family.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ingest.rules._facts import ABSENT, INF, Pump, Rule, Verdict
from pumpfleet.contract import Message, MotorStallRecovery, MriEnd, MriStart, Telemetry
from pumpfleet.findings import Priority

POST_MRI_ON_S = 900.0


class _Scan:
    __slots__ = ("end_s", "seq", "start_s")

    def __init__(self) -> None:
        self.start_s = -INF
        self.end_s: float | None = None
        self.seq = -1


class PostMri(Rule):
    name = "post_mri"
    timed = True

    def _scan(self, p: Pump) -> _Scan | None:
        return p.state.get(self.name)

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        if isinstance(msg, MriStart):
            self._scanning(p, msg.seq, t, end_s=None)
        elif isinstance(msg, MriEnd):
            if msg.seq >= p.recovery_seq:  # else the rotor already recovered after this scan
                self._scanning(p, msg.seq, t, end_s=t)
        elif p.mri_active:
            current = self._scan(p)
            seq_after = current is not None and msg.seq > current.seq
            scan_over = current is not None and t >= self._end_s(p, current)
            if (isinstance(msg, MotorStallRecovery) and seq_after) or (
                isinstance(msg, Telemetry)
                and p.new_tel
                and seq_after
                and scan_over
                and p.delivering
            ):
                self._recovered(p)

    def _scanning(self, p: Pump, seq: int, t: float, end_s: float | None) -> None:
        """A scan starts (`end_s` None) or ends; an end with no start seen starts it too."""
        scan = self._scan(p) or _Scan()
        if not p.mri_active:
            scan.start_s = t
        scan.end_s = end_s
        scan.seq = max(scan.seq, seq)
        p.state[self.name] = scan
        p.mri_active = True

    def _recovered(self, p: Pump) -> None:
        p.mri_active = False
        p.state.pop(self.name, None)

    def _end_s(self, p: Pump, scan: _Scan) -> float:
        return scan.end_s if scan.end_s is not None else scan.start_s + p.th.mri_max_scan_s

    def judge(self, p: Pump, t: float) -> Verdict:
        scan = self._scan(p)
        if not p.mri_active or scan is None:
            return ABSENT
        th = p.th
        since_end = t - self._end_s(p, scan)
        if since_end < 0:
            return ABSENT
        if since_end >= th.mri_recovery_s:
            return Verdict(th.post_mri_priority)
        if since_end >= th.mri_medium_s:
            return Verdict(th.post_mri_medium_priority)
        return Verdict(th.post_mri_low_priority, POST_MRI_ON_S)

    def due(self, p: Pump, after_s: float) -> float:
        scan = self._scan(p)
        if not p.mri_active or scan is None:
            return INF
        th = p.th
        end = self._end_s(p, scan)
        for at in (end, end + POST_MRI_ON_S, end + th.mri_medium_s, end + th.mri_recovery_s):
            if at > after_s:
                return at
        return INF

    def restore(self, p: Pump, priority: Priority, since_s: float) -> None:
        if self._scan(p) is None:
            scan = _Scan()
            scan.start_s = scan.end_s = since_s
            p.state[self.name] = scan
            p.mri_active = True

    def reset(self, p: Pump) -> None:
        scan = self._scan(p)
        if scan is not None:
            scan.seq = -1

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        th = p.th
        scan = self._scan(p)
        details: dict[str, Any] = {"recovery_limit_h": th.mri_recovery_s / 3600}
        if scan is not None:
            end = self._end_s(p, scan)
            details["mri_end"] = datetime.fromtimestamp(end, UTC).isoformat()
            details["mri_end_assumed"] = scan.end_s is None
        if not active:
            return "Motor recovered after the MRI scan", details
        return (
            "Motor still stopped after an MRI scan: recovery expected within "
            f"{th.mri_recovery_s / 3600:g} h of the scan; notice escalates at "
            f"{th.mri_medium_s / 3600:g} h and pages at {th.mri_recovery_s / 3600:g} h",
            details,
        )
