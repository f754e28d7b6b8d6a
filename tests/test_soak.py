"""Item 11 of the fault matrix: a soak of one million loads across 64 threads.

Run only when asked: ``python -m pytest -m soak`` (a few minutes). It asserts that the loads
leave nothing behind: no live futures, no queued or in-flight entries, no extra threads, and
memory that does not grow from the first half of the run to the second.
"""

from __future__ import annotations

import gc
import random
import threading
import tracemalloc
from concurrent.futures import Future, wait
from typing import Any

import pytest

from batchsync import Batcher

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]

THREADS = 64
LOADS = 1_000_000


def live_futures() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Future))


def test_a_million_loads_across_64_threads_leave_nothing_behind() -> None:
    def fn(keys: list[int]) -> list[Any]:
        return [ValueError(k) if k % 97 == 0 else k * 2 for k in keys]

    threads_before = threading.active_count()
    futures_before = live_futures()
    per_thread = LOADS // THREADS // 2  # two halves, measured in between

    with Batcher(fn, window=0.001, max_batch_size=200, max_concurrency=4, name="soak") as b:

        def half(seed: int) -> None:
            barrier = threading.Barrier(THREADS)
            errors: list[BaseException] = []

            def body(i: int) -> None:
                rng = random.Random(seed * 1000 + i)
                try:
                    barrier.wait()
                    pending: list[tuple[int, Future[Any]]] = []
                    for n in range(per_thread):
                        key = rng.randrange(50_000)
                        if n % 4:
                            try:
                                value = b.get(key, timeout=30)
                            except ValueError as exc:
                                assert key % 97 == 0 and exc.args == (key,)
                            else:
                                assert value == key * 2
                        else:
                            pending.append((key, b.load(key)))
                    _, not_done = wait([f for _, f in pending], timeout=30)
                    assert not not_done
                    for key, f in pending:
                        error = f.exception(0)
                        assert (key % 97 == 0) if error else f.result(0) == key * 2
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            assert not any(t.is_alive() for t in threads)
            if errors:
                raise errors[0]

        half(1)  # warm up: caches, interned objects, worker threads
        gc.collect()
        tracemalloc.start()
        try:
            first = tracemalloc.take_snapshot()
            half(2)
            gc.collect()
            second = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        growth = sum(s.size_diff for s in second.compare_to(first, "filename"))
        stats = b.stats()
        assert stats.loads == 2 * THREADS * per_thread
        assert (stats.queued, stats.in_flight) == (0, 0)
        assert len(b._core._entries) == 0
        assert threading.active_count() <= threads_before + 4  # the four workers
    # After close(): a worker may still hold the list of futures it has just resolved.
    assert live_futures() <= futures_before
    assert growth < 1_000_000, f"memory grew by {growth} bytes over {LOADS // 2} loads"
    assert threading.active_count() == threads_before
    print(
        f"soak: {stats.loads} loads, {stats.batches} batches, mean batch "
        f"{stats.mean_batch_size:.1f}, memory growth {growth} bytes"
    )
