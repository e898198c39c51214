"""The load worker's pure decisions (`sim_fleet._pacing`): the token bucket, the select timeout
and the message of pump k in round r. No sockets, no clock: time is passed in."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest

from sim_fleet._load import LoadConfig, render, templates
from sim_fleet._pacing import (
    MAX_BATCH,
    Row,
    iso,
    payload,
    release,
    select_timeout,
    share,
)


def test_share_splits_the_rate_and_total_evenly_and_batches_about_2_ms() -> None:
    assert share(20_000, 60, 2) == (10_000.0, 600_000, 20)
    assert share(1_000, 1.5, 3) == (pytest.approx(333.333, abs=1e-3), 500, 1)  # never below 1
    assert share(100, 2, 1)[2] == 1


def _simulate(
    rate: float, duration: float, total: int, min_batch: int, steps: list[float]
) -> list[tuple[float, int]]:
    """Drive `release` along a clock that advances by `steps` (cycled) until the window ends;
    the (now, batch) of each release, every batch sent in full."""
    start = 1_000.0
    end = start + duration
    now, sent, out, i = start, 0, [], 0
    while True:
        batch, last = release(now, start, end, rate, sent, total, min_batch)
        if batch:
            out.append((now, batch))
            sent += batch
        if last:
            return out
        now += steps[i % len(steps)]
        i += 1


@pytest.mark.parametrize("rate", [500.0, 10_000.0, 60_000.0])
def test_release_sends_exactly_the_total_by_the_end_and_never_ahead_of_the_bucket(
    rate: float,
) -> None:
    duration = 1.0
    _, total, min_batch = share(rate, duration, 1)
    steps = [random.Random(7).uniform(0.0001, 0.004) for _ in range(97)]
    released = _simulate(rate, duration, total, min_batch, steps)
    assert sum(b for _, b in released) == total
    sent = 0
    for now, batch in released:
        sent += batch
        assert sent <= int((now - 1_000.0) * rate) + 1, "ahead of the token bucket"


def test_no_batch_below_min_batch_except_at_the_end() -> None:
    rate, duration = 10_000.0, 1.0
    _, total, min_batch = share(rate, duration, 1)
    assert min_batch == 20
    released = _simulate(rate, duration, total, min_batch, [0.0003, 0.0011, 0.0002])
    small = [(now, b) for now, b in released if b < min_batch]
    assert all(now + 0.002 >= 1_001.0 for now, _ in small), small
    assert len(released) > 100  # and the pacing really did release in many small batches


def test_release_waits_while_less_than_a_batch_is_due_mid_window() -> None:
    # 0.5 s into a 10 s window at 10,000/s: 5,001 may have gone, 4,990 have: 11 < 20 due
    assert release(100.5, 100.0, 110.0, 10_000.0, 4_990, 100_000, 20) == (0, False)
    assert release(100.5, 100.0, 110.0, 10_000.0, 4_981, 100_000, 20) == (20, False)


def test_the_last_moment_flush_releases_what_is_due_even_below_a_batch() -> None:
    # within 2 ms of the end: the 4 due go now, not after the window; 10 ms before, they wait
    assert release(109.9985, 100.0, 110.0, 1_000.0, 9_995, 20_000, 20) == (4, False)
    assert release(109.99, 100.0, 110.0, 1_000.0, 9_987, 20_000, 20) == (0, False)
    # the rest of the total goes at once even mid-window (but not 6 of more to come)
    assert release(105.0, 100.0, 110.0, 10_000.0, 49_995, 50_000, 20) == (5, False)
    assert release(105.0, 100.0, 110.0, 10_000.0, 49_995, 50_010, 20) == (0, False)


def test_at_the_end_everything_left_is_due_capped_per_release() -> None:
    assert release(110.0, 100.0, 110.0, 10.0, 60, 100, 20) == (40, True)
    # whatever the bucket says: a window that ran late still sends all of its total
    assert release(110.0, 100.0, 110.0, 10.0, 0, 1_000, 20) == (1_000, True)
    assert release(111.0, 100.0, 110.0, 1e6, 0, 100_000, 20) == (MAX_BATCH, True)
    assert release(111.0, 100.0, 110.0, 10.0, 100, 100, 20) == (0, True)


def test_select_timeout_short_while_writing_else_until_the_next_batch_at_most_10_ms() -> None:
    assert select_timeout(100.0, 100.0, 0, 20, 10_000.0, True) == 0.0005
    assert select_timeout(100.0, 100.0, 0, 20, 10_000.0, False) == pytest.approx(0.002)
    assert select_timeout(100.0, 100.0, 0, 20, 100.0, False) == 0.01  # the next batch is 0.2 s off
    assert select_timeout(101.0, 100.0, 0, 20, 10_000.0, False) == 0.0  # behind: no sleep


def _row(t0: int = 1_000_000, capacity: float = 20.0, used: float = 0.0) -> Row:
    # connection, topic, parts, first device time, capacity, used at round 0, drain, span
    return (None, "t", b"<", b"|", b"|", b">", t0, capacity, used, 4.0, 10.0)


def _fields(raw: bytes) -> tuple[bytes, int, float]:
    time_, seq, reservoir = raw[1:-1].split(b"|")
    return time_, int(seq), float(reservoir)


def test_payload_time_advances_an_interval_a_round_and_is_capped_at_the_wall_clock() -> None:
    p = _row(t0=86_400)
    assert _fields(payload(p, 0, 1, 600, 10**9))[0] == b"1970-01-02T00:00:00Z"
    assert _fields(payload(p, 3, 1, 600, 10**9))[0] == b"1970-01-02T00:30:00Z"
    capped = payload(p, 3, 1, 600, 86_400 + 1_000)  # round 3 would be 1,800 s on
    assert _fields(capped)[0] == b"1970-01-02T00:16:40Z"


def test_payload_seq_is_the_start_plus_the_round() -> None:
    p = _row()
    assert [_fields(payload(p, r, 1_000, 600, 10**9))[1] for r in range(4)] == [
        1_000,
        1_001,
        1_002,
        1_003,
    ]


def test_payload_reservoir_falls_by_the_drain_and_refills_before_the_span_is_used() -> None:
    p = _row(capacity=20.0, used=1.0)  # drain 4 a round, refill span 10
    got = [_fields(payload(p, r, 1, 600, 10**9))[2] for r in range(5)]
    assert got == [19.0, 15.0, 11.0, 17.0, 13.0]  # used 1, 5, 9, then 13 -> 3 (refilled), 17 -> 7
    assert all(20.0 - 10.0 < v <= 20.0 for v in got)


def test_payload_is_render_of_the_real_templates_when_not_capped() -> None:
    config = LoadConfig(pumps=4)
    t0 = 1_700_000_000
    for t in templates(config, range(4)):
        row: Row = (
            None,
            t.topic,
            *t.parts,
            t0 + t.phase_s,
            t.capacity_ml,
            t.used_ml,
            t.drain_ml,
            t.capacity_ml - t.alarm_ml - 0.5,
        )
        for r in (0, 1, 57):
            raw = payload(row, r, 42, 600, 2_000_000_000)
            assert raw == render(t, r, 42, t0, 600)
            assert json.loads(raw)["seq"] == 42 + r


def test_iso_is_rfc3339_utc_whole_seconds() -> None:
    for epoch in (0, 59, 86_399, 86_400, 1_700_000_123, 951_782_400 + 86_399):  # 2000-02-29
        want = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
        assert iso(epoch) == want
