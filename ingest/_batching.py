"""The ingester's batching decisions, apart from its I/O (ingest/_service.py does the I/O).

Pure: no asyncio, no database, no broker, no clock. A time is always passed in (`now`), the
queue and the results are plain values, and every function here is tested on its own
(ingest/tests/test_batching.py). What is decided here:

- when the network thread wakes the writer (`wake_writer`: the batch reached `batch_max`) and
  how long the writer waits otherwise (`flush_timeout_s`);
- what a flush takes from the queue (`cut`: everything queued at that moment, oldest first);
- the per-pump rate limit (`TokenBuckets`, keyed by `pump_key`) and the payload size limit;
- which of a batch's pumps are registered and which quarantined (`sort_pumps`, `quarantine`);
- how a batch the database refused is written again (`one_by_one`, `add_result`);
- which packet ids are acknowledged after the commit, in what order, and how many are stale
  (`acks`), and how many throttled messages a batch held (`rate_limited`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pumpfleet import contract

if TYPE_CHECKING:
    from ingest._store import DeadLetter, WriteResult
    from pumpfleet.contract import Message


@dataclass(slots=True)
class Item:
    """One message as the network thread received it, waiting in the queue for its batch."""

    gen: int
    """The generation of the connection that delivered it: its `mid` means nothing on another."""
    mid: int
    qos: int
    received: float
    """Wall-clock receive time (seconds since the epoch)."""
    topic: str
    payload: bytes | bytearray
    msg: Message | None
    """The decoded message, or None when it is a dead letter."""
    dead: DeadLetter | None
    limited: bool = False
    """Throttled by the per-pump rate limit (its dead letter says so)."""


# When a batch is written ----------------------------------------------------------------------


def wake_writer(pending: int, batch_max: int) -> bool:
    """Whether the message just queued (making `pending`) should wake the writer at once.

    Exactly when the queue reaches `batch_max`: once per batch, not once per message after it
    (the writer takes everything queued when it wakes, however many that is by then)."""
    return pending == batch_max


def flush_timeout_s(flush_ms: int | float) -> float:
    """How long the writer waits for a wake-up before it writes whatever is queued."""
    return flush_ms / 1000


def cut(queue: deque[Item]) -> list[Item]:
    """The batch: every item queued when the flush starts, oldest first.

    The count is read once: items the network thread appends meanwhile wait for the next batch
    (appends and pops of a deque are atomic, so no lock is needed)."""
    return [queue.popleft() for _ in range(len(queue))]


def split(batch: Iterable[Item]) -> tuple[list[Message], list[DeadLetter]]:
    """The batch's decoded messages and its dead letters, each in receive order."""
    msgs: list[Message] = []
    dead: list[DeadLetter] = []
    for item in batch:
        if item.msg is not None:
            msgs.append(item.msg)
        if item.dead is not None:
            dead.append(item.dead)
    return msgs, dead


# What is let in ------------------------------------------------------------------------------


