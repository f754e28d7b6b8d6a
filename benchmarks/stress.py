"""Stress harness: many threads, random keys, a failing batch function, every answer checked.

    python benchmarks/stress.py [--threads 64] [--seconds 30] [--fail-rate 0.05]
    python benchmarks/stress.py --pg [--kill-every 0.5]       # the psycopg loader, real server

N threads load random keys for S seconds through one Batcher. Most loads are ``get`` (timed),
some ``get_many`` of five keys, some ``load`` whose futures are checked at the end. Without
``--pg`` the batch function is in memory and, at ``--fail-rate`` per call, fails in one of
the documented ways: it raises (every key of the call fails), fails some keys with per-key
exceptions, returns one item too many, or returns a set. With ``--pg`` the batch function
is ``batchsync.pg.loader`` against PostgreSQL (``$BATCHSYNC_PG_DSN`` or an embedded
pgserver) while a fault injector kills the backend of a running batch with
``pg_terminate_backend`` every ``--kill-every`` seconds on average.

Every value is checked against the truth and every error against the failure that caused it.
Prints loads, batches, mean batch size, coalescing rate, p50/p99 ``get`` latency, errors by
kind, unresolved futures and wrong values (both must be 0: the exit status is 1 otherwise),
peak RSS and peak thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from batchsync import Batcher, BatchError

TIMEOUT = 30.0  # a get that takes this long counts as a hang


class WholeBatchFailed(Exception):
    """Raised by the in-memory batch function for a whole call."""

    def __init__(self, keys: list[int]) -> None:
        super().__init__(f"batch of {len(keys)} keys failed")
        self.keys = frozenset(keys)


class KeyFailed(Exception):
    """A per-key failure, returned as that key's item."""

    def __init__(self, key: int) -> None:
        super().__init__(f"key {key} failed")
        self.key = key


def truth(key: int) -> int:
    return key * 7 + 1


class ChaosFn:
    """The in-memory batch function: right values, or at fail_rate one of four failures."""

    def __init__(self, fail_rate: float, seed: int) -> None:
        self.fail_rate = fail_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, keys: list[int]) -> Any:
        with self._lock:
            failing = self._rng.random() < self.fail_rate
            how = self._rng.randrange(4)
        if failing:
            if how == 0:
                raise WholeBatchFailed(keys)
            if how == 1:
                return [KeyFailed(k) if k % 2 else truth(k) for k in keys]
            if how == 2:
                return [truth(k) for k in keys] + [0]
            return {truth(k) for k in keys}
        return [truth(k) for k in keys]


def check_chaos(key: int, value: Any, error: BaseException | None) -> str | None:
    """Return the error kind for a right outcome; raise ValueError for a wrong one."""
    if error is None:
        if value != truth(key):
            raise ValueError(f"key {key}: got {value!r}, expected {truth(key)!r}")
        return None
    if isinstance(error, WholeBatchFailed):
        if key not in error.keys:
            raise ValueError(f"key {key}: got the failure of a batch without it")
        return "batch raised"
    if isinstance(error, KeyFailed):
        if error.key != key or key % 2 == 0:
            raise ValueError(f"key {key}: got the per-key failure of key {error.key}")
        return "per-key exception"
    if type(error) is BatchError:
        return "BatchError: wrong length" if "items for" in str(error) else "BatchError: type"
    if isinstance(error, TimeoutError):
        return "timeout"
    raise ValueError(f"key {key}: unexpected error {error!r}")


def check_row(key: int, value: Any, error: BaseException | None) -> str | None:
    """As check_chaos, for the pg loader's rows {"id": key, "v": truth(key)}."""
    if error is None:
        if value != {"id": key, "v": truth(key)}:
            raise ValueError(f"key {key}: got {value!r}")
        return None
    if isinstance(error, TimeoutError):
        return "timeout"
    import psycopg

    if isinstance(error, psycopg.Error):
        return f"psycopg.{type(error).__qualname__}"
    raise ValueError(f"key {key}: unexpected error {error!r}")


