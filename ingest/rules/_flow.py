"""over_infusion and under_infusion: is the pump delivering what it was programmed to?

Three sources of evidence, each honest about which pumps it works on:

1. Delivery counts, every pump family. `delivered_ul_per_h` (rotor or valve counts) against
   `scheduled_ul_per_h` (what the programme, steps and boluses, asked for over the same
   interval; v1: the programmed rate, intervals with a bolus skipped), summed over the last
   6 h of infusing readings. Outside +-14.5 % the pump itself is not doing what it was told (a
   rotor at 1 %, 50 %, 130 % or 200 %). Counts are exact, so no noise allowance is needed.
2. Measured reservoir trend, `reservoir_source: measured` only. The least-squares slope of the
   measured volume against the rotor count, over 24 h and over the newest 6 h, from hourly
   sums (bounded memory). The slope is how much drug left the reservoir per uL the rotor
   counted: 1 +- 14.5 % for a healthy pump. It fires only when the slope's confidence bound
   (3 standard errors, from the fit's own residuals: the sensor's noise) lies outside the
   label, so noise cannot page and the window is long enough to see a +16 % over-infusion
   through a few uL of noise. A full 24 h window too imprecise to judge +-14.5 % (a noisy
   sensor on a slow pump) is said out loud: the pump gets the flow_not_observable notice. A
   calculated volume falls exactly as the rotor counts, whatever happens to the drug: no trend
   is computed on it (flow_not_observable says so instead).
3. No delivery: the rotor at 0 while the programme asks for flow and nobody suspended the pump
   (20 min). Not during or after an MRI scan (post_mri watches that), and inhibited while a
   pump alarm explains it (empty reservoir, EOS, critical memory error, motor stall): one
   cause, one page, the consequence rides on the critical alarm.

An open alert ends only once its condition is clearly absent: the deviation back inside +-10 %
(and, for the trend, confidently inside the label), held for the off duration (2 h counts,
6 h trend). Between the limit and the clear band an open alert stays open: no flapping.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from typing import Any, Literal

from ingest.rules._facts import ABSENT, INF, Pump, Rule, Verdict
from pumpfleet.contract import (
    Bolus,
    Message,
    MotorStallRecovery,
    PumpState,
    Refill,
    ReservoirSource,
    Resume,
    Suspend,
    Telemetry,
)
from pumpfleet.findings import Priority

Call = Literal["over", "under", "clear", "hold"]
"""A window's call: outside the label, clearly inside it, or in between (keep what is open)."""

_COUNTS_BUCKET_S = 3600.0
_DELIVERED_UL = 5.0
"""A long window whose rotor counted less than this saw a stopped pump, not a noisy sensor."""
_RESTART_GAP_INTERVALS = 6.0


_N, _SX, _SY, _SXX, _SXY, _SYY, _FIRST, _LAST, _XMIN, _XMAX = range(10)


