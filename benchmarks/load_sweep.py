"""Coalescing and latency as load grows: batchsync's default against a fixed window.

    python benchmarks/load_sweep.py [--threads 1,2,4,8,16,32,64] [--seconds 1.5]

One shared loader, T request threads. Each thread serves requests one after another, each
inside ``batchsync.scope()`` (as the Flask and Django integrations open one per request):
three sequential levels of ``get()`` of a random key, then a random think time (0-2 ms)
before its next request. The batch function sleeps 1 ms (a database round trip).

Two loaders are compared, in the same run:
  * batchsync: ``Batcher(fn, max_concurrency=4)``, every other option at its default
    (window 5 ms);
  * fixed window: the textbook design written below: keys wait in a dict and a timer sends
    them when the window (5 ms) closes.

For each T it prints batch calls per request, p50 and p99 request latency and requests/s,
then the targets: at T=1, batchsync's p50 within 1.2x of three bare batch-function calls;
at T >= 8, batch calls per request at most 1.1x the fixed window's and p50 no higher.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import batchsync
from batchsync import Batcher

WINDOW = 0.005
CALL = 0.001
LEVELS = 3
THINK = 0.002


class Counted:
    """The batch function: sleeps CALL seconds per call and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, keys: list[int]) -> list[int]:
        with self.lock:
            self.calls += 1
        time.sleep(CALL)
        return keys


class FixedWindow:
    """The textbook batcher: keys wait in a dict; a timer sends them when the window closes."""

    def __init__(self, fn: Callable[[list[int]], list[int]], window: float) -> None:
        self.fn = fn
        self.window = window
        self.lock = threading.Lock()
        self.pending: dict[int, list[Any]] = {}
        self.timer: threading.Timer | None = None

    def get(self, key: int) -> int:
        done = threading.Event()
        slot: list[Any] = [done, None]
        with self.lock:
            self.pending.setdefault(key, []).append(slot)
            if self.timer is None:
                self.timer = threading.Timer(self.window, self._send)
                self.timer.daemon = True
                self.timer.start()
        done.wait()
        return slot[1]  # type: ignore[no-any-return]

    def _send(self) -> None:
        with self.lock:
            pending, self.pending, self.timer = self.pending, {}, None
        keys = list(pending)
        for key, value in zip(keys, self.fn(keys), strict=True):
            for slot in pending[key]:
                slot[1] = value
                slot[0].set()


def run(get: Callable[[int], Any], threads: int, seconds: float) -> tuple[list[float], float]:
    """Serve requests from `threads` threads for `seconds`; return latencies and elapsed."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def serve(mine: list[float]) -> None:
        rnd = random.Random()
        start.wait()
        while not stop.is_set():
            began = time.perf_counter()
            with batchsync.scope():
                for _ in range(LEVELS):
                    get(rnd.randrange(1_000_000))
            mine.append(time.perf_counter() - began)
            time.sleep(rnd.uniform(0, THINK))

    workers = [threading.Thread(target=serve, args=(lat,)) for lat in latencies]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)  # the measured interval: the load runs for this long
    stop.set()
    for w in workers:
        w.join()
    return [x for lat in latencies for x in lat], time.perf_counter() - began


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=1.5, help="per design and T")
    args = parser.parse_args(argv)
    sweep = [int(t) for t in args.threads.split(",")]

    bare_fn = Counted()
    bare = []
    for _ in range(200):
        began = time.perf_counter()
        for _ in range(LEVELS):
            bare_fn([1])
        bare.append(time.perf_counter() - began)
    bare_p50 = statistics.median(bare) * 1000

    print(f"Python {sys.version.split()[0]}, {LEVELS} levels of get() per request, batch function "
          f"{CALL * 1000:.0f} ms, window {WINDOW * 1000:.0f} ms, think 0-{THINK * 1000:.0f} ms, "
          f"{args.seconds} s per row")
    print(f"three bare batch-function calls: p50 {bare_p50:.2f} ms")
    print(f"{'T':>3} {'loader':<12} {'calls/req':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    results: dict[tuple[int, str], tuple[float, float]] = {}
    for t in sweep:
        for design in ("batchsync", "fixed"):
            fn = Counted()
            if design == "batchsync":
                b: Batcher[int, int] = Batcher(fn, window=WINDOW, max_concurrency=4)
                with b:
                    lat, elapsed = run(b.get, t, args.seconds)
            else:
                lat, elapsed = run(FixedWindow(fn, WINDOW).get, t, args.seconds)
            per_req = fn.calls / len(lat)
            p50 = pct(lat, 0.5)
            results[(t, design)] = (per_req, p50)
            print(f"{t:>3} {design:<12} {per_req:>9.2f} {p50:>8.2f} {pct(lat, 0.99):>8.2f} "
                  f"{len(lat) / elapsed:>8.0f}")
    print("targets:")
    ok = True
    if (1, "batchsync") in results:
        ratio = results[(1, "batchsync")][1] / bare_p50
        ok &= ratio <= 1.2
        print(f"  T=1: p50 {ratio:.2f}x three bare calls (target <= 1.2x)")
    for t in sweep:
        if t < 8:
            continue
        (c_b, p_b), (c_f, p_f) = results[(t, "batchsync")], results[(t, "fixed")]
        ok &= c_b <= 1.1 * c_f and p_b <= p_f
        print(f"  T={t}: calls/request {c_b / c_f:.2f}x fixed window (target <= 1.1x), "
              f"p50 {p_b / p_f:.2f}x (target <= 1x)")
    print("all targets met" if ok else "some targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
