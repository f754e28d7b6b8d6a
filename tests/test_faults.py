"""The fault matrix of issue 5: each failure provoked for real, and the bad-input list.

Core items first (1, 5-10, 12), then bad input, then the PostgreSQL items (2-4), which need
a real server (``BATCHSYNC_PG_DSN`` or an embedded ``pgserver``) and are marked ``pg``.
The soak (item 11) is in ``test_soak.py``, run with ``-m soak``.

Every test checks that every future it made is resolved (``wait`` with a timeout, nothing
left pending) and that each one holds the right value or the right error.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future, wait
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchsync import (
    BatchCycleError,
    Batcher,
    BatcherClosed,
    BatchError,
    Stats,
    current_partition,
)

# Generous bounds: they only fire on a hang, never in a healthy run.
RESOLVE = 10.0


def assert_resolved(futures: Iterable[Future[Any]], timeout: float = RESOLVE) -> None:
    """Fail unless every future is done within timeout."""
    futures = list(futures)
    _, pending = wait(futures, timeout=timeout)
    assert not pending, f"{len(pending)} of {len(futures)} futures still pending"


def run_threads(n: int, target: Callable[[int], None], timeout: float = 30.0) -> None:
    """Run target(i) on n threads started together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"caller-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a caller thread is stuck"
    if errors:
        raise errors[0]


def run_python(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter; return the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- 1. a batch function that fails at random, under 32 threads ------------------------------


class WholeBatchFailed(Exception):
    def __init__(self, keys: list[int]) -> None:
        super().__init__(f"whole batch failed: {keys}")
        self.keys = list(keys)


class KeyFailed(Exception):
    def __init__(self, key: int) -> None:
        super().__init__(f"key {key} failed")
        self.key = key


class ChaosFn:
    """A batch function that fails in every documented way, chosen at random per call.

    Values carry their key, so a value delivered to the wrong key is caught. Every call is
    recorded with its mode, so each error can be traced to a call that sent its key.
    """

    MODES = ("ok", "mapping", "raise", "length", "type", "per_key", "missing")

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls: list[tuple[str, list[int]]] = []

    def __call__(self, keys: list[int]) -> Any:
        assert len(set(keys)) == len(keys), f"duplicate keys in one call: {keys}"
        with self._lock:
            mode = self._rng.choice(self.MODES)
            self.calls.append((mode, list(keys)))
        if mode == "ok":
            return [("v", k) for k in keys]
        if mode == "mapping":
            return {k: ("v", k) for k in reversed(keys)}
        if mode == "raise":
            raise WholeBatchFailed(keys)
        if mode == "length":
            return [("v", k) for k in keys] + [("v", -1)]
        if mode == "type":
            return {("v", k) for k in keys}
        if mode == "per_key":
            return [KeyFailed(k) if k % 3 == 0 else ("v", k) for k in keys]
        # "missing": a Mapping that leaves out the odd keys
        return {k: ("v", k) for k in keys if k % 2 == 0}

    def modes_of(self, key: int) -> set[str]:
        return {mode for mode, keys in self.calls if key in keys}


def check_outcome(fn: ChaosFn, key: int, value: Any, error: BaseException | None) -> None:
    """Assert that (value, error) is what some call that sent key gave it."""
    modes = fn.modes_of(key)
    if error is None:
        if value is None:
            assert key % 2 == 1 and "missing" in modes, (key, modes)
        else:
            assert value == ("v", key), f"key {key} got {value!r}"
            assert modes & {"ok", "mapping", "per_key", "missing"}, (key, modes)
    elif isinstance(error, WholeBatchFailed):
        assert key in error.keys and "raise" in modes
    elif isinstance(error, KeyFailed):
        assert error.key == key and key % 3 == 0 and "per_key" in modes
    elif type(error) is BatchError:
        msg = str(error)
        if "items for" in msg:
            assert "length" in modes
            assert msg.startswith("batchsync: batch function of 'chaos' returned ")
            n = int(msg.split("returned ")[1].split(" items")[0])
            assert f"items for {n - 1} keys; a Sequence result needs one item per key" in msg
        else:
            assert "type" in modes
            assert msg == (
                "batchsync: batch function of 'chaos' returned set; "
                "expected a Mapping keyed by key or a Sequence with one item per key"
            )
    else:
        raise AssertionError(f"key {key}: unexpected error {error!r}")


def test_random_failures_under_32_threads_resolve_every_future_with_its_own_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.CRITICAL, logger="batchsync")  # the ERROR records are expected
    fn = ChaosFn(seed=5)
    futures: list[list[tuple[int, Future[Any]]]] = [[] for _ in range(32)]
    got_many: list[list[tuple[list[int], list[Any] | BaseException]]] = [[] for _ in range(32)]
    got_one: list[list[tuple[int, Any, BaseException | None]]] = [[] for _ in range(32)]
    with Batcher(fn, window=0.001, max_batch_size=16, max_concurrency=4, name="chaos") as b:

        def caller(i: int) -> None:
            rng = random.Random(i)
            for n in range(300):
                if n % 10 == 9:
                    keys = [rng.randrange(200) for _ in range(5)]
                    try:
                        got_many[i].append((keys, b.get_many(keys, timeout=RESOLVE)))
                    except (WholeBatchFailed, KeyFailed, BatchError) as exc:
                        got_many[i].append((keys, exc))
                elif n % 10 == 4:
                    key = rng.randrange(200)
                    try:
                        got_one[i].append((key, b.get(key, timeout=RESOLVE), None))
                    except (WholeBatchFailed, KeyFailed, BatchError) as exc:
                        got_one[i].append((key, None, exc))
                else:
                    key = rng.randrange(200)
                    futures[i].append((key, b.load(key)))

        run_threads(32, caller)
        everything = [f for per in futures for _, f in per]
        assert_resolved(everything)
        stats = b.stats()

    for per in futures:
        for key, fut in per:
            error = fut.exception(0)
            check_outcome(fn, key, None if error else fut.result(0), error)
    for per_one in got_one:
        for key, value, error in per_one:
            check_outcome(fn, key, value, error)
    for per_many in got_many:
        for keys, outcome in per_many:
            if isinstance(outcome, BaseException):
                assert any((type(outcome) is not KeyFailed or outcome.key == k) for k in keys), (
                    keys,
                    outcome,
                )
            else:
                for key, value in zip(keys, outcome, strict=True):
                    check_outcome(fn, key, value, None)
    assert sum(map(len, got_one)) == 32 * 30
    assert stats.loads == 32 * 300 + 32 * 30 * 4  # a get_many of five keys counts five loads
    assert stats.batches == len(fn.calls)
    assert stats.failed_batches == sum(m in ("raise", "length", "type") for m, _ in fn.calls)
    assert stats.batches < stats.loads / 3, stats
    assert stats.queued == 0 and stats.in_flight == 0


