"""The load worker's decisions, without I/O: what to send when, and what each message says.

Pure functions of their arguments (the caller passes `now`; nothing here reads a clock, a
socket or the environment), so `sim_fleet._load` can unit-test them and keep its hot loop lean:

- `share`: one worker's rate, total and release batch (the token bucket's parameters);
- `release`: how many messages to publish at `now`, and whether the window has ended;
- `select_timeout`: how long the worker may sleep in `select` before the next release;
- `payload`: the bytes of round r of one pump, from its flat row (see `Row`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = ["BATCH_S", "MAX_BATCH", "Row", "iso", "payload", "release", "select_timeout", "share"]

BATCH_S = 0.002
"""Messages are released in batches of about this long at the worker's rate."""
MAX_BATCH = 8192
"""At most this many publishes between two flushes to the sockets."""

Row = tuple[Any, str, bytes, bytes, bytes, bytes, int, float, float, float, float]
"""One pump, flat for the hot loop: its connection (opaque here), topic, the four template parts,
first device time (t0 + phase), reservoir capacity, reservoir used at round 0, drain per round,
refill span (capacity - alarm - 0.5)."""


def share(rate: float, duration_s: float, processes: int) -> tuple[float, int, int]:
    """One worker's part of the command's `rate`: (msg/s, messages in all, minimum batch)."""
    own = rate / processes
    total = round(rate * duration_s / processes)
    return own, total, max(1, int(own * BATCH_S))


def release(
    now: float, start: float, end: float, rate: float, sent: int, total: int, min_batch: int
) -> tuple[int, bool]:
    """(how many to publish now, whether the window is over) after `sent` of `total`.

    The token bucket: by `now` the worker may have sent `(now - start) * rate + 1` (at most
    `total`); what is due is released once it is `min_batch` or more, or, if less, when it is
    the rest of the total or the window is (about to be) over. At or after `end` everything left
    is due. A release is capped at `MAX_BATCH`; 0 means wait.
    """
    last = now >= end  # send what is left (if the window allows), then stop
    due = (total if last else min(int((now - start) * rate) + 1, total)) - sent
    if due >= min_batch or (due > 0 and (last or now + BATCH_S >= end or sent + due == total)):
        return min(due, MAX_BATCH), last
    return 0, last


def select_timeout(
    now: float, start: float, sent: int, min_batch: int, rate: float, pending: bool
) -> float:
    """How long to wait for the sockets: briefly while bytes wait to be written, else until the
    next batch is due (at most 10 ms, so housekeeping and `stop` are seen in time)."""
    if pending:
        return 0.0005
    wait = start + (sent + min_batch) / rate - now
    return min(max(wait, 0.0), 0.01)


_DAYS: dict[int, bytes] = {}


def iso(epoch_s: int) -> bytes:
    """RFC 3339 UTC with whole seconds, as pydantic writes it (`...Z`); days are cached."""
    day, sec = divmod(epoch_s, 86_400)
    prefix = _DAYS.get(day)
    if prefix is None:
        prefix = _DAYS[day] = (
            datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%dT").encode()
        )
    h, rest = divmod(sec, 3600)
    m, s = divmod(rest, 60)
    return b"%s%02d:%02d:%02dZ" % (prefix, h, m, s)


def payload(
    p: Row, rnd: int, seq_start: int, interval_s: int, wall_cap: int, iso: Any = iso
) -> bytes:
    """The message of round `rnd` of the pump in row `p` (the hot loop: one call a message).

    Device time advances `interval_s` a round but never past `wall_cap` (the wall clock, whole
    seconds); seq is `seq_start + rnd`; the reservoir falls by the drain each round and is
    refilled (a sawtooth over the refill span) before it reaches the alarm volume.
    """
    epoch = p[6] + rnd * interval_s
    if epoch > wall_cap:
        epoch = wall_cap
    return b"".join(
        (
            p[2],
            iso(epoch),
            p[3],
            b"%d" % (seq_start + rnd),
            p[4],
            b"%.3f" % (p[7] - (p[8] + rnd * p[9]) % p[10]),
            p[5],
        )
    )