class Fit:
    """Least-squares sums of one window: y (measured uL) against x (rotor uL), in one array
    (about 130 bytes a bucket instead of 300 for eight float objects)."""

    __slots__ = ("s",)

    def __init__(self) -> None:
        self.s = array("d", (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, INF, -INF, INF, -INF))

    @property
    def n(self) -> int:
        return int(self.s[_N])

    @property
    def first_s(self) -> float:
        return self.s[_FIRST]

    def add(self, t: float, x: float, y: float) -> None:
        s = self.s
        s[_N] += 1
        s[_SX] += x
        s[_SY] += y
        s[_SXX] += x * x
        s[_SXY] += x * y
        s[_SYY] += y * y
        s[_FIRST] = min(s[_FIRST], t)
        s[_LAST] = max(s[_LAST], t)
        s[_XMIN] = min(s[_XMIN], x)
        s[_XMAX] = max(s[_XMAX], x)

    def subtract(self, other: Fit, first: Fit) -> None:
        """Take a bucket that left the window out of running sums; `first` is the oldest one
        still in (where the window now starts)."""
        s, o = self.s, other.s
        for i in range(_FIRST):
            s[i] -= o[i]
        s[_FIRST] = first.s[_FIRST]
        s[_XMIN] = first.s[_XMIN]

    def merge(self, other: Fit) -> None:
        s, o = self.s, other.s
        for i in range(_FIRST):
            s[i] += o[i]
        s[_FIRST] = min(s[_FIRST], o[_FIRST])
        s[_LAST] = max(s[_LAST], o[_LAST])
        s[_XMIN] = min(s[_XMIN], o[_XMIN])
        s[_XMAX] = max(s[_XMAX], o[_XMAX])

    def x_range(self) -> float:
        """Rotor uL counted across the window (readings are in rotor order: x only grows)."""
        s = self.s
        return s[_XMAX] - s[_XMIN] if s[_N] else 0.0

    def _centred(self) -> tuple[float, float, float] | None:
        s = self.s
        n = s[_N]
        if n < 4:
            return None
        sxx = s[_SXX] - s[_SX] * s[_SX] / n
        if sxx <= 1e-9:
            return None
        return sxx, s[_SXY] - s[_SX] * s[_SY] / n, s[_SYY] - s[_SY] * s[_SY] / n

    def slope(self) -> tuple[float, float] | None:
        """(ratio of reservoir fall to rotor count, its standard error); None if unjudgeable."""
        got = self._centred()
        if got is None:
            return None
        sxx, sxy, syy = got
        b = sxy / sxx
        resid = max(0.0, syy - b * sxy) / (self.s[_N] - 2)
        return -b, math.sqrt(resid / sxx)

    def predict(self, x: float) -> float | None:
        got = self._centred()
        if got is None:
            return None
        s = self.s
        n = s[_N]
        return s[_SY] / n + got[1] / got[0] * (x - s[_SX] / n)


def t_quantile(z: float, df: int) -> float:
    """Student's t at the normal quantile `z` with `df` degrees of freedom (Cornish-Fisher, a
    few % of the exact value from df 10 on): the residual SE of a short fit is itself noisy, so
    a bound of z standard errors would be too narrow on few readings."""
    if df <= 0:
        return math.inf
    z3, z5 = z**3, z**5
    return z + (z3 + z) / (4 * df) + (5 * z5 + 16 * z3 + 3 * z) / (96 * df * df)


def call_ratio(ratio: float, spread: float, th: Any) -> Call:
    """Ratio delivered/programmed (1 = as programmed), with `spread` (z x standard error)."""
    acc, clear = th.flow_accuracy, th.flow_clear_fraction
    if ratio - spread > 1.0 + acc:
        return "over"
    if ratio + spread < 1.0 - acc:
        return "under"
    if abs(ratio - 1.0) <= clear and ratio + spread <= 1.0 + acc and ratio - spread >= 1.0 - acc:
        return "clear"
    return "hold"


class FlowState:
    """Per-pump evidence for both flow rules."""

    __slots__ = (
        "bolus_until_s",
        "causes",
        "counts",
        "counts_call",
        "counts_fig",
        "no_delivery",
        "prev_programmed",
        "trend",
        "trend_blind",
        "trend_call",
        "trend_fig",
        "trend_from_seq",
        "trend_restart",
        "trend_whole",
        "trend_x",
        "trend_y0",
        "zero_since_s",
        "zero_ul",
    )

    def __init__(self) -> None:
        self.counts: deque[array[float]] = deque()
        """[bucket start, delivered uL, scheduled uL, first reading s]"""
        self.counts_call: Call | None = None
        self.counts_fig: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.trend: deque[tuple[float, Fit]] = deque()
        self.trend_whole: Fit | None = None
        """The long window's sums at the last reading (it predicts the next one)."""
        self.trend_x = 0.0
        self.trend_y0 = 0.0
        self.trend_restart = True
        self.trend_from_seq = -1
        """The last refill's seq: a reading older than it says nothing of the refilled
        reservoir (stored late, behind the refill event that overtook it)."""
        self.trend_call: Call | None = None
        self.trend_fig: dict[str, Any] = {}
        self.trend_blind = False
        self.no_delivery = False
        self.zero_since_s = INF
        """Start of the interval the current run of zero counts began in."""
        self.zero_ul = 0.0
        """What the programme asked for during that run."""
        self.causes: dict[str, tuple[str, ...]] = {}
        """Per rule, the sources that fired its open alert: those must clear to end it."""
        self.bolus_until_s = -INF
        self.prev_programmed: float | None = None


def flow_state(p: Pump) -> FlowState:
    st = p.state.get("flow")
    if st is None:
        st = p.state["flow"] = FlowState()
    return st


