"""Measuring the page: queries counted by the server, single-page time, load phases."""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
from psycopg_pool import ConnectionPool

__all__ = ["CannotCount", "LoadResult", "QueryCounter", "load_phase", "single_page_ms"]


class CannotCount(RuntimeError):
    """The server's statistics cannot count the statements exactly here."""

_STATEMENTS_SQL = """
SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%pg_stat%'
"""

# A backend publishes its counters after a statement only when it has touched a
# relation, hence the one-row scan of pg_database.
_FLUSH_SQL = "SELECT pg_stat_force_next_flush() FROM pg_database LIMIT 1"

_XACT_SQL = """
SELECT pg_stat_force_next_flush(), xact_commit FROM pg_stat_database
WHERE datname = current_database()
"""


class QueryCounter:
    """Count the statements the server runs in one database, from its own statistics.

    With ``pg_stat_statements`` (when the server loads it) the count is the sum
    of its ``calls``. Without it, the count is the ``xact_commit`` delta of
    ``pg_stat_database``, which equals the statements run when every connection
    is in autocommit. A backend publishes its counters only from time to time,
    so before each reading every connection of the pool is made to publish them
    with ``pg_stat_force_next_flush()`` (PostgreSQL 15 and later), and those
    statements, one per connection plus the previous reading, are subtracted.

    With `pooled` (the pool goes through a transaction pooler such as PgBouncer),
    only ``pg_stat_statements`` counts right: the pool's connections are not the
    server's sessions, so the ``xact_commit`` flush cannot reach every session
    (it under-counts) and the pooler's own logins and checks add transactions
    (it over-counts). Raise CannotCount when the counts would be wrong.
    """

    def __init__(self, dsn: str, *, pooled: bool = False) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
        row = self._conn.execute("SHOW server_version").fetchone()
        self.server_version = str(row[0]).split()[0] if row else "?"
        self.source = "pg_stat_statements" if self._has_statements() else "xact_commit"
        if self.source == "xact_commit" and (pooled or self._conn.info.server_version < 150000):
            self._conn.close()
            if pooled:
                raise CannotCount(
                    "counting queries through a pooler needs pg_stat_statements on the server"
                    " (shared_preload_libraries = 'pg_stat_statements'): the xact_commit"
                    " count cannot be made exact through one"
                )
            raise CannotCount(
                "counting queries needs pg_stat_statements or PostgreSQL 15 or later"
            )
        # Publish what this connection has counted so far: from here on, each
        # reading adds exactly one transaction to the next.
        self._conn.execute(_XACT_SQL)

    def _has_statements(self) -> bool:
        try:
            self._conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self._conn.execute(_STATEMENTS_SQL)
        except psycopg.Error:
            return False
        return True

    @property
    def label(self) -> str:
        """Where the counts come from, for the report."""
        if self.source == "pg_stat_statements":
            return "pg_stat_statements.calls"
        return "pg_stat_database.xact_commit"

    def close(self) -> None:
        self._conn.close()

    def _read(self, pool: ConnectionPool[Any]) -> int:
        if self.source == "pg_stat_statements":
            row = self._conn.execute(_STATEMENTS_SQL).fetchone()
        else:
            conns = [pool.getconn(10.0) for _ in range(pool.max_size)]
            try:
                for conn in conns:
                    conn.execute(_FLUSH_SQL)
            finally:
                for conn in conns:
                    pool.putconn(conn)
            row = self._conn.execute(_XACT_SQL).fetchone()
        assert row is not None
        return int(row[-1])

    def _overhead(self, pool: ConnectionPool[Any]) -> int:
        return 0 if self.source == "pg_stat_statements" else pool.max_size + 1

    def count(self, pool: ConnectionPool[Any], work: Callable[[], object], tries: int = 5) -> int:
        """Return the statements `work()` runs, the least of `tries` runs.

        Other sessions (autovacuum) may commit in the database at the same
        time; they only ever add, so the least count is the true one.
        """
        counts = []
        for _ in range(tries):
            with self.counting(pool) as result:
                work()
            counts.append(result[0])
        return min(counts)

    @contextmanager
    def counting(self, pool: ConnectionPool[Any]) -> Iterator[list[int]]:
        """Yield a list that holds, after the block, the statements run in it.

        `pool` must have a fixed size (min_size == max_size): all its
        connections are borrowed around the block.
        """
        if pool.min_size != pool.max_size:
            raise ValueError("QueryCounter needs a pool with min_size == max_size")
        pool.wait(30.0)
        result: list[int] = []
        before = self._read(pool)
        yield result
        result.append(self._read(pool) - before - self._overhead(pool))


