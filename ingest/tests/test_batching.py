"""The ingester's batching decisions (ingest/_batching.py): pure, no broker, database or clock."""

from __future__ import annotations

import ast
import json
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest import _batching
from ingest._batching import (
    Item,
    TokenBuckets,
    acks,
    add_result,
    cut,
    flush_timeout_s,
    limited_reason,
    one_by_one,
    oversize,
    pump_key,
    quarantine,
    rate_limited,
    refused_reason,
    revoked_refresh_due,
    sort_pumps,
    split,
    wake_writer,
)
from ingest._metrics import Stats
from ingest._store import DeadLetter, WriteResult
from pumpfleet import contract
from pumpfleet.contract import Message
from pumpfleet.testing import telemetry_fields

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _msg(pump_id: str = "P-1", seq: int = 0) -> Message:
    body = {
        "v": 2,
        "pump_id": pump_id,
        "time": (T0 + timedelta(seconds=seq)).isoformat(),
        "seq": seq,
        **telemetry_fields(),
    }
    return contract.decode(contract.topic(pump_id, "telemetry"), json.dumps(body).encode())


def _item(
    mid: int,
    pump_id: str = "P-1",
    *,
    gen: int = 1,
    qos: int = 1,
    dead: bool = False,
    limited: bool = False,
) -> Item:
    topic = contract.topic(pump_id, "telemetry")
    received = 1_000.0 + mid
    if dead or limited:
        letter = DeadLetter(topic, b"{", "not JSON", datetime.fromtimestamp(received, UTC))
        return Item(gen, mid, qos, received, topic, b"{", None, letter, limited)
    return Item(gen, mid, qos, received, topic, b"...", _msg(pump_id, mid), None)


# The module is pure ------------------------------------------------------------------------


