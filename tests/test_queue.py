"""The queue and its window on their own: no threads, the time passed in."""

from __future__ import annotations

from typing import Any

from batchsync._queue import QUEUED, Entry, Queue


def entry(key: Any, partition: Any = None) -> Entry:
    return Entry(key, key, (partition, key), partition)


def keys(chunk: list[Entry]) -> list[Any]:
    return [e.key for e in chunk]


def test_the_first_key_opens_a_window_that_closes_at_its_deadline() -> None:
    q = Queue(window=0.5, max_batch_size=10, partitioned=False)
    assert q.push(entry(1), now=100.0)  # the window opens: a worker must time it
    assert not q.push(entry(2), now=100.2)  # joins the open window: nothing to do
    assert (q.held, q.due, q.deadline) == (2, 0, 100.5)
    left = q.expire(now=100.3)
    assert left is not None and abs(left - 0.2) < 1e-9
    assert q.held == 2
    assert q.expire(now=100.5) is None
    assert (q.held, q.due) == (0, 2)
    assert keys(q.take()) == [1, 2]
    assert len(q) == 0


def test_hold_until_closes_the_window_early_until_a_new_one_opens() -> None:
    q = Queue(window=1.0, max_batch_size=10, partitioned=False)
    q.push(entry(1), now=0.0)
    q.hold_until(0.25)
    left = q.expire(now=0.1)
    assert left is not None and abs(left - 0.15) < 1e-9
    q.hold_until(0.5)  # the latest call wins
    assert q.expire(now=0.3) is not None
    assert q.expire(now=0.5) is None and q.held == 0
    q.take()
    q.push(entry(2), now=2.0)  # a new window forgets the old linger
    left = q.expire(now=2.6)
    assert left is not None and abs(left - 0.4) < 1e-9


def test_a_full_window_is_due_at_once() -> None:
    q = Queue(window=60.0, max_batch_size=3, partitioned=False)
    q.push(entry(1), now=0.0)
    assert not q.push(entry(2), now=0.0)
    assert q.push(entry(3), now=0.0)  # full
    assert (q.held, q.due) == (0, 3)


def test_keys_after_a_due_head_open_a_new_window() -> None:
    q = Queue(window=1.0, max_batch_size=10, partitioned=False)
    q.push(entry(1), now=0.0)
    assert q.make_due()
    assert not q.make_due()  # nothing left to close
    assert q.push(entry(2), now=5.0)  # a new window, timed from now
    assert (q.due, q.held, q.deadline) == (1, 1, 6.0)
    assert keys(q.take()) == [1]  # only the due head is taken
    assert (q.due, q.held) == (0, 1)
    assert q.take() == []


def test_take_cuts_chunks_of_max_batch_size() -> None:
    q = Queue(window=1.0, max_batch_size=4, partitioned=False)
    for k in range(6):
        q.push(entry(k), now=0.0)
    q.make_due()
    assert keys(q.take()) == [0, 1, 2, 3]
    assert keys(q.take()) == [4, 5]
    assert len(q) == 0


def test_take_keeps_partitions_apart_and_the_rest_in_order() -> None:
    q = Queue(window=1.0, max_batch_size=2, partitioned=True)
    for k, part in [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "b")]:
        q.push(entry(k, part), now=0.0)
    q.make_due()
    q.push(entry(6, "a"), now=0.0)  # held in a new window: not taken with the due ones
    assert keys(q.take()) == [1, 3]
    assert keys(q.take()) == [2, 5]
    assert keys(q.take()) == [4]
    assert (q.due, q.held) == (0, 1)
    assert keys(q.entries) == [6]


def test_pushed_applies_the_rules_to_entries_appended_directly() -> None:
    q = Queue(window=2.0, max_batch_size=10, partitioned=False)
    was_open = q.held > 0
    q.entries.extend([entry(1), entry(2)])
    assert q.pushed(was_open, now=1.0)
    assert (q.held, q.deadline) == (2, 3.0)


def test_clear_takes_everything_out() -> None:
    q = Queue(window=1.0, max_batch_size=10, partitioned=False)
    q.push(entry(1), now=0.0)
    q.make_due()
    q.push(entry(2), now=0.0)
    out = q.clear()
    assert keys(out) == [1, 2] and all(e.state == QUEUED for e in out)
    assert (len(q), q.due, q.held) == (0, 0, 0)


def test_a_long_queue_is_taken_in_order_while_keys_keep_arriving() -> None:
    # Taking moves a head index on and cuts the taken entries off now and then: the order
    # and the counts must not notice.
    q = Queue(window=1.0, max_batch_size=500, partitioned=False)
    q.entries.extend(entry(k) for k in range(10_000))
    q.pushed(False, now=0.0)
    q.make_due()
    taken: list[Any] = []
    stored = []
    for k in range(10_000, 10_020):
        taken += keys(q.take())
        stored.append(len(q.entries))
        q.push(entry(k), now=0.0)  # held: a new window behind the due ones
        assert len(q) == 10_000 - len(taken) + (k - 9_999)
        assert q.held == k - 9_999 and q.due == 10_000 - len(taken)
    assert taken == list(range(10_000)) and q.due == 0
    assert min(stored) < 5_000, "the taken entries were cut off the list"
    q.make_due()
    assert keys(q.take()) == list(range(10_000, 10_020)) and len(q) == 0
    assert q.entries == [] and q.head == 0