class Histogram:
    """Latencies in log buckets of about 2 % width, from 1 microsecond up."""

    SCALE = 50.0

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def add(self, seconds: float) -> None:
        self.counts[int(math.log(max(seconds, 1e-6) * 1e6) * self.SCALE)] += 1

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)

    def quantile(self, q: float) -> float:
        total = sum(self.counts.values())
        if not total:
            return math.nan
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= q * total:
                return math.exp((bucket + 0.5) / self.SCALE) / 1e6
        raise AssertionError("unreachable")


@dataclass
class Tally:
    """What one caller thread saw."""

    gets: int = 0
    loads: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    latency: Histogram = field(default_factory=Histogram)
    futures: list[tuple[int, Future[Any]]] = field(default_factory=list)

    def record(self, check: Callable[..., str | None], key: int, value: Any, error: Any) -> None:
        try:
            kind = check(key, value, error)
        except ValueError as exc:
            self.wrong.append(str(exc))
            return
        if kind is not None:
            self.errors[kind] += 1

    def record_any(self, check: Callable[..., str | None], keys: list[int], error: Any) -> None:
        """Record the error get_many raised: right if it is right for one of its keys."""
        for key in keys:
            try:
                kind = check(key, None, error)
            except ValueError:
                continue
            if kind is not None:
                self.errors[kind] += 1
            return
        self.wrong.append(f"keys {keys}: got {error!r}, which is none of theirs")


def caller(
    batcher: Batcher[int, Any],
    check: Callable[..., str | None],
    n_keys: int,
    seed: int,
    start: threading.Barrier,
    stop: threading.Event,
    tally: Tally,
) -> None:
    rng = random.Random(seed)
    start.wait()
    while not stop.is_set():
        r = rng.random()
        if r < 0.8:
            key = rng.randrange(n_keys)
            t0 = time.perf_counter()
            try:
                value, error = batcher.get(key, timeout=TIMEOUT), None
            except Exception as exc:
                value, error = None, exc
            tally.latency.add(time.perf_counter() - t0)
            tally.gets += 1
            tally.loads += 1
            tally.record(check, key, value, error)
        elif r < 0.9:
            keys = [rng.randrange(n_keys) for _ in range(5)]
            tally.loads += 5
            try:
                values = batcher.get_many(keys, timeout=TIMEOUT)
            except Exception as exc:
                tally.record_any(check, keys, exc)
                continue
            for key, value in zip(keys, values, strict=True):
                tally.record(check, key, value, None)
        else:
            key = rng.randrange(n_keys)
            tally.loads += 1
            tally.futures.append((key, batcher.load(key)))
            if len(tally.futures) >= 1000:
                settle(tally, check)


def settle(tally: Tally, check: Callable[..., str | None], timeout: float = 0.0) -> int:
    """Check the finished load() futures; keep the pending ones; return how many pend."""
    pending = []
    if timeout:
        wait([f for _, f in tally.futures], timeout=timeout)
    for key, fut in tally.futures:
        if not fut.done():
            pending.append((key, fut))
            continue
        error = fut.exception(0)
        tally.record(check, key, None if error else fut.result(0), error)
    tally.futures = pending
    return len(pending)


