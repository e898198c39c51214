"""The outbox: seq order, deletion on ack, survival across restarts, and the bound policy."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from device_agent._store import Entry, QueueLimits, Store, StoreError, StoreLocked

PUMP = "P-000001"


def entry(kind: str = "telemetry", size: int = 10, **kw: object) -> Entry:
    return Entry(kind, f"pumps/{PUMP}/{kind}", lambda seq: b"%d:" % seq + b"x" * size, **kw)  # type: ignore[arg-type]


def seqs(store: Store) -> list[int]:
    return [m.seq for m in store.messages()]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / f"{PUMP}.sqlite3"


def test_append_assigns_consecutive_seqs_and_due_is_in_seq_order(path: Path) -> None:
    with Store(path, PUMP) as store:
        assert store.append([entry(), entry("event")]).seqs == [1, 2]
        assert store.append([entry()]).seqs == [3]
        due = store.due(10)
        assert [m.seq for m in due] == [1, 2, 3]
        assert [m.kind for m in due] == ["telemetry", "event", "telemetry"]
        assert due[1].payload.startswith(b"2:"), "payload rendered with its own seq"
        assert [m.seq for m in store.due(2)] == [1, 2]
        assert [m.seq for m in store.due(2, exclude={1, 2})] == [3]
        assert len(store) == 3 and store.size_bytes == sum(len(m.payload) for m in due)


def test_ack_deletes_only_what_was_acknowledged(path: Path) -> None:
    with Store(path, PUMP) as store:
        store.append([entry() for _ in range(5)])
        assert store.ack([2, 4, 99]) == 2
        assert store.ack([2]) == 0, "a second ack of the same seq is a no-op"
        assert seqs(store) == [1, 3, 5]
        assert len(store) == 3


def test_restart_keeps_queue_and_never_reuses_a_seq(path: Path) -> None:
    with Store(path, PUMP) as store:
        store.append([entry() for _ in range(3)])
        store.ack([1])
        assert store.reserve(2) == 4  # e.g. a connection's status seqs
    with Store(path, PUMP) as store:
        assert seqs(store) == [2, 3]
        assert len(store) == 2
        store.ack([2, 3])
        assert len(store) == 0
    with Store(path, PUMP) as store:
        assert store.append([entry()]).seqs == [6], "seqs 1-5 were spent, even the acked ones"


def test_a_failed_render_consumes_no_seq(path: Path) -> None:
    def boom(seq: int) -> bytes:
        raise RuntimeError("driver bug")

    with Store(path, PUMP) as store:
        with pytest.raises(RuntimeError):
            store.append([entry(), Entry("event", "t", boom)])
        assert len(store) == 0 and store.messages() == []
        assert store.append([entry()]).seqs == [1]


def test_one_store_per_pump_and_one_agent_per_store(path: Path) -> None:
    with Store(path, PUMP), pytest.raises(StoreLocked, match="another agent"):
        Store(path, PUMP)
    with pytest.raises(StoreError, match="holds the queue of pump P-000001"):
        Store(path, "P-000002")


def test_put_only_accepts_reserved_seqs(path: Path) -> None:
    with Store(path, PUMP) as store:
        first = store.reserve(1)
        store.append([entry()])
        store.put(first, entry("status", retain=True))
        assert seqs(store) == [1, 2]
        assert store.messages()[0].retain
        with pytest.raises(ValueError, match="not reserved"):
            store.put(3, entry("status"))


def test_full_queue_thins_every_second_of_the_oldest_half_of_telemetry(path: Path) -> None:
    with Store(path, PUMP, QueueLimits(max_messages=10)) as store:
        thinned = [store.append([entry()]).thinned for _ in range(12)]
        # 11th message: 11 > 10 -> of telemetry 1..10 (the newest, 11, is never thinned) the
        # oldest half 1..5 loses 2 and 4.
        assert thinned == [0] * 10 + [2, 0]
        assert seqs(store) == [1, 3, 5, 6, 7, 8, 9, 10, 11, 12]


def test_repeated_thinning_keeps_recent_telemetry_complete_and_old_sparse(path: Path) -> None:
    with Store(path, PUMP, QueueLimits(max_messages=100)) as store:
        for _ in range(1000):
            result = store.append([entry()])
            assert len(store) <= 100 and not result.over_limit
        kept = seqs(store)
        assert kept[-1] == 1000
        recent = [s for s in kept if s > 1000 - 25]
        assert recent == list(range(976, 1001)), "the newest quarter is complete"
        gaps = [b - a for a, b in itertools.pairwise(kept)]
        assert max(gaps[: len(gaps) // 4]) > max(gaps[-len(gaps) // 4 :]), "older is sparser"
        assert kept[0] == 1, "thinning keeps the oldest reading"


def test_events_and_status_are_never_dropped(path: Path) -> None:
    with Store(path, PUMP, QueueLimits(max_messages=5)) as store:
        store.append([entry()])
        for _ in range(3):
            store.append([entry("event"), entry()])
        store.append([entry("status", retain=True)])
        results = [store.append([entry("event")]) for _ in range(5)]
        kinds = [m.kind for m in store.messages()]
        assert kinds.count("event") == 8 and kinds.count("status") == 1
        assert results[-1].over_limit, "over the bound with only events/status: reported"
        telemetry = [m.seq for m in store.messages() if m.kind == "telemetry"]
        assert telemetry[-1] == 7, "the newest telemetry survives"


def test_byte_bound_thins_as_well(path: Path) -> None:
    with Store(path, PUMP, QueueLimits(max_messages=10_000, max_bytes=2_000)) as store:
        for _ in range(100):
            store.append([entry(size=100)])
        assert store.size_bytes <= 2_000
        assert len(store) < 100 and seqs(store)[-1] == 100


def test_held_back_messages_are_not_due_until_their_time(path: Path) -> None:
    now = [1000.0]
    with Store(path, PUMP, wall_clock=lambda: now[0]) as store:
        store.append([entry(delay_s=30), entry(), entry(duplicate=True)])
        assert [m.seq for m in store.due(10)] == [2, 3]
        assert store.due(10)[1].duplicate
        assert store.next_release() == 1030.0
        now[0] = 1031.0
        assert [m.seq for m in store.due(10)] == [1, 2, 3]
        assert store.next_release() is None


def test_a_lost_entry_spends_its_seq_and_stores_nothing(path: Path) -> None:
    with Store(path, PUMP) as store:
        result = store.append([entry(), entry(lost=True), entry()])
        assert result.seqs == [1, 2, 3], "the lost one got a seq"
        assert seqs(store) == [1, 3], "and was never queued: the receiver sees a gap at 2"
        assert store.next_seq == 4 and len(store) == 2


def test_will_pair_is_reserved_once_and_kept_until_used(path: Path) -> None:
    with Store(path, PUMP) as store:
        assert store.will() is None
        will = store.reserve_will(lambda seq: b"will %d" % seq)
        assert (will.online_seq, will.will_seq, will.payload) == (1, 2, b"will 2")
        assert store.append([entry()]).seqs == [3]
    with Store(path, PUMP) as store:
        again = store.will()
        assert again is not None and again == will, "an unused will survives a restart as is"
        store.set_will_state("armed")
        assert store.will() is not None and store.will().state == "armed"  # type: ignore[union-attr]
        assert store.reserve_will(lambda seq: b"").online_seq == 4