# -- 5. a slow batch while new loads keep arriving ----------------------------------------


class Gate:
    """A batch function whose calls for negative keys block until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.blocked = threading.Semaphore(0)  # one release per call that blocks
        self.calls: list[list[int]] = []

    def __call__(self, keys: list[int]) -> list[int]:
        with self.lock:
            self.calls.append(list(keys))
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            if any(k < 0 for k in keys):
                self.blocked.release()
                assert self.release.wait(RESOLVE), "the gate was never opened"
            return [k * 10 for k in keys]
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.timing
def test_slow_batch_does_not_hold_up_new_windows_and_get_times_out_on_time() -> None:
    gate = Gate()
    with Batcher(gate, window=0.001, max_concurrency=3, name="slow") as b:
        slow = b.load(-1)
        b.flush()
        assert gate.blocked.acquire(timeout=RESOLVE)
        # One worker is stuck: the other two keep serving new windows.
        for k in range(50):
            assert b.get(k, timeout=RESOLVE) == k * 10
        slow2 = b.load(-2)
        b.flush()
        assert gate.blocked.acquire(timeout=RESOLVE)
        slow3 = b.load(-3)
        b.flush()
        assert gate.blocked.acquire(timeout=RESOLVE)
        # Every worker is stuck now: a caller with a timeout gets TimeoutError on time.
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"^batchsync: no result within 0\.2 s$"):
            b.get(1000, timeout=0.2)
        elapsed = time.monotonic() - start
        assert 0.2 <= elapsed < 1.5, elapsed
        late = b.load(1001)
        start = time.monotonic()
        with pytest.raises(FutureTimeoutError):  # the built-in TimeoutError from 3.11 on
            late.result(timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 1.5
        assert gate.peak == 3
        again = b.load(1000)  # the timed-out key, asked for again while it is still queued
        gate.release.set()
        # The late results arrive and break nothing.
        assert late.result(RESOLVE) == 10010
        assert again.result(RESOLVE) == 10000
        assert_resolved([slow, slow2, slow3])
        assert [slow.result(), slow2.result(), slow3.result()] == [-10, -20, -30]
        assert b.get(7, timeout=RESOLVE) == 70
        stats = b.stats()
    assert gate.peak == 3
    assert stats.failed_batches == 0
    assert sum(c.count(1000) for c in gate.calls) == 1  # sent once, though asked twice


# -- 6. close() with 10,000 queued keys and batches in flight --------------------------------


@pytest.mark.timing
def test_close_with_timeout_fails_queued_and_stuck_keys_with_batcherclosed_in_time() -> None:
    gate = Gate()
    keys = [-k for k in range(1, 10_001)]  # every call blocks
    b = Batcher(gate, window=60.0, eager=False, max_batch_size=100, max_concurrency=4, name="c")
    futures = b.load_many(keys)
    for _ in range(4):
        assert gate.blocked.acquire(timeout=RESOLVE)  # four batches are in flight
    assert b.stats().in_flight == 400
    start = time.monotonic()
    b.close(timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2.0, elapsed
    assert_resolved(futures, timeout=0)  # all answered at once, before the gate opens
    gate.release.set()
    for key, fut in zip(keys, futures, strict=True):
        error = fut.exception(0)
        assert type(error) is BatcherClosed
        assert str(error) == f"batchsync: Batcher 'c' closed before key {key!r} was answered"
    with pytest.raises(BatcherClosed, match=r"^batchsync: Batcher 'c' is closed$"):
        b.load(1)
    b.close()  # idempotent; the released workers end (the leak guard checks)
    assert len(gate.calls) == 4


def test_close_without_timeout_dispatches_10000_queued_keys_behind_batches_in_flight() -> None:
    gate = Gate()
    stuck = [-k for k in range(1, 401)]
    keys = [*stuck, *range(10_000)]
    b = Batcher(gate, window=60.0, eager=False, max_batch_size=100, max_concurrency=4, name="c")
    futures = b.load_many(stuck)
    for _ in range(4):
        assert gate.blocked.acquire(timeout=RESOLVE)  # four batches of 100 are in flight
    futures += b.load_many(range(10_000))
    assert b.stats().queued == 10_000
    closer = threading.Thread(target=b.close, name="closer")
    closer.start()
    deadline = time.monotonic() + RESOLVE
    while not b.closed and time.monotonic() < deadline:
        time.sleep(0.001)  # close() sets the flag first thing; there is no event to wait on
    assert b.closed
    with pytest.raises(BatcherClosed):
        b.load(1)
    gate.release.set()
    closer.join(RESOLVE)
    assert not closer.is_alive()
    assert_resolved(futures, timeout=0)
    assert [f.result(0) for f in futures] == [k * 10 for k in keys]
    assert sorted(k for c in gate.calls for k in c) == sorted(keys)  # each key sent once


# -- 7. interpreter exit with queued keys ------------------------------------------------


@pytest.mark.timing
def test_interpreter_exit_dispatches_queued_keys_and_exits_promptly() -> None:
    start = time.monotonic()
    proc = run_python(
        """
        import sys
        from batchsync import Batcher

        def fn(keys):
            sys.stdout.write(" ".join(map(str, keys)) + "\\n")
            sys.stdout.flush()
            return keys

        b = Batcher(fn, window=60.0, eager=False, max_batch_size=400)
        futures = b.load_many(range(1000))  # 800 go at once in full batches, 200 wait
        sys.stdout.write("exiting\\n")  # one write: a worker may be writing a batch now
        sys.stdout.flush()
        """
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count("exiting") == 1, lines
    at = lines.index("exiting")
    sent = [int(k) for line in lines if line != "exiting" for k in line.split()]
    assert sorted(sent) == list(range(1000))  # each key once
    # The 200 held keys wait out a 60 s window: only the exit hook can have sent them.
    sent_at_exit = [int(k) for line in lines[at + 1 :] for k in line.split()]
    assert set(range(800, 1000)) <= set(sent_at_exit), lines
    assert elapsed < 15.0, elapsed


def test_interpreter_exit_is_prompt_when_nothing_is_queued_and_a_worker_idles() -> None:
    proc = run_python(
        """
        from batchsync import Batcher
        b = Batcher(lambda keys: keys)
        assert b.get(1) == 1
        print("done")
        """,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"


@pytest.mark.timing
def test_interpreter_exit_is_bounded_when_a_batch_function_hangs() -> None:
    start = time.monotonic()
    proc = run_python(
        """
        import threading
        from batchsync import Batcher, _lifecycle

        _lifecycle.EXIT_TIMEOUT = 0.5
        never = threading.Event()
        b = Batcher(lambda keys: never.wait(), window=60.0, eager=False)
        b.load(1)
        b.flush()
        print("exiting", flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "exiting\n"
    assert time.monotonic() - start < 15.0


# -- 8. fork while batches are in flight --------------------------------------------------


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_fork_while_batches_are_in_flight() -> None:
    proc = run_python(
        """
        import os, threading, traceback
        from concurrent.futures import wait
        from batchsync import Batcher

        release = threading.Event()
        started = threading.Event()
        calls = []

        def fn(keys):
            calls.append((os.getpid(), list(keys)))
            if keys == [1]:
                started.set()
                release.wait(10)
            return [k * 10 for k in keys]

        b = Batcher(fn, window=60.0, eager=False, max_concurrency=2)
        in_flight = b.load(1)
        b.flush()
        assert started.wait(10)
        queued = b.load(2)                 # queued, window open
        parent = os.getpid()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                futures = b.load_many([3, 2, 4])  # 2 is also queued in the parent
                b.flush()
                done, pending = wait(futures, timeout=10)
                ok = not pending and [f.result() for f in futures] == [30, 20, 40]
                # A lone blocking caller is dispatched at once: no company left from the parent.
                ok = ok and b.get(6, timeout=10) == 60
                mine = [keys for p, keys in calls if p == os.getpid()]
                ok = ok and mine == [[3, 2, 4], [6]]
                # The parent's futures are never resolved in the child.
                ok = ok and not in_flight.done() and not queued.done()
                b.close(timeout=10)
                ok = ok and not in_flight.done() and not queued.done()
                os.write(w, b"ok" if ok else repr((mine, in_flight, queued)).encode())
            except BaseException:
                os.write(w, traceback.format_exc().encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            child_said = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_said == "ok", child_said
        # The parent is unaffected: its batch in flight and its queued key finish as usual.
        release.set()
        b.flush()
        done, pending = wait([in_flight, queued], timeout=10)
        assert not pending
        assert (in_flight.result(), queued.result()) == (10, 20)
        later = b.load(5)
        b.flush()
        assert later.result(10) == 50
        assert [keys for p, keys in calls if p == parent] == [[1], [2], [5]], calls
        b.close(timeout=10)
        print("parent ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "parent ok"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_fork_in_multiprocessing_pool_children_use_the_batcher() -> None:
    proc = run_python(
        """
        import multiprocessing as mp
        from batchsync import Batcher

        b = Batcher(lambda keys: [k * 10 for k in keys], window=0.001)

        def work(k):
            return b.get(k, timeout=10)

        if __name__ == "__main__":
            assert b.get(1, timeout=10) == 10          # the parent has a live worker
            with mp.get_context("fork").Pool(4) as pool:
                assert pool.map(work, range(100)) == [k * 10 for k in range(100)]
            assert b.get(2, timeout=10) == 20
            print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# -- 9. nested loads, three levels deep, max_concurrency=1 -------------------------------


@pytest.mark.parametrize("eager", [True, False])
def test_nested_loads_three_levels_with_max_concurrency_1_never_deadlock(eager: bool) -> None:
    opts: dict[str, Any] = {"window": 0.002, "max_concurrency": 1, "eager": eager}

    def items_fn(keys: list[int]) -> list[str]:
        return [f"item{k}" for k in keys]

    def orders_fn(keys: list[int]) -> list[list[str]]:
        return [items.get_many([k * 10, k * 10 + 1]) for k in keys]

    def customers_fn(keys: list[int]) -> list[dict[str, Any]]:
        out = []
        orders_of = orders.load_many([k * 10 + j for k in keys for j in range(2)])
        for i, k in enumerate(keys):
            # A customer below 1000 was referred by customer k + 1000: a load from this very
            # Batcher, made from its own batch function.
            referrer = customers.get(k + 1000) if k < 1000 else None
            out.append(
                {
                    "id": k,
                    "orders": [f.result(RESOLVE) for f in orders_of[2 * i : 2 * i + 2]],
                    "referrer": referrer["id"] if referrer else None,
                }
            )
        return out

    items: Batcher[int, str] = Batcher(items_fn, name="items", **opts)
    orders: Batcher[int, list[str]] = Batcher(orders_fn, name="orders", **opts)
    customers: Batcher[int, dict[str, Any]] = Batcher(customers_fn, name="customers", **opts)
    results: dict[int, Any] = {}
    try:

        def caller(i: int) -> None:
            for k in range(i, 60, 16):
                results[k] = customers.get(k, timeout=RESOLVE)

        run_threads(16, caller)
    finally:
        for b in (customers, orders, items):
            b.close(timeout=RESOLVE)
    assert sorted(results) == list(range(60))
    for k, c in results.items():
        o = [k * 10, k * 10 + 1]
        assert c == {
            "id": k,
            "orders": [[f"item{x * 10}", f"item{x * 10 + 1}"] for x in o],
            "referrer": k + 1000,
        }


def test_a_batch_function_waiting_on_a_key_of_its_own_call_fails_with_batchcycleerror() -> None:
    def fn(keys: list[int]) -> list[int]:
        if keys == [1]:
            return [b.get(1, timeout=RESOLVE)]  # a true cycle: nobody else can answer it
        return keys

    with Batcher(fn, name="cyc") as b:
        with pytest.raises(
            BatchCycleError,
            match=r"^batchsync: the batch function of 'cyc' waited on key 1, which its own "
            r"running call is computing$",
        ):
            b.get(1, timeout=RESOLVE)
        assert b.get(2, timeout=RESOLVE) == 2


# -- 10. raising callbacks, cancelling callers, callers that die --------------------------


def test_a_raising_callback_affects_no_other_caller_nor_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Batcher(lambda keys: keys, window=60.0, eager=False, name="cb") as b:
        futures = b.load_many(range(10))

        def boom(f: Future[Any]) -> None:
            raise RuntimeError("callback boom")

        futures[3].add_done_callback(boom)
        seen: list[Any] = []
        futures[4].add_done_callback(lambda f: seen.append(f.result()))
        with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
            b.flush()
            assert_resolved(futures)
            assert [f.result(0) for f in futures] == list(range(10))
            later = b.load(42)
            b.flush()
            assert later.result(RESOLVE) == 42  # the worker lives on
        assert seen == [4]
    assert any(
        r.name == "concurrent.futures" and r.exc_info and str(r.exc_info[1]) == "callback boom"
        for r in caplog.records
    )


def test_a_callback_raising_baseexception_affects_no_other_caller() -> None:
    b = Batcher(lambda keys: keys, window=60.0, eager=False, name="cbx")
    try:
        futures = b.load_many(range(5))

        def interrupt(f: Future[Any]) -> None:
            raise KeyboardInterrupt

        futures[0].add_done_callback(interrupt)
        b.flush()
        _, pending = wait(futures, timeout=2.0)
        later = b.load(99)
        b.flush()
        _, pending_later = wait([later], timeout=2.0)
        assert not pending and not pending_later
    finally:
        b.close(timeout=1.0)


def test_cancelled_queued_future_drops_its_key_and_disturbs_no_one() -> None:
    sent: list[list[int]] = []

    def fn(keys: list[int]) -> list[int]:
        sent.append(list(keys))
        return keys

    with Batcher(fn, window=60.0, eager=False, name="cancel") as b:
        alone = b.load(1)
        shared_a = b.load(2)
        shared_b = b.load(2)
        other = b.load(3)
        assert alone.cancel() and shared_a.cancel()
        b.flush()
        assert_resolved([alone, shared_a, shared_b, other])
        assert sent == [[2, 3]]  # 1 had no caller left; 2 still had one
        assert (shared_b.result(0), other.result(0)) == (2, 3)
        assert alone.cancelled() and shared_a.cancelled()
        with pytest.raises(CancelledError):
            alone.result(0)
        again = b.load(1)
        b.flush()
        assert again.result(RESOLVE) == 1  # the dropped key loads normally later
        running = b.load(7)
        b.flush()
        assert running.result(RESOLVE) == 7
        assert not running.cancel()  # too late: a resolved future cannot be cancelled


def test_callers_that_die_while_waiting_do_not_disturb_the_others() -> None:
    gate = Gate()
    with Batcher(gate, window=0.001, max_concurrency=2, name="dead") as b:
        died: list[BaseException] = []

        def impatient() -> None:
            try:
                b.get(-1, timeout=0.05)
            except TimeoutError as exc:
                died.append(exc)  # and the thread ends, its wait abandoned

        def forgetful() -> None:
            b.load(-1)  # loads and leaves without ever looking at the future

        threads = [threading.Thread(target=f) for f in (impatient, forgetful, impatient)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RESOLVE)
        assert len(died) == 2
        patient = b.load(-1)
        other = b.get(5, timeout=RESOLVE)
        gate.release.set()
        assert patient.result(RESOLVE) == -10 and other == 50
        assert sum(c.count(-1) for c in gate.calls) == 1


# -- 12. partitions: nothing fetched under one partition is delivered under another --------

tenant: contextvars.ContextVar[int] = contextvars.ContextVar("tenant")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    loads=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 8)), min_size=1, max_size=60),
    cache=st.sampled_from([False, True]),
    max_batch_size=st.integers(1, 10),
    threads=st.integers(1, 6),
)
def test_no_value_crosses_partitions(
    loads: list[tuple[int, int]], cache: bool, max_batch_size: int, threads: int
) -> None:
    calls: list[tuple[Any, list[int]]] = []
    lock = threading.Lock()

    def fn(keys: list[int]) -> list[tuple[Any, int]]:
        part = current_partition()
        with lock:
            calls.append((part, list(keys)))
        return [(part, k) for k in keys]

    got: list[tuple[int, int, Any]] = []
    with Batcher(
        fn,
        window=0.001,
        max_batch_size=max_batch_size,
        max_concurrency=2,
        cache=cache,
        partition=tenant.get,
        name="part",
    ) as b:

        def caller(i: int) -> None:
            mine = loads[i::threads]
            futs = []
            for t, k in mine:
                tenant.set(t)
                futs.append(b.load(k))
            assert_resolved(futs)
            with lock:
                got.extend((t, k, f.result(0)) for (t, k), f in zip(mine, futs, strict=True))

        run_threads(threads, caller)
    assert len(got) == len(loads)
    for t, k, value in got:
        assert value == (t, k)
    assert current_partition() is None  # outside a batch call
    for part, keys in calls:
        assert part in range(4) and len(keys) <= max_batch_size