def _counts(st: FlowState, p: Pump, m: Telemetry, t: float) -> None:
    th = p.th
    dt_h = p.interval_s / 3600.0
    infusing = m.pump_state is PumpState.INFUSING and not p.mri_active and not p.suspended
    if m.scheduled_ul_per_h is not None:
        scheduled = m.scheduled_ul_per_h
        usable = infusing
    else:  # v1: the rate now; an interval with a bolus or a step change cannot be compared
        scheduled = m.programmed_rate_ul_per_h
        steady = st.prev_programmed is None or st.prev_programmed == scheduled
        usable = infusing and steady and t - p.interval_s >= st.bolus_until_s
        st.prev_programmed = scheduled
    if usable and scheduled > 0:
        start = t - t % _COUNTS_BUCKET_S
        buckets = st.counts
        if buckets and buckets[-1][0] == start:
            bucket = buckets[-1]
            bucket[1] += m.delivered_ul_per_h * dt_h
            bucket[2] += scheduled * dt_h
        else:
            buckets.append(array("d", (start, m.delivered_ul_per_h * dt_h, scheduled * dt_h, t)))
    buckets = st.counts
    while buckets and buckets[0][0] + _COUNTS_BUCKET_S <= t - th.counts_window_s:
        buckets.popleft()
    if not buckets:
        st.counts_call = None
        return
    delivered = sum(b[1] for b in buckets)
    scheduled_ul = sum(b[2] for b in buckets)
    span = t - buckets[0][3]
    if span < th.counts_min_span_s or scheduled_ul < th.counts_min_scheduled_ul:
        st.counts_call = None
        return
    ratio = delivered / scheduled_ul
    st.counts_call = call_ratio(ratio, th.counts_quantum_ul / scheduled_ul, th)
    st.counts_fig = (delivered, scheduled_ul, span)  # made into figures only when reported


def _trend(st: FlowState, p: Pump, m: Telemetry, t: float) -> None:
    th = p.th
    if m.source is not ReservoirSource.MEASURED:
        st.trend.clear()
        st.trend_whole = None
        st.trend_restart = True
        st.trend_call = None
        st.trend_blind = False
        return
    if m.seq < st.trend_from_seq:
        return
    y_ml = m.reservoir_ml
    gap = t - p.prev_tel_s
    if st.trend_restart or gap > _RESTART_GAP_INTERVALS * p.interval_s or gap <= 0:
        _restart(st, y_ml)
    else:
        # The rotor count since the previous reading used: a reading lost or arriving late
        # leaves its interval to the next one, at that one's rate.
        st.trend_x += m.delivered_ul_per_h * gap / 3600.0
        y = (y_ml - st.trend_y0) * 1000.0
        # The fit up to the previous reading predicts this one.
        predicted = st.trend_whole.predict(st.trend_x) if st.trend_whole is not None else None
        if predicted is not None and y - predicted > th.trend_jump_ml * 1000.0:
            _restart(st, y_ml)  # a refill whose event was lost
    y = (y_ml - st.trend_y0) * 1000.0
    start = t - t % th.trend_bucket_s
    if not st.trend or st.trend[-1][0] != start:
        st.trend.append((start, Fit()))
    st.trend[-1][1].add(t, st.trend_x, y)
    # The long window's sums run along (O(1) a reading); the short one merges its few buckets.
    whole = st.trend_whole
    if whole is None:
        whole = st.trend_whole = Fit()
    whole.add(t, st.trend_x, y)
    while st.trend and st.trend[0][0] + th.trend_bucket_s <= t - th.trend_window_s:
        _, gone = st.trend.popleft()
        whole.subtract(gone, st.trend[0][1])
    st.trend_blind = False
    judged: list[tuple[Call, dict[str, Any], float]] = []
    for window_s in (th.trend_short_window_s, th.trend_window_s):
        if window_s == th.trend_window_s:
            fit = st.trend_whole
        else:
            fit = _window(st, t, window_s, th.trend_bucket_s)
        if fit is None or t - fit.first_s < th.trend_min_span_fraction * window_s:
            continue
        got = fit.slope() if fit.n >= th.trend_min_readings else None
        if got is None:
            continue
        ratio, se = got
        if window_s != th.trend_window_s and fit.x_range() < th.trend_short_min_rotor_ul:
            continue
        if window_s == th.trend_window_s and se > th.trend_max_se:
            # Too imprecise to call +-14.5 % either way: no verdict. Said out loud only where
            # the pump delivered (a stopped rotor is not a noisy sensor).
            if fit.x_range() >= _DELIVERED_UL:
                st.trend_blind = True
            continue
        call = call_ratio(ratio, t_quantile(th.trend_z, fit.n - 2) * se, th)
        fig = {
            "cause": "measured_trend",
            "window_h": round((t - fit.first_s) / 3600.0, 1),
            "readings": fit.n,
            "deviation_pct": round((ratio - 1.0) * 100, 1),
            "standard_error_pct": round(se * 100, 2),
            "limit_pct": th.flow_accuracy * 100,
        }
        judged.append((call, fig, t - fit.first_s))
    # Either window outside the label fires; only the long one can say "clearly absent".
    st.trend_call, st.trend_fig = None, {}
    for call, fig, _span in judged:
        if call in ("over", "under"):
            st.trend_call, st.trend_fig = call, fig
            return
    if judged:
        call, fig, span = judged[-1]
        long_full = span >= th.trend_min_span_fraction * th.trend_window_s
        st.trend_call = call if (call != "clear" or long_full) else "hold"
        st.trend_fig = fig


