"""Cost of the batching layer itself, against baselines measured in the same run.

    python benchmarks/bench_core.py [--keys 100000] [--repeat 5]

Prints, per key over --keys keys with a trivial batch function:
  * future   : create, resolve and read one bare concurrent.futures.Future (the baseline)
  * get_many : Batcher.get_many(keys)
  * load_many: Batcher.load_many(keys), then .result() of each
  * aiodataloader: DataLoader.load_many(keys) awaited in asyncio (if installed)
and the throughput of 64 threads each calling Batcher.get 1,000 times, with the batch sizes,
once with the trivial batch function and once with one that costs --call-cost microseconds
per call (a stand-in for a database round trip: that is when coalescing pays).
Each figure is the best of --repeat runs (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from batchsync import Batcher


def trivial(keys: list[int]) -> list[int]:
    return keys


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def bench_future(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        f: Future[int] = Future()
        f.set_result(i)
        f.result()
    return (time.perf_counter() - start) / n


def bench_futures_alive(n: int) -> float:
    """n bare Futures alive at once, as load_many holds them: created, resolved, read."""
    start = time.perf_counter()
    futures: list[Future[int]] = [Future() for _ in range(n)]
    for i, f in enumerate(futures):
        f.set_result(i)
    for f in futures:
        f.result()
    return (time.perf_counter() - start) / n


def bench_get_many(n: int) -> float:
    keys = list(range(n))
    with Batcher(trivial) as b:
        start = time.perf_counter()
        values = b.get_many(keys)
        elapsed = time.perf_counter() - start
    assert values == keys
    return elapsed / n


def bench_load_many(n: int) -> float:
    keys = list(range(n))
    with Batcher(trivial) as b:
        start = time.perf_counter()
        values = [f.result() for f in b.load_many(keys)]
        elapsed = time.perf_counter() - start
    assert values == keys
    return elapsed / n


def bench_aiodataloader(n: int) -> float | None:
    try:
        from aiodataloader import DataLoader
    except ImportError:
        return None

    async def batch(keys: list[int]) -> list[int]:
        return keys

    async def run() -> float:
        loader = DataLoader(batch, max_batch_size=500, cache=False)
        keys = list(range(n))
        start = time.perf_counter()
        values = await loader.load_many(keys)
        elapsed = time.perf_counter() - start
        assert list(values) == keys
        return elapsed / n

    return asyncio.run(run())


def _threads_getting(get: Callable[[int], Any], threads: int, per_thread: int) -> float:
    """Seconds `threads` threads, released together, take to `get` `per_thread` keys each.

    Every value is checked: the batch functions here answer each key with itself.
    """
    barrier = threading.Barrier(threads + 1)

    def worker(seed: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            key = (seed * 7919 + i) % 5000
            if get(key) != key:
                raise AssertionError("wrong value")

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def bench_threads(threads: int, per_thread: int, call_cost: float) -> dict[str, float]:
    def fn(keys: list[int]) -> list[int]:
        if call_cost:
            time.sleep(call_cost)  # stands in for one round trip to a database
        return keys

    b = Batcher(fn, name="bench")
    elapsed = _threads_getting(b.get, threads, per_thread)
    b.close()
    s = b.stats()
    return {
        "gets_per_s": threads * per_thread / elapsed,
        "batches": s.batches,
        "mean_batch_size": s.mean_batch_size,
        "coalescing_rate": s.coalescing_rate,
        "deduplicated": s.deduplicated,
    }


def bench_batched_package(threads: int, per_thread: int) -> float | None:
    """gets/s of PyPI `batched` (0.1.5): its sync __call__ from each thread, same workload."""
    try:
        from batched import dynamically
    except ImportError:
        return None

    @dynamically(batch_size=500, timeout_ms=5.0)  # type: ignore[misc]
    def fn(keys: list[int]) -> list[int]:
        return keys

    elapsed = _threads_getting(fn, threads, per_thread)
    fn.shutdown()
    return threads * per_thread / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--per-thread", type=int, default=1000)
    ap.add_argument(
        "--call-cost", type=float, default=200.0, help="microseconds each call costs in the "
        "second thread run (a stand-in for a database round trip)"
    )
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    n, r = args.keys, args.repeat
    fut = best(lambda: bench_future(n), r)
    gm = best(lambda: bench_get_many(n), r)
    lm = best(lambda: bench_load_many(n), r)
    alive = best(lambda: bench_futures_alive(n), r)
    aio_runs = [bench_aiodataloader(n) for _ in range(r)]
    aio = None if aio_runs[0] is None else min(x for x in aio_runs if x is not None)
    thr = bench_threads(args.threads, args.per_thread, 0.0)
    slow = bench_threads(args.threads, args.per_thread, args.call_cost / 1e6)
    pkg = bench_batched_package(args.threads, args.per_thread)
    out = {
        "python": sys.version.split()[0],
        "keys": n,
        "us_per_key": {
            "future_baseline": fut * 1e6,
            "get_many": gm * 1e6,
            "load_many": lm * 1e6,
            "futures_alive_baseline": alive * 1e6,
            "aiodataloader_load_many": None if aio is None else aio * 1e6,
        },
        "get_many_vs_future": gm / fut,
        "aiodataloader_vs_get_many": None if aio is None else aio / gm,
        "threads": {"threads": args.threads, "gets_per_thread": args.per_thread, **thr},
        "threads_with_call_cost": {"call_cost_us": args.call_cost, **slow},
        "batched_package_gets_per_s": pkg,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"Python {out['python']}, {n:,} keys, best of {r} runs")
    print(f"  bare Future create+resolve+read : {fut * 1e6:6.2f} us/key  (baseline)")
    print(f"  Batcher.get_many                : {gm * 1e6:6.2f} us/key  ({gm / fut:.2f}x baseline)")
    print(f"  {n:,} bare Futures alive at once : {alive * 1e6:6.2f} us/key  (load_many's baseline)")
    print(
        f"  Batcher.load_many + result()    : {lm * 1e6:6.2f} us/key  "
        f"({lm / alive:.2f}x its baseline)"
    )
    if aio is not None:
        print(
            f"  aiodataloader load_many         : {aio * 1e6:6.2f} us/key  "
            f"(get_many is {aio / gm:.2f}x faster)"
        )
    for label, t in (("trivial batch function", thr), (f"{args.call_cost:.0f} us per call", slow)):
        print(
            f"{args.threads} threads x {args.per_thread} get(), {label}: "
            f"{t['gets_per_s']:,.0f} gets/s, {t['batches']:,} batches, "
            f"mean batch size {t['mean_batch_size']:.1f}, "
            f"coalescing rate {t['coalescing_rate']:.1%}"
        )
    if pkg is not None:
        print(
            f"  PyPI batched 0.1.5, same {args.threads} threads: {pkg:,.0f} gets/s "
            f"(Batcher {thr['gets_per_s'] / pkg:.2f}x; target >= 1.5x, mean batch >= 56)"
        )
    if aio is not None:
        print(f"  targets: load_many + result() {lm / aio:.2f}x aiodataloader (target <= 1x), "
              f"get_many {gm / fut:.2f}x bare Future (target <= 0.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