def single_page_ms(
    serves: dict[str, Callable[[], object]], budget: float = 3.0, rounds: int = 200
) -> dict[str, float]:
    """Return the median time in ms of each of `serves`, called in turn.

    The calls are interleaved, round after round and in a rotating order, so
    that a slow moment of the machine costs every mode alike; at least 5 rounds,
    then until `rounds` or `budget` seconds.
    """
    # Warm up: every mode's statements get prepared (psycopg prepares a statement on its
    # fifth run on a connection) and the pool's connections are all touched.
    for _ in range(10):
        for serve in serves.values():
            serve()
    times: dict[str, list[float]] = {name: [] for name in serves}
    deadline = time.perf_counter() + budget
    order = list(serves.items())
    for done in range(rounds):
        if done >= 5 and time.perf_counter() > deadline:
            break
        # Rotate the order each round: a page runs slower right after another mode's
        # (caches, the pool's connections), and no mode should always follow the same one.
        shift = done % len(order)
        for name, serve in order[shift:] + order[:shift]:
            start = time.perf_counter()
            serve()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@dataclass
class LoadResult:
    """What a load phase measured."""

    requests: int
    elapsed: float
    latencies: list[float]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return ordered[index] * 1000


def load_phase(
    serve: Callable[[list[int]], object],
    pages: Callable[[random.Random], list[int]],
    *,
    threads: int,
    seconds: float,
    label: str,
    progress: TextIO = sys.stderr,
) -> LoadResult:
    """Run `threads` threads that each serve pages for `seconds`; return what they measured.

    Each thread picks its pages with its own seeded Random. A progress line is
    written to `progress` while the phase runs, when `progress` is a terminal. An
    exception in a thread stops the phase and is raised here.
    """
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(threads + 1)
    deadline = [0.0]
    finished = [0.0] * threads

    def work(index: int) -> None:
        rng = random.Random(index)
        mine = latencies[index]
        start_line.wait()
        try:
            while time.perf_counter() < deadline[0] and not errors:
                ids = pages(rng)
                started = time.perf_counter()
                serve(ids)
                mine.append(time.perf_counter() - started)
        except BaseException as exc:
            errors.append(exc)
        finished[index] = time.perf_counter()

    workers = [
        threading.Thread(target=work, args=(i,), name=f"demo-{label}-{i}", daemon=True)
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    started = time.perf_counter()
    deadline[0] = started + seconds
    start_line.wait()
    # The meter rewrites one line with carriage returns: only a terminal shows it as such;
    # in a log or a pipe it would be noise.
    meter = _isatty(progress)
    try:
        while any(w.is_alive() for w in workers):
            if meter:
                done = sum(len(lat) for lat in latencies)
                elapsed = time.perf_counter() - started
                progress.write(
                    f"\r  {label:<8} {min(elapsed, seconds):5.1f}/{seconds:g} s  {done:7d} pages"
                )
                progress.flush()
            time.sleep(0.1)  # the meter's refresh; the workers end on their own deadline
    finally:
        # Also on the way out of an interrupt (SIGINT, SIGTERM): the workers stop at their
        # next page, before the caller's cleanup stops the server under them.
        deadline[0] = 0.0
        for worker in workers:
            worker.join()
        if meter:
            progress.write("\r" + " " * 60 + "\r")
            progress.flush()
    elapsed = max(finished) - started
    if errors:
        raise errors[0]
    flat = [t for lat in latencies for t in lat]
    return LoadResult(requests=len(flat), elapsed=elapsed, latencies=flat)