class TokenBuckets:
    """Per-pump token buckets: `take` is O(1); memory holds only the pumps still paying back.

    A bucket holds up to `burst` tokens and refills at `rate_per_s`; each message takes one. A
    bucket that has refilled completely is the same as none, so when the table reaches its
    size limit those are forgotten (amortised O(1): the limit doubles past the live ones). A
    real pump, one message every few minutes, is full again a second after each message."""

    __slots__ = ("_buckets", "_limit", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, size: int = 10_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._limit = size

    def take(self, key: str, now: float) -> bool:
        """One token for `key` at monotonic time `now`: True when it had one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._limit:
                self._forget_full(now)
            self._buckets[key] = (self.burst - 1.0, now)
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate_per_s
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return True
        self._buckets[key] = (tokens, now)
        return False

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        burst, rate = self.burst, self.rate_per_s
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * rate >= burst]
        for key in full:
            del self._buckets[key]
        self._limit = max(self._limit, 2 * len(self._buckets))


def pump_key(topic: str) -> str:
    """The rate limit's key: the topic's pump id (`pumps/{pump_id}/...`), else the topic."""
    parts = topic.split("/", 2)
    return parts[1] if len(parts) == 3 and parts[0] == contract.TOPIC_ROOT else topic


def limited_reason(burst: int, rate_per_s: float) -> str:
    """The dead-letter reason of a throttled message."""
    return (
        f"rate limited: more than {burst} messages at once, then {rate_per_s:g}/s, from this pump"
    )


def oversize(size: int, limit: int) -> str | None:
    """Why a payload of `size` bytes is refused, or None when it is within `limit`."""
    if size > limit:
        return f"payload: {size} bytes exceeds the {limit} limit"
    return None


# Unknown and revoked pumps -----------------------------------------------------------------


def revoked_refresh_due(now: float, read_at: float, every_s: float) -> bool:
    """Whether the revoked pumps are to be read again (monotonic times)."""
    return now - read_at >= every_s


def sort_pumps(
    unknown: set[str], rows: Iterable[tuple[str, bool]], may_register: bool
) -> tuple[set[str], dict[str, str], set[str]]:
    """Of the pumps this worker does not know, which to register, which to quarantine (pump ->
    why) and which it now knows.

    `rows`: the registry's (pump_id, revoked) for those of `unknown` it has. A revoked pump is
    quarantined whatever the mode; one the registry lacks is registered when `may_register`
    (`unknown_pumps = "register"` and the role may insert), else quarantined."""
    held: dict[str, str] = {}
    found: set[str] = set()
    known: set[str] = set()
    for pump_id, revoked_now in rows:
        found.add(pump_id)
        if revoked_now:
            held[pump_id] = "revoked"
        else:
            known.add(pump_id)
    absent = unknown - found
    if may_register:
        return absent, held, known
    held.update(dict.fromkeys(absent, "not provisioned"))
    return set(), held, known


def quarantine(
    batch: Iterable[Item], held: dict[str, str]
) -> tuple[list[Message], list[tuple[Item, str]], dict[str, int]]:
    """The batch's messages from pumps not held, in receive order; the held pumps' items with
    their dead-letter reason, in receive order; and how many each held pump sent."""
    msgs: list[Message] = []
    refused: list[tuple[Item, str]] = []
    counts: dict[str, int] = {}
    for item in batch:
        if item.msg is None:
            continue
        pump_id = item.msg.pump_id
        why = held.get(pump_id)
        if why is None:
            msgs.append(item.msg)
            continue
        counts[pump_id] = counts.get(pump_id, 0) + 1
        refused.append((item, f"quarantine: pump {pump_id} is {why}"))
    return msgs, refused, counts


# A batch the database refused ----------------------------------------------------------------


def one_by_one(batch: Iterable[Item], msgs: Iterable[Message]) -> list[tuple[Message, Item]]:
    """The messages to write again each in its own transaction, in `msgs` order, each with the
    item that carried it (its raw bytes, should the database refuse it alone too). The batch's
    dead letters are written first, together, and are not among them."""
    items = {id(i.msg): i for i in batch if i.msg is not None}
    return [(msg, items[id(msg)]) for msg in msgs]


def refused_reason(error: str) -> str:
    """The dead-letter reason of a message the database refused on its own."""
    return f"database refused: {error}"


def add_result(total: WriteResult, one: WriteResult) -> None:
    """Count one message's write into the batch's total (`total.new` keeps write order)."""
    total.new += one.new
    total.duplicates += one.duplicates
    total.statuses_superseded += one.statuses_superseded
    total.dead_letters += one.dead_letters


# After the commit -----------------------------------------------------------------------------


def acks(batch: Iterable[Item], gen: int) -> tuple[list[int], int]:
    """The packet ids to acknowledge, in receive order, and how many items are stale.

    Only items the current connection (`gen`) delivered are acknowledged (a packet id means
    nothing on another connection: the broker redelivers those), and of them only QoS > 0.
    Stale: delivered by an earlier connection."""
    mids: list[int] = []
    stale = 0
    for item in batch:
        if item.gen != gen:
            stale += 1
        elif item.qos > 0:
            mids.append(item.mid)
    return mids, stale


def rate_limited(batch: Iterable[Item], result: WriteResult) -> int:
    """How many of the committed batch's messages were throttled.

    A throttled message is a dead letter, stored or a duplicate of a stored one, so a batch
    that has neither had none: the count is skipped then."""
    if not (result.dead_letters or result.duplicates):
        return 0
    return sum(i.limited for i in batch)