def _restart(st: FlowState, y_ml: float) -> None:
    st.trend.clear()
    st.trend_whole = None
    st.trend_x = 0.0
    st.trend_y0 = y_ml
    st.trend_restart = False


def _window(st: FlowState, t: float, window_s: float, bucket_s: float) -> Fit | None:
    """The sums of the buckets inside the newest `window_s` (newest first: stops early)."""
    fit: Fit | None = None
    for start, bucket in reversed(st.trend):
        if start + bucket_s <= t - window_s:
            break
        if fit is None:
            fit = Fit()
        fit.merge(bucket)
    return fit


def observe_flow(p: Pump, msg: Message, t: float) -> None:
    st = flow_state(p)
    if isinstance(msg, Telemetry):
        if p.new_tel:
            _counts(st, p, msg, t)
            _trend(st, p, msg, t)
            zero = (
                msg.delivered_ul_per_h <= 0.0
                and p.scheduled_ul_per_h > 0.0
                and msg.pump_state is not PumpState.SUSPENDED
                and not p.suspended
                and not p.mri_active  # an MRI stall is post_mri's
                and not p.explained_stop()  # nor one a pump alarm explains: it pages itself
            )
            if zero:
                if st.zero_since_s == INF:
                    st.zero_since_s, st.zero_ul = t - p.interval_s, 0.0
                st.zero_ul += p.scheduled_ul_per_h * p.interval_s / 3600.0
            else:
                st.zero_since_s, st.zero_ul = INF, 0.0
            th = p.th
            st.no_delivery = (
                zero
                and st.zero_ul >= th.no_delivery_min_ul
                and (t - st.zero_since_s >= th.no_delivery_on_s)
            )
    elif isinstance(msg, Refill):
        st.no_delivery = False  # a refill ends a stop; the next reading says how it runs
        st.zero_since_s, st.zero_ul = INF, 0.0
        st.trend_restart = True  # the reservoir trend starts again from the next reading
        st.trend_from_seq = max(st.trend_from_seq, msg.seq)
        st.trend.clear()
        st.trend_whole = None
        st.trend_call = None
    elif isinstance(msg, MotorStallRecovery):
        st.no_delivery = False
        st.zero_since_s, st.zero_ul = INF, 0.0
    elif isinstance(msg, Bolus):
        st.bolus_until_s = max(st.bolus_until_s, t + msg.duration_min * 60.0)
    elif isinstance(msg, (Suspend, Resume)):
        st.counts.clear()
        st.counts_call = None


