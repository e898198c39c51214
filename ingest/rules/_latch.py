"""Hysteresis for one (pump, rule): a condition starts an alert only after holding for a while,
ends it only after being gone for a while, and escalates at once, so noise cannot storm."""

from __future__ import annotations

from pumpfleet.findings import PRIORITY_RANK, Priority


class Latch:
    """The alert state the engine last reported for one (pump, rule), and pending transitions.

    `update(raw, t, on_s, off_s)` feeds the raw condition at time `t` (seconds) and returns True
    when the reported state changes: a start after `raw` held `on_s`, an end after it was None
    for `off_s`, an escalation at once, or a de-escalation after the lower level held `off_s`.
    """

    __slots__ = ("key", "lower_since_s", "off_s", "off_since_s", "on_since_s", "priority")

    def __init__(self) -> None:
        self.priority: Priority | None = None
        self.on_since_s: float | None = None
        self.off_since_s: float | None = None
        self.lower_since_s: float | None = None
        self.key: object = None
        """What the open alert is about (e.g. which pump alarms); a change is reported again."""
        self.off_s = 0.0
        """The off hold of the condition while it held: a rule that says "absent" need not
        know how long its alert must wait before it ends."""

    @property
    def idle(self) -> bool:
        """Nothing reported and nothing pending: the engine may forget this latch."""
        return self.priority is None and self.on_since_s is None

    def update(self, raw: Priority | None, t: float, on_s: float, off_s: float) -> bool:
        current = self.priority
        if raw is None:
            self.on_since_s = None
            self.lower_since_s = None
            if current is None:
                return False
            if self.off_since_s is None:
                self.off_since_s = t
            if t - self.off_since_s >= off_s:
                self.priority = None
                self.off_since_s = None
                self.key = None
                return True
            return False
        self.off_since_s = None
        if current is None:
            if self.on_since_s is None:
                self.on_since_s = t
            if t - self.on_since_s >= on_s:
                self.priority = raw
                self.on_since_s = None
                return True
            return False
        if raw == current:
            self.lower_since_s = None
            return False
        if PRIORITY_RANK[raw] > PRIORITY_RANK[current]:
            self.priority = raw
            self.lower_since_s = None
            return True
        if self.lower_since_s is None:
            self.lower_since_s = t
        if t - self.lower_since_s >= off_s:
            self.priority = raw
            self.lower_since_s = None
            return True
        return False
