"""The load sweep: coalescing and latency as threads are added, batchsync against a fixed window.

One shared loader, T request threads. Each thread serves requests one after another, each
inside ``batchsync.scope()`` (as the Flask and Django integrations open one per request):
three sequential levels of ``get()`` of a random key, then a random think time (0-2 ms)
before its next request. The batch function sleeps 1 ms (a database round trip). Two
loaders are compared: ``Batcher(fn, max_concurrency=4)`` with every other option at its
default, and `FixedWindow`, the textbook design (keys wait in a dict, a timer sends them
when the window closes). ``benchmarks/load_sweep.py`` prints it; the demo's chart plots it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import batchsync
from batchsync import Batcher

__all__ = ["CALL", "LEVELS", "THINK", "WINDOW", "Counted", "FixedWindow", "pct", "run", "sweep"]

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
        time.sleep(CALL)  # the database round trip being simulated
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
        try:
            start.wait()
        except threading.BrokenBarrierError:  # the run was interrupted before it began
            return
        while not stop.is_set():
            began = time.perf_counter()
            with batchsync.scope():
                for _ in range(LEVELS):
                    get(rnd.randrange(1_000_000))
            mine.append(time.perf_counter() - began)
            time.sleep(rnd.uniform(0, THINK))  # the request's think time

    workers = [threading.Thread(target=serve, args=(lat,)) for lat in latencies]
    for w in workers:
        w.start()
    try:
        start.wait()
        began = time.perf_counter()
        stop.wait(seconds)  # the measured interval: the load runs for this long
    finally:  # also when a signal interrupts the wait: no request thread outlives the call
        stop.set()
        start.abort()  # releases threads still at the start line (harmless once all passed)
        for w in workers:
            w.join()
    return [x for lat in latencies for x in lat], time.perf_counter() - began


def pct(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (seconds), in ms."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def sweep(threads: Sequence[int], seconds: float) -> dict[str, list[dict[str, float]]]:
    """Run both designs at each T of `threads`; return their rows by design.

    A row: threads, calls_per_request, p50_ms, p99_ms, requests_per_s.
    """
    rows: dict[str, list[dict[str, float]]] = {"batchsync": [], "fixed window": []}
    for t in threads:
        for design, found in rows.items():
            fn = Counted()
            if design == "batchsync":
                b: Batcher[int, int] = Batcher(fn, window=WINDOW, max_concurrency=4)
                with b:
                    lat, elapsed = run(b.get, t, seconds)
            else:
                lat, elapsed = run(FixedWindow(fn, WINDOW).get, t, seconds)
            found.append(
                {
                    "threads": t,
                    "calls_per_request": fn.calls / len(lat),
                    "p50_ms": pct(lat, 0.5),
                    "p99_ms": pct(lat, 0.99),
                    "requests_per_s": len(lat) / elapsed,
                }
            )
    return rows
