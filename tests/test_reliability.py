"""Regression tests of issue 14: no future left behind, by construction.

Faults are injected inside the machinery (a hostile result container, a caller that completes
its own future, a logging handler that raises, a step of the core patched to raise); each test
asserts that every future resolves, the Batcher keeps serving and the stats stay consistent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from batchsync import Batcher

T = 10.0


class HostileList(list):  # type: ignore[type-arg]
    def __getitem__(self, i: Any) -> Any:
        raise RuntimeError("hostile __getitem__")


def _settled(b: Batcher[Any, Any]) -> None:
    s = b.stats()
    assert s.in_flight == 0 and s.queued == 0


def test_list_subclass_whose_getitem_raises_fails_the_call_not_the_keys() -> None:  # 1
    with Batcher(lambda keys: HostileList(keys), window=0) as b:
        with pytest.raises(RuntimeError, match="hostile"):
            b.get(1, timeout=T)
        fut = b.load(2)
        with pytest.raises(RuntimeError, match="hostile"):
            fut.result(timeout=T)
        _settled(b)


def test_a_caller_completing_its_own_queued_future_does_not_stall_the_others() -> None:  # 2
    with Batcher(lambda keys: [k * 10 for k in keys], window=3600) as b:
        stray = b.load(1)
        stray.set_result(-1)
        other = b.load(2)
        b.flush()
        assert other.result(timeout=T) == 20
        assert stray.result(timeout=0) == -1
        assert b.get(3, timeout=T) == 30
        _settled(b)


class _Raising(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError("hostile handler")

    def handleError(self, record: logging.LogRecord) -> None:
        raise RuntimeError("hostile handleError")


def test_a_logging_handler_that_raises_does_not_kill_the_worker(
    capsys: pytest.CaptureFixture[str],
) -> None:  # 3
    log = logging.getLogger("batchsync")
    handler = _Raising()
    log.addHandler(handler)
    calls = []

    def fn(keys: list[int]) -> list[int]:
        calls.append(keys)
        if 1 in keys:
            raise ValueError("boom")
        return [k * 10 for k in keys]

    try:
        with Batcher(fn, window=0) as b:
            with pytest.raises(ValueError, match="boom"):
                b.get(1, timeout=T)
            assert b.get(2, timeout=T) == 20
            _settled(b)
    finally:
        log.removeHandler(handler)


def test_a_failing_internal_step_fails_the_chunk_and_the_worker_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # by construction: _match and _finish's publication patched to raise
    with Batcher(lambda keys: [k * 10 for k in keys], window=0) as b:
        core = b._core
        real = core._match

        def broken(chunk: Any, result: object) -> Any:
            raise RuntimeError("internal bug")

        monkeypatch.setattr(core, "_match", broken)
        futs = b.load_many([1, 2])
        b.flush()
        for f in futs:
            with pytest.raises(RuntimeError, match="internal bug"):
                f.result(timeout=T)
        monkeypatch.setattr(core, "_match", real)
        assert b.get(3, timeout=T) == 30
        _settled(b)
        assert b.stats().failed_batches == 1
    assert not b._core.live_threads()


def test_prime_with_an_exception_fails_the_load() -> None:  # 4
    with Batcher(lambda keys: list(keys), cache=True) as b:
        b.prime(1, KeyError("gone"))
        with pytest.raises(KeyError, match="gone"):
            b.get(1, timeout=T)
        with pytest.raises(KeyError, match="gone"):
            b.load(1).result(timeout=T)


def test_prime_leaves_an_existing_key_alone() -> None:  # 8
    with Batcher(lambda keys: [k * 10 for k in keys], cache=True) as b:
        assert b.get(1, timeout=T) == 10
        b.prime(1, 111)
        assert b.get(1, timeout=T) == 10
        b.clear(1)
        b.prime(1, 111)
        assert b.get(1, timeout=T) == 111


def _in_flight_batcher() -> tuple[Batcher[int, int], threading.Event, threading.Event]:
    started, release = threading.Event(), threading.Event()

    def fn(keys: list[int]) -> list[int]:
        started.set()
        assert release.wait(T)
        return [k * 10 for k in keys]

    return Batcher(fn, cache=True, window=0), started, release


@pytest.mark.parametrize("how", ["clear", "clear_all"])
def test_a_clear_during_a_flight_keeps_its_value_out_of_the_cache(how: str) -> None:  # 5
    b, started, release = _in_flight_batcher()
    with b:
        fut = b.load(1)
        b.flush()
        assert started.wait(T)
        b.clear(1) if how == "clear" else b.clear_all()
        release.set()
        assert fut.result(timeout=T) == 10
        b.get(1, timeout=T)
        assert b.stats().batches == 2  # the second get went to the batch function


def test_prime_during_a_flight_is_not_overwritten_by_the_flight() -> None:  # 10
    b, started, release = _in_flight_batcher()
    with b:
        fut = b.load(1)
        b.flush()
        assert started.wait(T)
        b.prime(1, 111)
        release.set()
        assert fut.result(timeout=T) == 10
        assert b.get(1, timeout=T) == 111


@pytest.mark.parametrize("value", ["True", 1, None, "False"])
@pytest.mark.parametrize("option", ["eager", "inline"])
def test_boolean_options_take_bools_only(option: str, value: Any) -> None:  # 26
    with pytest.raises(TypeError, match=rf"{option} must be True or False, not {value!r}"):
        Batcher(lambda keys: keys, **{option: value})


@pytest.mark.timeout(20)
def test_a_nan_partition_does_not_spin() -> None:  # 11
    with Batcher(lambda keys: [k * 10 for k in keys], partition=lambda: math.nan) as b:
        assert b.get_many([1, 2], timeout=T) == [10, 20]
        assert b.get(3, timeout=T) == 30


def test_an_unhashable_partition_is_named() -> None:  # 12
    with (
        Batcher(lambda keys: keys, partition=lambda: ["x"]) as b,
        pytest.raises(TypeError, match=r"partition function returned an unhashable"),
    ):
        b.get(1, timeout=T)


def test_a_future_is_a_future() -> None:
    with Batcher(lambda keys: keys) as b:
        assert isinstance(b.load(1), Future)


def test_get_many_and_load_many_count_repeated_cache_hits_alike() -> None:  # 25
    with Batcher(lambda keys: [k * 10 for k in keys], cache=True) as a:
        a.get(1, timeout=T)
        a.get_many([1, 1, 1], timeout=T)
        s = a.stats()
        assert (s.cache_hits, s.deduplicated) == (3, 0)
    with Batcher(lambda keys: [k * 10 for k in keys], cache=True) as b:
        b.get(1, timeout=T)
        for f in b.load_many([1, 1, 1]):
            assert f.result(timeout=T) == 10
        s = b.stats()
        assert (s.cache_hits, s.deduplicated) == (3, 0)


# -- hangs (issue 14, #9 to #22) --------------------------------------------------------------


def _until(cond: Any, what: str) -> None:
    """Wait (bounded) for a state the core reaches on another thread; no fixed sleep."""
    import time

    end = time.monotonic() + T
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.001)


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("opts", [{"max_concurrency": 2}, {"inline": True}])
def test_close_from_a_batch_function_does_not_deadlock(opts: dict[str, Any]) -> None:  # 9
    box: list[Batcher[int, int]] = []

    def fn(keys: list[int]) -> list[int]:
        box[0].close()
        return [k * 10 for k in keys]

    b: Batcher[int, int] = Batcher(fn, window=0, **opts)
    box.append(b)
    t, out = _in_thread(lambda: b.get(1))  # no timeout: inline=True runs it on this thread
    t.join(T)
    assert out == [10]
    assert b.closed
    for w in b._core._workers:
        w.join(T)
    assert not b._core.live_threads()


def _failing_start(self: threading.Thread) -> None:
    raise RuntimeError("can't start new thread")


def test_a_failed_thread_start_fails_the_keys_and_the_next_load_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # 17 (a fake: a real "can't start new thread" cannot be provoked on demand)
    b = Batcher(lambda keys: [k * 10 for k in keys], window=0)
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", _failing_start)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            b.get(1, timeout=T)
        fut = b.load(2)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            fut.result(timeout=T)
        _settled(b)
    assert b.get(3, timeout=T) == 30
    assert b.get(1, timeout=T) == 10
    b.close()
    _settled(b)
    assert not b._core.live_threads()


def test_close_after_a_failed_thread_start_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    # 17: close() and the exit hook raised "cannot join thread before it is started"
    b = Batcher(lambda keys: keys, window=3600)
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", _failing_start)
        fut = b.load(1)
    b.close(timeout=T)
    assert fut.done()
    from batchsync import _lifecycle

    _lifecycle._at_exit()  # the exit hook closes every live core: none may raise


@pytest.mark.parametrize("pad", range(8))
def test_nested_loads_hitting_the_recursion_limit_leak_no_slot(pad: int) -> None:  # 21
    # Each level adds `pad` frames of its own, so that the limit is hit at a different
    # place of the machinery from one parameter to the next.
    box: list[Batcher[int, int]] = []

    def padded(n: int, k: int) -> int:
        return padded(n - 1, k) if n else box[0].get(k - 1) + 1

    def fn(keys: list[int]) -> list[int]:
        return [k if k <= 0 else padded(pad, k) for k in keys]

    with Batcher(fn, window=0) as b:
        box.append(b)
        with pytest.raises(RecursionError):
            b.get(600, timeout=T)
        # The chain's leftover queued keys finish on the worker (down to 0): then it is idle.
        _until(lambda: b.stats().in_flight == 0 and b.stats().queued == 0, "a settled Batcher")
        assert b.get(5, timeout=T) == 5
        _settled(b)


def test_close_timeout_builds_no_message_from_user_code_under_the_lock() -> None:  # 19
    reprs = []

    class BadRepr:
        def __repr__(self) -> str:
            reprs.append(1)
            raise RuntimeError("hostile __repr__")

    started, release = threading.Event(), threading.Event()

    def fn(keys: list[Any]) -> list[int]:
        started.set()
        release.wait(T)
        return [1 for _ in keys]

    b = Batcher(fn, window=0)
    in_flight = b.load(BadRepr())
    assert started.wait(T)
    queued = b.load(BadRepr())
    try:
        b.close(timeout=0.1)  # must not raise, must fail both futures
        assert reprs == []  # no user code ran in close()
        from batchsync import BatcherClosed

        for f in (in_flight, queued):
            exc = f.exception(timeout=0)
            assert isinstance(exc, BatcherClosed)
            assert "was answered" in str(exc)  # the message survives a hostile repr
    finally:
        release.set()


def test_a_lazy_proxy_value_runs_no_user_code_under_the_lock() -> None:  # 18
    box: list[Batcher[int, Any]] = []

    class Proxy:
        @property  # type: ignore[misc]
        def __class__(self) -> type:
            box[0].stats()  # touches the Batcher: self-deadlock if run under its lock
            raise RuntimeError("proxied code")

    proxy = Proxy()
    with Batcher(lambda keys: [proxy for _ in keys], window=0) as b:
        box.append(b)
        assert b.get(1, timeout=T) is proxy
        assert b.load(2).result(timeout=T) is proxy
        _settled(b)


def test_a_batcher_collected_on_its_own_worker_under_the_lock_does_not_deadlock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # 20: the collection is forced inside the critical section of taking a chunk
    import gc

    b: Any = Batcher(lambda keys: [k * 10 for k in keys], window=3600)
    b.cycle = b  # only the cyclic GC can collect it
    core = b._core
    real = core._take_locked
    collected = []

    def take_and_collect() -> Any:
        if not collected:
            collected.append(gc.collect())  # runs the Batcher's finalizer on this worker
        return real()

    monkeypatch.setattr(core, "_take_locked", take_and_collect)
    fut = b.load(1)
    del b
    core.flush()
    assert fut.result(timeout=T) == 10
    _until(lambda: core.closed, "the finalizer's close")
    for w in core._workers:
        w.join(T)
    assert not core.live_threads()


def test_a_nested_get_with_a_timeout_leaves_on_time() -> None:  # 16
    release = threading.Event()
    slow = Batcher(lambda keys: [release.wait(T) and k for k in keys], window=0)
    seen: list[Any] = []

    def outer(keys: list[int]) -> list[int]:
        try:
            seen.append(slow.get(1, timeout=0.2))
        except TimeoutError as exc:
            seen.append(exc)
        finally:
            release.set()
        return keys

    with slow, Batcher(outer, window=0) as a:
        assert a.get(7, timeout=2 * T) == 7
        assert len(seen) == 1 and isinstance(seen[0], TimeoutError), seen
        assert slow.get(1, timeout=T) == 1


def test_a_nested_load_keeps_another_batchers_max_concurrency() -> None:  # 15
    lock = threading.Lock()
    running = [0]
    most = [0]
    go = threading.Event()

    def fn_b(keys: list[int]) -> list[int]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if keys == [1]:
                go.wait(T)
            return [k * 10 for k in keys]
        finally:
            with lock:
                running[0] -= 1

    b = Batcher(fn_b, window=0, max_concurrency=1)
    a = Batcher(lambda keys: [b.get(k) for k in keys], window=0)
    with a, b:
        first = b.load(1)
        _until(lambda: b.stats().in_flight == 1, "B's first call")
        t, out = _in_thread(lambda: a.get(2, timeout=T))
        _until(lambda: b.stats().queued == 1 or most[0] > 1, "A's nested load of B")
        go.set()
        t.join(T)
        assert out == [20]
        assert first.result(timeout=T) == 10
        assert most[0] == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_inside_a_scope_does_not_join_the_parents_entries() -> None:  # 14
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, batchsync
        from batchsync import Batcher

        b = Batcher(lambda keys: [k * 10 for k in keys], cache="scope", window=3600)
        with batchsync.scope():
            queued = b.load(1)
            pid = os.fork()
            if pid == 0:
                try:
                    ok = b.get(1, timeout=5) == 10 and b.get(2, timeout=5) == 20
                except BaseException as exc:
                    print("child:", repr(exc), flush=True)
                    ok = False
                os._exit(0 if ok else 1)
            b.flush()
            assert queued.result(10) == 10
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "child 0\n"


def test_a_first_finish_pass_that_raises_midway_strands_no_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # by construction: _finish raises after publishing some entries
    from batchsync import _core

    real = _core._is_error
    calls = [0]

    def flaky(value: Any) -> bool:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("internal bug in the middle of _finish")
        return real(value)

    with Batcher(lambda keys: [k * 10 for k in keys], window=3600) as b:
        futs = b.load_many([1, 2, 3])
        monkeypatch.setattr(_core, "_is_error", flaky)
        b.flush()
        for f in futs:
            f.exception(timeout=T)  # every future ends, resolved or failed
        monkeypatch.setattr(_core, "_is_error", real)
        assert b.get(4, timeout=T) == 40
        _settled(b)


class _Interrupt(BaseException):
    """What a signal handler raises (KeyboardInterrupt's stand-in, so pytest is not stopped)."""


@pytest.mark.parametrize("path", ["inline", "nested"])
def test_an_interrupt_between_taking_a_chunk_and_running_it_leaks_no_slot(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:  # 22: the interrupt is injected at the call of _run, right after the take
    box: list[Batcher[int, int]] = []
    if path == "inline":
        b: Batcher[int, int] = Batcher(lambda keys: [k * 10 for k in keys], inline=True, window=0)
    else:
        b = Batcher(
            lambda keys: [k * 10 if k < 100 else box[0].get(k - 100) for k in keys], window=0
        )
    box.append(b)
    core = b._core
    real = core._run
    fired = []

    def interrupted(chunk: Any, wake: bool = True) -> None:
        if not fired and (path == "inline" or chunk[0].key < 100):
            fired.append(chunk)
            raise _Interrupt()
        real(chunk, wake)

    monkeypatch.setattr(core, "_run", interrupted)
    with b:
        with pytest.raises(_Interrupt):
            b.get(101 if path == "nested" else 1)
        assert fired
        monkeypatch.setattr(core, "_run", real)
        assert b.get(2, timeout=T) == 20
        _settled(b)
        assert b.stats().in_flight == 0


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="needs setitimer")
@pytest.mark.xfail(
    strict=False,
    reason="known defect (issue 14 #22): an interrupt can still land between two state"
    " changes of the queue or the delivery path and strand keys (seen in about 1 run in 20"
    " on 3.11, in most runs on 3.10, where every function entry is an interrupt point)",
)
@pytest.mark.timeout(60)
def test_a_storm_of_raising_signal_handlers_does_not_hang_the_batcher() -> None:  # 22
    import signal
    import time

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")

    import batchsync._core
    import batchsync._queue

    machinery = (vars(batchsync._core), vars(batchsync._queue))

    def handler(signum: int, frame: Any) -> None:
        # Raise where it hurts: only when the main thread is inside batchsync's own code
        # (the test's own loop cannot guard every bytecode against an interrupt).
        if frame is not None and any(frame.f_globals is g for g in machinery):
            raise _Interrupt()

    b = Batcher(lambda keys: [k * 10 for k in keys], inline=True, window=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def other() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                assert b.get(i % 50, timeout=T) == (i % 50) * 10
            except _Interrupt:
                pass  # the main thread's interrupted call failed this key: an answer
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=other, daemon=True) for _ in range(3)]
    old = signal.signal(signal.SIGALRM, handler)
    try:
        for t in threads:
            t.start()
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            with contextlib.suppress(_Interrupt):
                # With a timeout: this test replaces SIGALRM, so pytest-timeout cannot end it.
                b.get(1000 + int(time.monotonic() * 1000) % 50, timeout=T)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        stop.set()
    for t in threads:
        t.join(T)
        assert not t.is_alive()
    assert errors == []
    assert b.get(7, timeout=T) == 70
    _until(lambda: b.stats().in_flight == 0 and b.stats().queued == 0, "a settled Batcher")
    b.close(timeout=T)


