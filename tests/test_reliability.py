"""Regression tests of issue 14: no future left behind, by construction.

Faults are injected inside the machinery (a hostile result container, a caller that completes
its own future, a logging handler that raises, a step of the core patched to raise); each test
asserts that every future resolves, the Batcher keeps serving and the stats stay consistent.
"""

from __future__ import annotations

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