@contextmanager
def pg_batcher(
    n_keys: int, kill_every: float, options: dict[str, Any], kills: list[int]
) -> Iterator[Batcher[int, Any]]:
    """Yield a pg loader over a table of n_keys rows, with a backend killer running."""
    import psycopg
    from psycopg_pool import ConnectionPool

    from batchsync import pg
    from batchsync.demo import _server

    with ExitStack() as stack:
        admin = stack.enter_context(_server.server())
        dsn = stack.enter_context(_server.scratch_database(admin, "batchsync_stress"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
            conn.execute(
                "INSERT INTO items SELECT i, i * 7 + 1 FROM generate_series(0, %s) AS i",
                (n_keys - 1,),
            )
        size = options["max_concurrency"]
        pool: ConnectionPool[Any] = ConnectionPool(
            dsn, min_size=size, max_size=size, timeout=5.0, kwargs={"autocommit": True}
        )
        stack.callback(pool.close)
        pool.wait(30.0)
        loader = pg.loader(
            pool,
            "SELECT id, v /* stress-load */ FROM items WHERE id = ANY(%(keys)s)",
            key="id",
            name="stress-pg",
            **options,
        )
        stop = threading.Event()
        killer = threading.Thread(
            target=kill_backends, args=(dsn, kill_every, stop, kills), name="stress-killer"
        )
        if kill_every > 0:
            killer.start()
        try:
            with loader:
                yield loader
        finally:
            stop.set()
            if killer.is_alive():
                killer.join()


def kill_backends(dsn: str, every: float, stop: threading.Event, kills: list[int]) -> None:
    """Terminate a random backend running a loader query, every `every` s on average."""
    import psycopg

    rng = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.wait(rng.expovariate(1.0 / every)):
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND datname = current_database() AND query LIKE '%%stress-load%%'"
            ).fetchall()
            if rows:
                (pid,) = rng.choice(rows)
                if conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,):
                    kills[0] += 1


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--keys", type=int, default=10_000, help="keys are drawn from 0..N-1")
    parser.add_argument("--fail-rate", type=float, default=0.05, help="per batch call")
    parser.add_argument("--window", type=float, default=0.002)
    parser.add_argument("--max-batch-size", type=int, default=500)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--pg", action="store_true", help="the psycopg loader, real server")
    parser.add_argument("--kill-every", type=float, default=0.5, help="seconds; 0: no kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    # Thousands of batch failures are the point here: keep their ERROR records off stderr.
    logging.getLogger("batchsync").setLevel(logging.CRITICAL)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # "discarding closed connection"

    options: dict[str, Any] = {
        "window": args.window,
        "max_batch_size": args.max_batch_size,
        "max_concurrency": args.max_concurrency,
    }
    kills = [0]
    check: Callable[..., str | None]
    with ExitStack() as stack:
        if args.pg:
            batcher = stack.enter_context(pg_batcher(args.keys, args.kill_every, options, kills))
            check = check_row
        else:
            batcher = stack.enter_context(
                Batcher(ChaosFn(args.fail_rate, args.seed), name="stress", **options)
            )
            check = check_chaos
        tallies = [Tally() for _ in range(args.threads)]
        start = threading.Barrier(args.threads + 1)
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=caller,
                args=(batcher, check, args.keys, args.seed * 1000 + i, start, stop, tallies[i]),
                name=f"stress-{i}",
            )
            for i in range(args.threads)
        ]
        for t in threads:
            t.start()
        peak_threads = threading.active_count()
        start.wait()
        began = time.perf_counter()
        while not stop.wait(min(0.1, max(0.0, began + args.seconds - time.perf_counter()))):
            peak_threads = max(peak_threads, threading.active_count())
            if time.perf_counter() - began >= args.seconds:
                stop.set()
        stuck = 0
        for t in threads:
            t.join(TIMEOUT)
            stuck += t.is_alive()
        elapsed = time.perf_counter() - began
        unresolved = sum(settle(tally, check, timeout=TIMEOUT) for tally in tallies)
        stats = batcher.stats()
    threads_after = threading.active_count()

    latency = Histogram()
    errors: Counter[str] = Counter()
    wrong: list[str] = []
    for tally in tallies:
        latency.merge(tally.latency)
        errors.update(tally.errors)
        wrong.extend(tally.wrong)
    loads = sum(t.loads for t in tallies)
    figures: dict[str, Any] = {
        "mode": "pg loader" if args.pg else "in-memory",
        "threads": args.threads,
        "seconds": round(elapsed, 1),
        "loads": loads,
        "loads_per_second": round(loads / elapsed),
        "batches": stats.batches,
        "mean_batch_size": round(stats.mean_batch_size, 1),
        "coalescing_rate": round(stats.coalescing_rate, 3),
        "deduplicated": stats.deduplicated,
        "failed_batches": stats.failed_batches,
        "get_p50_ms": round(latency.quantile(0.5) * 1e3, 3),
        "get_p99_ms": round(latency.quantile(0.99) * 1e3, 3),
        "errors": dict(sorted(errors.items())),
        "backends_killed": kills[0] if args.pg else None,
        "unresolved_futures": unresolved,
        "stuck_threads": stuck,
        "wrong_values": len(wrong),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_threads": peak_threads,
        "threads_after_close": threads_after,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for name, value in figures.items():
            print(f"{name:22} {value}")
        for line in wrong[:10]:
            print("WRONG", line)
    return 1 if unresolved or stuck or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