def _judge_flow(
    p: Pump, name: str, direction: Call, stalled: bool, priority: Priority, th: Any
) -> Verdict:
    """Fire on any source outside the label; end only once every source that fired it is
    clearly inside (a stall: once the rotor turns); in between an open alert stays open."""
    st = flow_state(p)
    sources = {"delivery_counts": st.counts_call, "measured_trend": st.trend_call}
    fired = {k for k, c in sources.items() if c == direction}
    if stalled:
        fired.add("no_delivery")
    if fired:
        st.causes[name] = tuple(sorted(fired))
        if fired == {"no_delivery"}:  # its hold is in `zero_since_s`
            return Verdict(priority, 0.0, th.no_delivery_off_s, "no_delivery")
        off = th.trend_off_s if "measured_trend" in fired else th.counts_off_s
        return Verdict(priority, 0.0, off, "flow")
    current = p.priority(name)
    if current is None:
        return ABSENT
    causes = st.causes.get(name, ())
    if all(sources.get(c, "clear") == "clear" for c in causes if c != "no_delivery"):
        return ABSENT
    return Verdict(current, 0.0, p.latches[name].off_s, "flow")


class OverInfusion(Rule):
    name = "over_infusion"
    off_attr = "trend_off_s"

    def observe(self, p: Pump, msg: Message, t: float) -> None:
        observe_flow(p, msg, t)  # shared with under_infusion: run once, here

    def reset(self, p: Pump) -> None:
        """The agent lost its seq store: seqs start again, so does the trend."""
        st = p.state.get("flow")
        if st is not None:
            st.trend_from_seq = -1
            st.trend_restart = True

    def judge(self, p: Pump, t: float) -> Verdict:
        if "flow" not in p.state:
            return ABSENT
        th = p.th
        return _judge_flow(p, self.name, "over", False, th.over_infusion_priority, th)

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        return _text(flow_state(p), active, "Over-infusion", "over", p.th)


class UnderInfusion(Rule):
    name = "under_infusion"
    off_attr = "trend_off_s"

    def judge(self, p: Pump, t: float) -> Verdict:
        st = p.state.get("flow")
        if st is None:
            return ABSENT
        th = p.th
        stalled = st.no_delivery and not p.mri_active and not p.explained_stop()
        return _judge_flow(p, self.name, "under", stalled, th.under_infusion_priority, th)

    def describe(self, p: Pump, active: bool) -> tuple[str, dict[str, Any]]:
        st = flow_state(p)
        if active and st.no_delivery:
            tel = p.tel
            details = {
                "cause": "no_delivery",
                "delivered_ul_per_h": tel.delivered_ul_per_h if tel else None,
                "scheduled_ul_per_h": p.scheduled_ul_per_h,
                "pump_state": tel.pump_state.value if tel else None,
            }
            return (
                f"No delivery while programmed {p.scheduled_ul_per_h:.2f} uL/h "
                f"(pump {details['pump_state']})",
                details,
            )
        return _text(st, active, "Under-infusion", "under", p.th)


def _text(
    st: FlowState, active: bool, what: str, direction: str, th: Any
) -> tuple[str, dict[str, Any]]:
    parts = []
    details: dict[str, Any] = {}
    if st.counts_call is not None:
        delivered, scheduled, span = st.counts_fig
        f = {
            "cause": "delivery_counts",
            "delivered_ul": round(delivered, 1),
            "scheduled_ul": round(scheduled, 1),
            "window_h": round(span / 3600.0, 1),
            "deviation_pct": round((delivered / scheduled - 1.0) * 100, 1) if scheduled else 0.0,
            "limit_pct": th.flow_accuracy * 100,
        }
        details["delivery_counts"] = f
        parts.append(
            f"rotor/valve counts {f['delivered_ul']:.1f} uL against {f['scheduled_ul']:.1f} uL "
            f"programmed in {f['window_h']:g} h ({f['deviation_pct']:+.1f} %)"
        )
    if st.trend_call is not None and st.trend_fig:
        f = st.trend_fig
        details["measured_trend"] = f
        parts.append(
            f"measured reservoir fell {f['deviation_pct']:+.1f} % (+-{f['standard_error_pct']:.1f} "
            f"% SE) against the rotor count over {f['window_h']:g} h"
        )
    fired = [
        k
        for k, c in (("delivery_counts", st.counts_call), ("measured_trend", st.trend_call))
        if c == direction
    ]
    details["cause"] = fired[0] if fired else "none"
    text = "; ".join(parts) or "no window to judge"
    limit = f"limit +-{th.flow_accuracy * 100:.1f} %"
    return (f"{what}: {text} ({limit})" if active else f"{what} ended: {text}"), details