# -- references and complexity (#23, #24, #7, #13) --------------------------------------------


def test_a_batcher_owned_by_its_batch_methods_object_is_collected() -> None:  # 23
    import gc
    import weakref

    class Repo:
        def __init__(self) -> None:
            self.users = Batcher(self._fetch, window=0)

        def _fetch(self, keys: list[int]) -> list[int]:
            return [k * 10 for k in keys]

    repo = Repo()
    assert repo.users.get(1, timeout=T) == 10
    core = repo.users._core
    workers = core.live_threads()
    assert workers
    ref = weakref.ref(repo)
    del repo
    gc.collect()
    assert ref() is None
    for w in workers:
        w.join(T)
    assert not core.live_threads()


def test_a_method_batcher_still_sends_its_queue_when_collected() -> None:  # 23: the README
    class Repo:
        def fetch(self, keys: list[int]) -> list[int]:
            return [k * 10 for k in keys]

    b = Batcher(Repo().fetch, window=3600)  # the object lives only through the Batcher
    fut = b.load(1)
    del b  # collected by reference counting: the queue is still sent
    assert fut.result(timeout=T) == 10


class _Key:
    """A weakly referenceable key, to see when the last reference to it goes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and other.n == self.n


def test_a_failed_batch_leaves_no_reference_cycle_holding_its_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # 24
    import gc
    import weakref

    monkeypatch.setattr(logging.getLogger("batchsync"), "disabled", True)  # records hold tbs

    def fn(keys: list[_Key]) -> list[int]:
        raise ValueError("boom")

    with Batcher(fn, window=0) as b:
        key = _Key(1)
        ref = weakref.ref(key)
        gc.disable()
        try:
            fut = b.load(key)
            assert isinstance(fut.exception(timeout=T), ValueError)
            del fut, key
            _until(lambda: b.stats().in_flight == 0, "the finished call")
            assert ref() is None, gc.get_referrers(ref())
        finally:
            gc.enable()


@pytest.mark.parametrize("how", ["returned", "raised"])
def test_many_failed_get_many_calls_do_not_grow_memory(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:  # 7 (and 24): counted without the cyclic collector
    import gc

    monkeypatch.setattr(logging.getLogger("batchsync"), "disabled", True)

    def fn(keys: list[int]) -> list[Exception]:
        if how == "raised":
            raise ValueError("boom")
        return [ValueError(k) for k in keys]

    n = 100_000 if how == "returned" else 20_000
    with Batcher(fn, window=0, inline=True) as b:
        gc.collect()
        gc.disable()
        try:
            for i in range(1000):
                with contextlib.suppress(ValueError):
                    b.get(i)
            before = len(gc.get_objects())
            for i in range(n):
                with contextlib.suppress(ValueError):
                    b.get(i)
            grown = len(gc.get_objects()) - before
        finally:
            gc.enable()
    assert grown < 1000, f"{grown} objects more after {n} failed loads"


class _Part:
    """A partition whose equality and hash calls are counted (each load makes a new one)."""

    calls = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        _Part.calls += 1
        return self.n

    def __eq__(self, other: object) -> bool:
        _Part.calls += 1
        return isinstance(other, _Part) and other.n == self.n


def test_taking_partitioned_chunks_is_linear() -> None:  # 13: counted, not timed
    from batchsync._queue import Entry, Queue

    n, size = 20_000, 100
    q = Queue(0.0, size, partitioned=True)
    for i in range(n):
        q.push(Entry(i, i, (i % 2, i), _Part(i % 2)), 0.0)
    q.make_due()
    _Part.calls = 0
    sent = []
    while q.due:
        chunk = q.take()
        assert 0 < len(chunk) <= size and len({e.partition.n for e in chunk}) == 1
        sent.extend(e.key for e in chunk)
    assert sorted(sent) == list(range(n)) and len(q) == 0
    assert _Part.calls <= 3 * n, f"{_Part.calls} partition comparisons for {n} keys"


def test_partitioned_get_many_of_many_keys_keeps_order_and_partitions() -> None:  # 13
    calls: list[tuple[Any, list[int]]] = []

    def fn(keys: list[int]) -> list[int]:
        from batchsync import current_partition

        calls.append((current_partition(), keys))
        return [k * 10 for k in keys]

    tenant = ["a"]
    with Batcher(fn, partition=lambda: tenant[0], max_batch_size=100, window=3600) as b:
        futs = b.load_many(range(250))
        tenant[0] = "b"
        futs += b.load_many(range(250, 300))
        tenant[0] = "a"
        assert b.get_many(range(300, 400), timeout=T) == [k * 10 for k in range(300, 400)]
        assert [f.result(timeout=T) for f in futs] == [k * 10 for k in range(300)]
    assert all(0 < len(keys) <= 100 for _, keys in calls)
    assert sorted(k for _, keys in calls for k in keys) == list(range(400))  # each key once
    for p, keys in calls:
        assert all((k < 250 or k >= 300) == (p == "a") for k in keys)


# -- faults inside the machinery (by construction) ----------------------------------------


def _fault(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str, fault: Any) -> list[int]:
    """Patch obj.name to call fault() once (first call), then behave as before."""
    real = getattr(obj, name)
    fired: list[int] = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(1)
            fault()
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, patched)
    return fired


def _boom() -> None:
    raise RuntimeError("internal step failed")


@pytest.mark.parametrize("step", ["_take_locked", "_match", "_finish", "_log", "_deliver"])
@pytest.mark.parametrize("waiter", ["load", "get_many"])
def test_a_raising_internal_step_strands_nothing(
    monkeypatch: pytest.MonkeyPatch, step: str, waiter: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchsync import _core

    b = Batcher(lambda keys: [k * 10 for k in keys], window=3600, max_concurrency=2)
    core = b._core
    target: Any = _core if step == "_deliver" else core
    fired = _fault(monkeypatch, target, step, _boom)
    if waiter == "load":
        futs = b.load_many([1, 2, 3])
        b.flush()
        outcomes = [f.exception(timeout=T) for f in futs]
        assert all(o is None or isinstance(o, RuntimeError) for o in outcomes), outcomes
    else:
        t, out = _in_thread(lambda: b.get_many([1, 2, 3], timeout=T))
        t.join(2 * T)
        assert out and (out[0] == [10, 20, 30] or isinstance(out[0], RuntimeError)), out
    assert fired
    last = b.load(4)  # not get(): the helper thread counts as company for window=3600
    b.flush()
    assert last.result(timeout=T) == 40  # the workers live on
    _settled(b)
    s = b.stats()
    assert s.keys == s.loads - s.cache_hits - s.deduplicated  # every load sent once
    assert len(b._core.live_threads()) <= 2
    b.close(timeout=T)
    assert not b._core.live_threads()


@pytest.mark.parametrize("step", ["_match", "_finish", "_log"])  # the steps outside the lock
def test_an_internal_step_blocked_on_an_event_is_failed_by_close_timeout(
    monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    from batchsync import BatcherClosed

    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        release.wait(T)

    b = Batcher(lambda keys: [k * 10 for k in keys], window=0)
    _fault(monkeypatch, b._core, step, block)
    try:
        fut = b.load(1)
        assert entered.wait(T)
        other = b.load(2)
        b.close(timeout=0.1)
        # Every future has its answer now, the blocked step's own keys included.
        assert isinstance(other.exception(timeout=0), BatcherClosed)
        assert fut.done()
    finally:
        release.set()
    for w in b._core._workers:
        w.join(T)
    assert not b._core.live_threads()
    _settled(b)


# -- failed-batch logging (issue 10) ----------------------------------------------------------


def test_the_failure_log_rule_counts_what_it_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchsync import _lograte

    monkeypatch.setattr(_lograte, "interval", 10.0)
    log = _lograte.FailureLog()
    assert log.admit(100.0) == 0  # the first: logged
    assert log.admit(101.0) is None
    assert log.admit(109.9) is None
    assert log.admit(110.0) == 2  # logged, with the count of those left out
    assert log.admit(110.5) is None
    monkeypatch.setattr(_lograte, "interval", 0.0)
    assert log.admit(110.5) == 1
    assert log.admit(110.5) == 0


def test_set_failure_log_interval_checks_its_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchsync
    from batchsync import _lograte

    monkeypatch.setattr(_lograte, "interval", _lograte.DEFAULT_INTERVAL)
    assert batchsync.set_failure_log_interval(0) == 10.0
    assert batchsync.set_failure_log_interval(60) == 0.0
    with pytest.raises(ValueError, match="must be a number >= 0, not -1"):
        batchsync.set_failure_log_interval(-1)
    with pytest.raises(TypeError, match="number of seconds, not '5'"):
        batchsync.set_failure_log_interval("5")  # type: ignore[arg-type]


def test_a_failing_batcher_logs_one_error_with_traceback_then_counts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchsync import _lograte

    monkeypatch.setattr(_lograte, "interval", 3600.0)

    def fn(keys: list[int]) -> list[int]:
        raise ValueError(f"down {keys}")

    with caplog.at_level(logging.DEBUG, logger="batchsync"), Batcher(fn, name="db") as b:
        for i in range(5):
            with pytest.raises(ValueError):
                b.get(i, timeout=T)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert errors[0].getMessage().startswith("batchsync db: batch of 1 keys failed after ")
        assert errors[0].exc_info is not None and str(errors[0].exc_info[1]) == "down [0]"
        left_out = [r for r in caplog.records if "left out by the rate limit" in r.getMessage()]
        assert len(left_out) == 4 and all(r.levelno == logging.DEBUG for r in left_out)
        assert all(r.exc_info is None for r in left_out)
        monkeypatch.setattr(_lograte, "interval", 0.0)
        with pytest.raises(ValueError):
            b.get(9, timeout=T)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2
        assert "(4 more failed batches not logged since the previous record)" in (
            errors[1].getMessage()
        )
        assert str(errors[1].exc_info[1]) == "down [9]"  # type: ignore[index]
    with Batcher(fn, name="db") as other:  # another Batcher starts with its own first record
        monkeypatch.setattr(_lograte, "interval", 3600.0)
        with pytest.raises(ValueError):
            other.get(1, timeout=T)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3


class _RaisingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        raise RuntimeError("hostile filter")


def test_a_logging_filter_that_raises_does_not_stall_the_batcher(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:  # 3, through a filter and with caplog's real handler attached
    log = logging.getLogger("batchsync")
    bad = _RaisingFilter()
    log.addFilter(bad)

    def fn(keys: list[int]) -> list[int]:
        if 1 in keys:
            raise ValueError("boom")
        return [k * 10 for k in keys]

    try:
        with caplog.at_level(logging.DEBUG, logger="batchsync"), Batcher(fn, window=0) as b:
            with pytest.raises(ValueError, match="boom"):
                b.get(1, timeout=T)
            assert b.get(2, timeout=T) == 20
            _settled(b)
    finally:
        log.removeFilter(bad)
    assert "hostile filter" in capsys.readouterr().err  # reported by the last resort


# -- found reviewing the merge of the hot path and the reliability work ------------------------


def test_a_raising_filter_on_the_futures_logger_cannot_stop_a_take() -> None:
    # A future its caller finished is skipped without concurrent.futures' CRITICAL log line:
    # a filter that raised there stopped every take of the chunk, and the worker spun.
    class Boom(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise ValueError("filter broke")

    log, boom = logging.getLogger("concurrent.futures"), Boom()
    log.addFilter(boom)
    try:
        with Batcher(lambda keys: [k * 10 for k in keys], window=0.05) as b:
            mine, other = b.load(1), b.load(2)
            mine.set_result("mine")  # the caller completes its own queued future
            assert other.result(T) == 20
            assert mine.result() == "mine"
    finally:
        log.removeFilter(boom)


class _Key:
    """A key whose hash raises _Interrupt once, on the n-th hash: an interrupt in a loop."""

    armed = 0

    def __init__(self, v: int) -> None:
        self.v = v

    def __hash__(self) -> int:
        if _Key.armed:
            _Key.armed -= 1
            if not _Key.armed:
                raise _Interrupt()
        return hash(self.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and other.v == self.v


def test_an_interrupted_first_load_many_leaves_its_keys_sendable() -> None:
    with Batcher(lambda keys: [k.v * 10 for k in keys], window=0.01) as b:
        # dict.fromkeys hashes both keys; then the loop looks up and stores key 1 (two more
        # hashes) and stops at the lookup of key 2: key 1 is queued, nothing else ran.
        _Key.armed = 5
        with pytest.raises(_Interrupt):
            b.load_many([_Key(1), _Key(2)])
        assert b.load(_Key(1)).result(T) == 10
        assert b.load(_Key(2)).result(T) == 20


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_fork_while_another_thread_resolves_futures_leaves_the_child_working() -> None:
    from tests.test_faults import run_python

    done = run_python(
        """
        import os, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        import batchsync, batchsync._future as fm
        fm._lock.acquire()  # as if another thread were inside a LoadFuture at fork()
        pid = os.fork()
        if pid == 0:
            b = batchsync.Batcher(lambda keys: [k * 10 for k in keys])
            os._exit(0 if b.load(4).result(10) == 40 else 1)
        fm._lock.release()
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    assert done.stdout.strip() == "child 0", done.stderr
