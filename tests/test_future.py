"""The Future that load() returns: a stdlib Future in behaviour, without a Condition each.

LoadFuture creates its ``_condition`` only when something waits on it, so these tests wait
on futures that are still pending (a gated batch function) through every stdlib path that
uses it: ``result``/``exception`` with and without timeouts, ``concurrent.futures.wait``
(each ``return_when``), ``as_completed``, ``asyncio.wrap_future``, ``add_done_callback`` and
``cancel``; and race the creation of the Condition against the state change from many
threads at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from batchsync import Batcher
from batchsync._future import LoadFuture

T = 10.0  # generous bound for a result that must come; a hang fails here
LONG = 3600.0  # a window that never closes by itself within a test


class Gate:
    """A batch function that blocks until opened, answering key -> key * 10."""

    def __init__(self, fail: frozenset[int] = frozenset()) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.fail = fail
        self.calls: list[list[int]] = []

    def __call__(self, keys: list[int]) -> list[Any]:
        self.calls.append(list(keys))
        self.entered.set()
        assert self.open.wait(T), "the test never opened the gate"
        return [ValueError(k) if k in self.fail else k * 10 for k in keys]


@pytest.fixture
def gated() -> Iterator[tuple[Batcher[int, int], Gate]]:
    gate = Gate(fail=frozenset({3}))
    b: Batcher[int, int] = Batcher(gate, window=LONG)
    try:
        yield b, gate
    finally:
        gate.open.set()
        b.close()


def running(b: Batcher[int, int], gate: Gate, keys: list[int]) -> list[Future[int | None]]:
    """Load keys and send them: the batch function holds them, running, until the gate opens."""
    futures = b.load_many(keys)
    b.flush()
    assert gate.entered.wait(T)
    assert all(f.running() for f in futures)
    return futures


# -- the same behaviour as the stdlib Future, observed side by side ----------------------------


def observe(make: Callable[[], Future[Any]], caplog: pytest.LogCaptureFixture) -> list[Any]:
    """Drive one future of each kind through every transition; record what it shows."""
    seen: list[Any] = []

    def outcome(call: Callable[[], Any]) -> Any:
        try:
            return ("returned", call())
        except BaseException as exc:  # record the exception's type: that is the contract
            return ("raised", type(exc))

    def state(f: Future[Any]) -> tuple[bool, bool, bool, str]:
        return (f.done(), f.running(), f.cancelled(), repr(f).split("state=")[1])

    f = make()
    seen += [state(f), outcome(lambda: f.result(timeout=0)), outcome(lambda: f.exception(0))]
    calls: list[Any] = []
    f.add_done_callback(lambda g: calls.append(("early", g is f)))
    seen += [outcome(f.set_running_or_notify_cancel), state(f), outcome(f.cancel)]
    f.set_result(7)
    f.add_done_callback(lambda g: calls.append(("late", g is f)))
    seen += [state(f), outcome(f.result), outcome(f.exception), list(calls)]
    seen += [outcome(lambda: f.set_result(8)), outcome(lambda: f.set_exception(ValueError()))]
    seen += [outcome(f.set_running_or_notify_cancel), outcome(f.cancel), outcome(f.result)]

    def waited(fut: Future[Any]) -> bool:  # what wait() and as_completed() count as done
        return fut in cf.wait([fut], timeout=0).done

    g = make()
    seen += [outcome(g.cancel), outcome(g.cancel), state(g), waited(g)]
    seen += [outcome(g.result), outcome(g.exception), outcome(lambda: g.set_result(1))]
    seen += [outcome(g.set_running_or_notify_cancel), state(g), waited(g)]

    h = make()
    error = KeyError("k")
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        h.add_done_callback(lambda _: 1 / 0)  # logged, never raised
        h.add_done_callback(lambda x: calls.append(("after a raising one", x.exception() is error)))
        h.set_exception(error)
        late = outcome(lambda: h.add_done_callback(lambda _: 1 / 0))  # done: runs, is logged
    seen += [state(h), outcome(h.result), h.exception() is error, calls[-1], late, waited(h)]
    seen += [[(r.levelname, r.msg, r.exc_info and r.exc_info[0]) for r in caplog.records]]
    try:
        h.result()
    except KeyError as exc:
        seen.append(exc is error)
    caplog.clear()
    return seen


def test_load_future_shows_what_the_stdlib_future_shows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = observe(Future, caplog)
    assert observe(LoadFuture, caplog) == expected
    assert isinstance(LoadFuture(), Future)
    assert ("raised", cf.TimeoutError) in expected  # the observation is not vacuous


def test_a_load_future_makes_its_condition_only_when_something_waits(
    gated: tuple[Batcher[int, int], Gate],
) -> None:
    b, gate = gated
    answered, waited = running(b, gate, [1, 2])
    assert type(answered) is LoadFuture and answered._cond is None and waited._cond is None
    late: list[Any] = []
    waiter = threading.Thread(target=lambda: late.append(waited.result(T)))
    waiter.start()
    while waited._cond is None:  # the waiter makes it as it blocks
        if not waiter.is_alive():
            break
        threading.Event().wait(0.001)  # polling for another thread's first step
    gate.open.set()
    waiter.join(T)
    assert late == [20] and answered.result(0) == 10
    assert answered._cond is None, "reading a finished future needs no Condition"
    assert waited._cond is not None
    assert answered._entry is None and answered._core is None, "resolved: no cycle left"


# -- the stdlib toolbox on pending futures ----------------------------------------------------


@pytest.mark.parametrize("when", [cf.ALL_COMPLETED, cf.FIRST_COMPLETED, cf.FIRST_EXCEPTION])
def test_concurrent_futures_wait_on_running_load_futures(
    gated: tuple[Batcher[int, int], Gate], when: str
) -> None:
    b, gate = gated
    futures = running(b, gate, [1, 2, 3])
    done, not_done = cf.wait(futures, timeout=0.05, return_when=when)
    assert not done and not_done == set(futures), "nothing is done before the gate opens"
    out: list[Any] = []
    waiter = threading.Thread(target=lambda: out.append(cf.wait(futures, T, when)))
    waiter.start()
    gate.open.set()
    waiter.join(T)
    [(done, not_done)] = out
    assert done == set(futures) and not not_done  # one call answers all three at once
    assert sorted(f.exception() is None for f in futures) == [False, True, True]


def test_as_completed_on_running_load_futures_times_out_then_yields_each(
    gated: tuple[Batcher[int, int], Gate],
) -> None:
    b, gate = gated
    futures = running(b, gate, [1, 2])
    with pytest.raises(cf.TimeoutError, match=r"2 \(of 2\) futures unfinished"):
        next(cf.as_completed(futures, timeout=0.05))
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.extend(cf.as_completed(futures, timeout=T)))
    waiter.start()
    gate.open.set()
    waiter.join(T)
    assert sorted(f.result() for f in got) == [10, 20]
    assert all(not f._waiters for f in futures), "as_completed removed its waiters"


def test_result_and_exception_time_out_on_a_running_load_future(
    gated: tuple[Batcher[int, int], Gate],
) -> None:
    b, gate = gated
    ok, bad = running(b, gate, [1, 3])
    with pytest.raises(cf.TimeoutError):
        ok.result(timeout=0.02)
    with pytest.raises(cf.TimeoutError):
        bad.exception(timeout=0.02)
    gate.open.set()
    assert ok.result(T) == 10
    error = bad.exception(T)
    assert isinstance(error, ValueError) and error.args == (3,)
    with pytest.raises(ValueError) as raised:
        bad.result(T)
    assert raised.value is error


def test_asyncio_wrap_future_awaits_a_running_load_future(
    gated: tuple[Batcher[int, int], Gate],
) -> None:
    b, gate = gated
    [fut] = running(b, gate, [4])

    async def main() -> Any:
        asyncio.get_running_loop().call_later(0.01, gate.open.set)
        return await asyncio.wait_for(asyncio.wrap_future(fut), T)

    assert asyncio.run(main()) == 40


def test_cancelling_the_asyncio_wrapper_cancels_a_queued_load_future() -> None:
    sent: list[list[int]] = []
    with Batcher(lambda keys: sent.append(keys) or keys, window=LONG) as b:
        fut = b.load(5)

        async def main() -> None:
            task = asyncio.ensure_future(asyncio.wrap_future(fut))
            await asyncio.sleep(0)  # let the task start awaiting the wrapper
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        assert fut.cancelled()
        assert b.get(6, timeout=T) == 6
    assert sent == [[6]], "the cancelled key was never sent"


def test_add_done_callback_on_a_running_load_future_runs_once_on_resolution(
    gated: tuple[Batcher[int, int], Gate],
) -> None:
    b, gate = gated
    [fut] = running(b, gate, [2])
    called = threading.Event()
    seen: list[Any] = []
    fut.add_done_callback(lambda f: (seen.append((f is fut, f.result())), called.set()))
    assert not seen
    gate.open.set()
    assert called.wait(T)
    fut.add_done_callback(lambda f: seen.append("late"))  # done: runs at once, here
    assert seen == [(True, 20), "late"]


def test_cancel_wakes_a_thread_blocked_on_a_queued_load_future() -> None:
    gate = Gate()
    with Batcher(gate, window=LONG, max_concurrency=1) as b:
        [first] = running(b, gate, [1])  # holds the only slot
        queued = b.load(2)
        b.flush()  # due, but no slot is free: it stays queued
        blocked = threading.Barrier(3)
        got: list[Any] = []

        def wait_on(call: Callable[[], Any]) -> None:
            blocked.wait(T)
            try:
                got.append(call())
            except cf.CancelledError:
                got.append("cancelled")

        waiters = [
            threading.Thread(target=wait_on, args=(lambda: queued.result(T),)),
            threading.Thread(target=wait_on, args=(lambda: queued.exception(T),)),
        ]
        for w in waiters:
            w.start()
        blocked.wait(T)
        while queued._cond is None or len(queued._cond._waiters) < 2:  # type: ignore[attr-defined]
            threading.Event().wait(0.001)  # polling until both block on its Condition
        assert queued.cancel() and not first.cancel()
        for w in waiters:
            w.join(T)
        assert got == ["cancelled", "cancelled"]
        gate.open.set()
        assert first.result(T) == 10
        after = b.load(3)
        b.flush()  # the threads that waited count as company for the (long) window
        assert after.result(T) == 30
    assert gate.calls == [[1], [3]], "the cancelled key was dropped, not sent"


def test_as_completed_hears_of_a_cancelled_load_future_when_the_batcher_drops_it() -> None:
    gate = Gate()
    with Batcher(gate, window=LONG) as b:
        dropped, kept = b.load_many([1, 2])
        out: list[Any] = []
        listening = threading.Event()

        def listen() -> None:
            it = cf.as_completed([dropped, kept], timeout=T)
            listening.set()
            out.extend(it)

        assert dropped.cancel()
        listener = threading.Thread(target=listen)
        listener.start()
        assert listening.wait(T)
        gate.open.set()
        b.flush()
        listener.join(T)
        assert set(out) == {dropped, kept} and kept.result() == 20
    assert gate.calls == [[2]]


# -- many threads at once ---------------------------------------------------------------------


@pytest.fixture
def tight_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter allows: races show up in few rounds."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.timeout(120)
def test_no_lost_wakeup_when_every_stdlib_path_races_the_resolution(
    tight_switching: None,
) -> None:
    """Each round: one thread resolves a fresh future while six others start to wait on it.

    A Barrier releases all seven together, so the Condition is created (by a waiter)
    while the state changes (in the resolver); every waiter must return within T.
    """
    rounds = 400
    ways: list[Callable[[Future[int]], Any]] = [
        lambda f: f.result(T),
        lambda f: f.exception(T) is None and f.result(0),
        lambda f: next(iter(cf.wait([f], T).done)).result(0),
        lambda f: next(iter(cf.wait([f], T, cf.FIRST_COMPLETED).done)).result(0),
        lambda f: next(cf.as_completed([f], T)).result(0),
        lambda f: callback_value(f),
    ]
    start = threading.Barrier(len(ways) + 1)
    futures: list[LoadFuture[int]] = []
    results: list[list[Any]] = [[] for _ in ways]
    errors: list[BaseException] = []

    def callback_value(f: Future[int]) -> int:
        called = threading.Event()
        f.add_done_callback(lambda _: called.set())
        assert called.wait(T), "a callback was lost"
        return f.result(0)

    def waiter(i: int) -> None:
        try:
            for r in range(rounds):
                start.wait(T)
                results[i].append(ways[i](futures[r]))
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(len(ways))]
    for t in threads:
        t.start()
    try:
        for r in range(rounds):
            futures.append(LoadFuture())
            start.wait(T)
            if r % 2:
                futures[r].set_result(r)
            else:
                futures[r].set_running_or_notify_cancel()
                futures[r].set_result(r)
    except threading.BrokenBarrierError:
        pass  # a waiter failed: its error is reported below
    for t in threads:
        t.join(T)
    assert not errors, errors
    assert results == [list(range(rounds))] * len(ways)


@pytest.mark.timeout(120)
def test_many_threads_read_the_same_load_futures_while_they_resolve() -> None:
    n, threads = 2000, 16
    b: Batcher[int, int] = Batcher(
        lambda keys: [k + 1 for k in keys], window=0.002, max_batch_size=50, max_concurrency=2
    )
    with b:
        start = threading.Barrier(threads + 1)
        futures = b.load_many(range(n))
        seen: list[list[Any]] = [[] for _ in range(threads)]

        def reader(i: int) -> None:
            start.wait(T)
            order = futures if i % 2 else futures[::-1]
            seen[i] = sorted(f.result(T) for f in order)

        pool = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        start.wait(T)
        for t in pool:
            t.join(T)
    assert seen == [list(range(1, n + 1))] * threads