def test_the_module_does_no_io_and_reads_no_clock() -> None:
    tree = ast.parse(Path(_batching.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"asyncio", "asyncpg", "paho", "time", "threading", "socket", "tenacity"}
    assert not imported & forbidden
    assert "datetime" not in imported
    # A time is passed in (`now`), never read: no `time.monotonic()`, `datetime.now()`, ...
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attributes & {"monotonic", "perf_counter", "time", "time_ns", "now", "utcnow"}


# When a batch is written ---------------------------------------------------------------------


def test_the_writer_is_woken_at_batch_max_not_before_and_once_per_batch() -> None:
    batch_max = 5
    queue: deque[Item] = deque()
    woken_at: list[int] = []
    batches: list[int] = []
    for mid in range(1, 13):
        queue.append(_item(mid))
        if wake_writer(len(queue), batch_max):
            woken_at.append(mid)
            if mid == 5:  # the writer takes the first batch at once...
                batches.append(len(cut(queue)))
    # ...so the queue reaches batch_max again at message 10; while the writer is busy (the
    # second batch, not cut here) the queue grows past batch_max without waking it again.
    assert woken_at == [5, 10]
    assert batches == [5]
    assert len(queue) == 7


@pytest.mark.parametrize(
    ("pending", "woken"), [(0, False), (999, False), (1000, True), (1001, False)]
)
def test_wake_writer_is_exactly_at_the_batch_size(pending: int, woken: bool) -> None:
    assert wake_writer(pending, 1000) is woken


def test_without_a_wake_up_the_writer_flushes_after_flush_ms() -> None:
    assert flush_timeout_s(100) == pytest.approx(0.1)
    assert flush_timeout_s(2500) == pytest.approx(2.5)


def test_a_flush_takes_everything_queued_oldest_first() -> None:
    queue = deque(_item(mid) for mid in range(1, 8))
    batch = cut(queue)
    assert [i.mid for i in batch] == [1, 2, 3, 4, 5, 6, 7]
    assert not queue
    assert cut(queue) == []  # an empty queue: nothing to write


def test_split_keeps_receive_order_of_messages_and_dead_letters() -> None:
    batch = [_item(1), _item(2, dead=True), _item(3), _item(4, limited=True)]
    msgs, dead = split(batch)
    assert [m.seq for m in msgs] == [1, 3]
    assert dead == [batch[1].dead, batch[3].dead]


# What is let in -----------------------------------------------------------------------------


def test_a_flooding_pump_is_limited_and_the_others_pass() -> None:
    buckets = TokenBuckets(rate_per_s=1.0, burst=3)
    flood = [buckets.take(pump_key("pumps/P-1/telemetry"), 10.0) for _ in range(10)]
    assert flood == [True] * 3 + [False] * 7
    assert all(buckets.take(pump_key(f"pumps/P-{n}/event"), 10.0) for n in range(2, 20))
    # The flooder's limited messages, counted once the batch is committed as dead letters:
    batch = [_item(i, "P-1", limited=not ok) for i, ok in enumerate(flood)]
    batch += [_item(100 + n, f"P-{n}") for n in range(2, 5)]
    assert rate_limited(batch, WriteResult(dead_letters=7)) == 7


def test_the_bucket_refills_with_the_time_passed_in() -> None:
    buckets = TokenBuckets(rate_per_s=2.0, burst=1)
    assert buckets.take("P-1", 0.0)
    assert not buckets.take("P-1", 0.4)  # 0.8 of a token
    assert buckets.take("P-1", 0.5)


def test_rate_limited_is_skipped_when_the_batch_has_no_dead_letters_or_duplicates() -> None:
    batch = [_item(1, limited=True), _item(2)]
    assert rate_limited(batch, WriteResult(duplicates=1)) == 1  # a redelivered throttled one
    assert rate_limited(batch, WriteResult(new=[_msg()])) == 0


def test_the_pump_key_is_the_topics_pump_id_else_the_topic() -> None:
    assert pump_key("pumps/P-7/telemetry") == "P-7"
    assert pump_key("pumps/P-7/event/extra") == "P-7"  # split in three: the rest is one part
    assert pump_key("other/P-7/telemetry") == "other/P-7/telemetry"
    assert pump_key("pumps/P-7") == "pumps/P-7"


def test_the_reasons_a_message_is_kept_out() -> None:
    assert limited_reason(2000, 1.0) == (
        "rate limited: more than 2000 messages at once, then 1/s, from this pump"
    )
    assert oversize(16_384, 16_384) is None
    assert oversize(16_385, 16_384) == "payload: 16385 bytes exceeds the 16384 limit"


# Unknown and revoked pumps ---------------------------------------------------------------


def test_the_revoked_pumps_are_read_again_after_the_refresh_interval() -> None:
    assert not revoked_refresh_due(now=109.9, read_at=100.0, every_s=10.0)
    assert revoked_refresh_due(now=110.0, read_at=100.0, every_s=10.0)


def test_sort_pumps_quarantines_revoked_and_absent_pumps_unless_registering() -> None:
    unknown = {"P-new", "P-rev", "P-ok"}
    rows = [("P-rev", True), ("P-ok", False)]
    register, held, known = sort_pumps(unknown, rows, may_register=False)
    assert register == set()
    assert held == {"P-rev": "revoked", "P-new": "not provisioned"}
    assert known == {"P-ok"}
    register, held, known = sort_pumps(unknown, rows, may_register=True)
    assert register == {"P-new"}
    assert held == {"P-rev": "revoked"}  # revoked is quarantined even in register mode
    assert known == {"P-ok"}


def test_quarantine_turns_held_pumps_messages_into_reasons_in_order() -> None:
    batch = [_item(1, "P-1"), _item(2, "P-x"), _item(3, dead=True), _item(4, "P-x"), _item(5)]
    msgs, refused, counts = quarantine(batch, {"P-x": "revoked"})
    assert [m.seq for m in msgs] == [1, 5]
    assert [(i.mid, why) for i, why in refused] == [
        (2, "quarantine: pump P-x is revoked"),
        (4, "quarantine: pump P-x is revoked"),
    ]
    assert counts == {"P-x": 2}
    # Nothing is lost: every message of the batch is kept or refused (dead letters apart).
    assert len(msgs) + len(refused) + len(split(batch)[1]) == len(batch)


# A batch the database refused ---------------------------------------------------------------


def test_one_by_one_retries_every_message_with_its_own_item_and_not_the_dead_letters() -> None:
    batch = [_item(1), _item(2, dead=True), _item(3, "P-2"), _item(4)]
    msgs, _ = split(batch)
    kept = [msgs[2], msgs[0]]  # e.g. after quarantine, in the order they are written
    plan = one_by_one(batch, kept)
    assert [(m.seq, item.mid) for m, item in plan] == [(4, 4), (1, 1)]
    assert all(item.msg is m for m, item in plan)
    assert refused_reason("CheckViolation: no") == "database refused: CheckViolation: no"


def test_counters_add_up_after_a_batch_written_one_by_one() -> None:
    """received = written + dead lettered + duplicates + statuses superseded."""
    batch = [_item(1), _item(2, dead=True), _item(3), _item(4), _item(5, limited=True), _item(6)]
    msgs, dead = split(batch)
    total = WriteResult(dead_letters=len(dead))  # the dead letters go first, together
    outcomes = [
        WriteResult(new=[msgs[0]]),
        WriteResult(dead_letters=1),  # refused by the database on its own
        WriteResult(duplicates=1),
        WriteResult(statuses_superseded=1),
    ]
    for one in outcomes:
        add_result(total, one)
    assert total.new == [msgs[0]]
    assert (total.dead_letters, total.duplicates, total.statuses_superseded) == (3, 1, 1)
    stats = Stats()
    _, stale = acks(batch, gen=1)
    limited = rate_limited(batch, total)
    stats.observe_batch(len(batch), batch[0].received, total, stale, 2_000.0, limited)
    assert stats.received == 6
    assert (
        stats.written + stats.dead_lettered + stats.duplicates + stats.statuses_superseded
        == stats.received
    )
    assert stats.rate_limited == 1


# After the commit --------------------------------------------------------------------------


def test_acks_follow_the_batch_order_and_skip_stale_connections() -> None:
    batch = [
        _item(7, gen=2),
        _item(3, gen=1),  # delivered on the connection before: its id means nothing now
        _item(9, gen=2),
        _item(1, gen=2, qos=0),  # QoS 0: nothing to acknowledge, and not stale
        _item(4, gen=2),
    ]
    mids, stale = acks(batch, gen=2)
    assert mids == [7, 9, 4]
    assert stale == 1


def test_after_a_reconnect_nothing_of_the_old_connection_is_acknowledged() -> None:
    batch = [_item(mid, gen=1) for mid in range(1, 4)]
    assert acks(batch, gen=3) == ([], 3)
    assert acks(batch, gen=1) == ([1, 2, 3], 0)