# -- bad input, each answered at the earliest point ---------------------------------------


def ident(keys: list[Any]) -> list[Any]:
    return keys


def test_unhashable_key_is_refused_by_load_at_once() -> None:
    with Batcher(ident) as b:
        msg = r"^batchsync: key \[1\] is unhashable \(list\); pass key_fn= to map keys"
        with pytest.raises(TypeError, match=msg):
            b.load([1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=msg):
            b.get_many([2, [1]])  # type: ignore[list-item]
        with pytest.raises(TypeError, match=r"^batchsync: key_fn returned an unhashable"):
            Batcher(ident, key_fn=lambda k: [k]).load(1)
        assert b.stats() == Stats()  # nothing of the refused calls was counted, queued or sent


def test_none_is_an_ordinary_key() -> None:
    sent: list[list[Any]] = []

    def fn(keys: list[Any]) -> dict[Any, str]:
        sent.append(keys)
        return {k: repr(k) for k in keys}

    with Batcher(fn) as b:
        assert b.get_many([None, 1, None], timeout=RESOLVE) == ["None", "1", "None"]
    assert sent == [[None, 1]]


@pytest.mark.parametrize("bad", [None, 5, "fn"])
def test_non_callable_batch_fn_is_refused(bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^batchsync: batch_fn must be callable, not {bad!r}$"):
        Batcher(bad)


@pytest.mark.parametrize(
    ("result", "type_name"),
    [
        (lambda keys: (k for k in keys), "generator"),
        (lambda keys: set(keys), "set"),
        (lambda keys: None, "NoneType"),
        (lambda keys: "abc", "str"),
        (lambda keys: iter(keys), "list_iterator"),
    ],
)
def test_batch_fn_returning_a_non_sequence_fails_its_keys_with_batcherror(
    result: Callable[[list[int]], Any], type_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with Batcher(result, name="bad") as b:
        futures = b.load_many([1, 2, 3])
        assert_resolved(futures)
        for f in futures:
            error = f.exception(0)
            assert type(error) is BatchError
            assert str(error) == (
                f"batchsync: batch function of 'bad' returned {type_name}; "
                "expected a Mapping keyed by key or a Sequence with one item per key"
            )
        assert futures[0].exception(0) is futures[1].exception(0)  # one error for the call
        assert b.stats().failed_batches == 1
    assert [r.levelname for r in caplog.records if r.name == "batchsync"] == ["ERROR"]


def test_wrong_length_names_both_lengths(caplog: pytest.LogCaptureFixture) -> None:
    message = (
        "batchsync: batch function of 'short' returned {} items for {} keys; "
        "a Sequence result needs one item per key, in order"
    )
    with Batcher(lambda keys: keys[:-1], name="short") as b:
        futures = b.load_many(["a", "b", "c"])
        assert_resolved(futures)
        errors = [f.exception(0) for f in futures]
        assert type(errors[0]) is BatchError and str(errors[0]) == message.format(2, 3)
        assert errors[1] is errors[0] and errors[2] is errors[0]  # one error for the call
        with pytest.raises(BatchError) as info:
            b.get_many([1, 2, 3, 4], timeout=RESOLVE)
        assert str(info.value) == message.format(3, 4)


def test_mapping_extra_keys_are_ignored_and_keys_of_another_type_are_missing() -> None:
    def fn(keys: list[int]) -> dict[Any, str]:
        return {**{str(k): f"str{k}" for k in keys}, 99: "extra", 2: "two"}

    with Batcher(fn) as b:
        assert b.get_many([1, 2], timeout=RESOLVE) == [None, "two"]  # "1" is not 1
    with Batcher(fn, missing="raise") as b:
        f1, f2 = b.load_many([1, 2])
        assert_resolved([f1, f2])
        error = f1.exception(0)
        assert type(error) is KeyError and error.args == (1,)
        assert f2.result(0) == "two"


@pytest.mark.parametrize("window", [-0.001, -1, math.nan, math.inf])
def test_bad_window_is_refused(window: float) -> None:
    with pytest.raises(
        ValueError, match=rf"^batchsync: window must be a finite number >= 0, not {window!r}$"
    ):
        Batcher(ident, window=window)


def test_window_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match=r"^batchsync: window must be a number of seconds"):
        Batcher(ident, window="0.1")  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["max_batch_size", "max_concurrency"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        ("2", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_sizes_are_refused(option: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=rf"^batchsync: {option} must be an int >= 1, not "):
        Batcher(ident, **{option: value})


def test_unknown_missing_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"^batchsync: missing must be 'none' or 'raise', not 'skip'$"
    ):
        Batcher(ident, missing="skip")  # type: ignore[arg-type]


def test_load_after_close_raises_batcherclosed() -> None:
    b = Batcher(ident, name="shut")
    assert b.get(1, timeout=RESOLVE) == 1
    b.close()
    for call in (
        lambda: b.load(1),
        lambda: b.load_many([1]),
        lambda: b.get(1),
        lambda: b.get_many([1]),
    ):
        with pytest.raises(BatcherClosed, match=r"^batchsync: Batcher 'shut' is closed$"):
            call()


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan])
def test_negative_or_nan_timeout_is_refused(timeout: float) -> None:
    with Batcher(ident) as b:
        msg = rf"^batchsync: timeout must be >= 0 seconds or None, not {timeout!r}$"
        with pytest.raises(ValueError, match=msg):
            b.get(1, timeout=timeout)
        with pytest.raises(ValueError, match=msg):
            b.get_many([1], timeout=timeout)
        with pytest.raises(ValueError, match=msg):
            b.close(timeout=timeout)
        assert b.stats().loads == 0


def test_keys_given_as_a_string_are_refused() -> None:
    with (
        Batcher(ident) as b,
        pytest.raises(TypeError, match=r"^batchsync: keys must be an iterable of keys, not 'abc'$"),
    ):
        b.load_many("abc")


# -- regressions: core bugs found while building this matrix, since fixed -----------------


def test_a_huge_window_does_not_kill_the_worker() -> None:
    b = Batcher(ident, window=1e10, eager=False, name="huge")
    try:
        f = b.load(1)
        deadline = time.monotonic() + 0.5
        while b._core.live_threads() and time.monotonic() < deadline:
            time.sleep(0.01)  # give a doomed worker time to reach its wait and die
        b.flush()
        assert f.result(timeout=2.0) == 1
    finally:
        b.close(timeout=1.0)


def test_an_infinite_timeout_means_no_timeout() -> None:
    b = Batcher(ident)
    try:
        assert b.get(1, timeout=math.inf) == 1
        assert b.get_many([1, 2], timeout=math.inf) == [1, 2]
    finally:
        b.close(timeout=math.inf)


class _BrokenSequence(Sequence[int]):
    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        raise IndexError(i)


def test_a_sequence_whose_items_raise_fails_its_keys_instead_of_hanging() -> None:
    b = Batcher(lambda keys: _BrokenSequence(len(keys)), name="brokenseq")
    try:
        futures = b.load_many([1, 2])
        _, pending = wait(futures, timeout=2.0)
        assert not pending
        assert all(type(f.exception(0)) is IndexError for f in futures)
    finally:
        b.close(timeout=1.0)


# -- 2-4. PostgreSQL: killed backends, a lost server, statement_timeout -------------------

# Sleeps for negative keys only, so one batch can be made slow while others are fast.
SLOW_SQL = (
    "SELECT id, id * 10 AS v /* {tag} */ FROM unnest(%(keys)s::int[]) AS id,"
    " LATERAL (SELECT pg_sleep(CASE WHEN id < 0 THEN {sleep} ELSE 0 END)) AS s"
)


def pg_loader(pool: Any, tag: str, sleep: float = 30.0, **options: Any) -> Batcher[int, Any]:
    from batchsync import pg

    return pg.loader(pool, SLOW_SQL.format(tag=tag, sleep=sleep), key="id", name=tag, **options)


def backend_running(conn: Any, tag: str, timeout: float = RESOLVE) -> int:
    """Return the pid of the backend running the query tagged tag, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active'"
            " AND pid <> pg_backend_pid() AND query LIKE %s",
            (f"%/* {tag} */%",),
        ).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.01)  # polling the server: it has no event to wait on
    raise AssertionError(f"no backend ran the query {tag!r} within {timeout} s")


@pytest.mark.pg
@pytest.mark.timing
def test_killed_backend_fails_its_batch_fast_and_the_pool_recovers(
    pg_pool: Any, pg_conn: Any
) -> None:
    import psycopg

    with pg_loader(pg_pool, "fault-kill", max_concurrency=2) as loader:
        doomed = loader.load_many([-1, -2])
        loader.flush()
        pid = backend_running(pg_conn, "fault-kill")
        killed_at = time.monotonic()
        assert pg_conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        assert_resolved(doomed, timeout=5.0)
        assert time.monotonic() - killed_at < 5.0
        errors = [f.exception(0) for f in doomed]
        assert errors[0] is errors[1]  # one failed call, one error for its keys
        assert isinstance(errors[0], psycopg.OperationalError), repr(errors[0])
        assert "terminating connection due to administrator command" in str(
            errors[0]
        ) or "server closed the connection unexpectedly" in str(errors[0])
        # The pool replaces the broken connection: the next batches succeed.
        for k in range(5):
            assert loader.get_many([k, k + 100], timeout=RESOLVE) == [
                {"id": k, "v": k * 10},
                {"id": k + 100, "v": (k + 100) * 10},
            ]
        assert loader.stats().failed_batches == 1


@pytest.mark.pg
@pytest.mark.timing
def test_lost_server_fails_loads_fast_and_they_succeed_after_recovery(
    pg_dsn: str, pg_proxy: Any
) -> None:
    import psycopg
    from psycopg_pool import ConnectionPool

    from batchsync.demo._server import proxied_dsn

    pool: ConnectionPool[Any] = ConnectionPool(
        proxied_dsn(pg_dsn, pg_proxy.port),
        min_size=2,
        max_size=4,
        timeout=1.0,
        kwargs={"autocommit": True},
        open=True,
        name="proxied",
    )
    try:
        pool.wait(RESOLVE)
        with pg_loader(pool, "fault-outage", max_concurrency=4) as loader:
            assert loader.get(1, timeout=RESOLVE) == {"id": 1, "v": 10}
            pg_proxy.cut()
            outcomes: list[tuple[float, BaseException | None]] = []
            lock = threading.Lock()

            def during_outage(i: int) -> None:
                start = time.monotonic()
                try:
                    loader.get(i, timeout=RESOLVE)
                    error = None
                except BaseException as exc:
                    error = exc
                with lock:
                    outcomes.append((time.monotonic() - start, error))

            run_threads(8, during_outage)
            assert len(outcomes) == 8
            for elapsed, error in outcomes:
                # A psycopg error (PoolTimeout is one) after at most the pool's timeout.
                assert isinstance(error, psycopg.OperationalError), repr(error)
                assert elapsed < 5.0, elapsed
            pg_proxy.restore()
            deadline = time.monotonic() + 30.0
            value: Any = None
            while time.monotonic() < deadline:
                try:
                    value = loader.get(2, timeout=RESOLVE)
                    break
                except psycopg.OperationalError:
                    time.sleep(0.1)  # the pool reconnects in the background, with backoff
            assert value == {"id": 2, "v": 20}
            assert loader.get_many(range(10), timeout=RESOLVE) == [
                {"id": k, "v": k * 10} for k in range(10)
            ]
            assert len(loader._core.live_threads()) <= 4
    finally:
        pool.close()


@pytest.mark.pg
@pytest.mark.timing
def test_statement_timeout_fails_that_batch_only(pg_dsn: str, pg_conn: Any) -> None:
    import psycopg
    from psycopg_pool import ConnectionPool

    pool: ConnectionPool[Any] = ConnectionPool(
        pg_dsn,
        min_size=2,
        max_size=2,
        kwargs={"autocommit": True, "options": "-c statement_timeout=300"},
        open=True,
        name="st",
    )
    try:
        pool.wait(RESOLVE)
        with pg_loader(pool, "fault-timeout", sleep=5.0, max_concurrency=2) as loader:
            started = time.monotonic()
            slow = loader.load_many([-1, -2])
            loader.flush()
            backend_running(pg_conn, "fault-timeout")  # the slow batch runs on its own
            assert loader.get_many([1, 2, 3], timeout=RESOLVE) == [
                {"id": k, "v": k * 10} for k in (1, 2, 3)
            ]
            assert_resolved(slow, timeout=5.0)
            assert time.monotonic() - started < 3.0  # cancelled at 0.3 s, not after the 5 s
            for f in slow:
                error = f.exception(0)
                assert type(error) is psycopg.errors.QueryCanceled
                assert "canceling statement due to statement timeout" in str(error)
            assert loader.get(4, timeout=RESOLVE) == {"id": 4, "v": 40}
            stats = loader.stats()
            assert (stats.batches, stats.failed_batches) == (3, 1)
    finally:
        pool.close()
