"""The N+1 demo: one page served naive, batched and bulk, measured on a real PostgreSQL."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from . import _measure, _server, _shop, _signals, _sweep
from ._pgbouncer import NoPgBouncer
from ._pgbouncer import pgbouncer as pgbouncer_process
from ._plot import check_plot_path, plot
from ._proxy import proxy_process

__all__ = ["check_plot_path", "format_report", "main", "plot", "run"]

MODES = ("naive", "batched", "bulk")

# Loader settings of the batched mode. A caller that blocks in get_many sends
# the queue at once when no other request is running (the Batcher's dispatch
# rule), so a lone request never waits out the window; under load, concurrent
# requests' keys share a call.
WINDOW = 0.002
MAX_CONCURRENCY = 2
MAX_POOL = 32
# The load sweep plotted by --plot: threads, and seconds per design and thread count.
SWEEP_THREADS = (1, 4, 16, 64)
SWEEP_SECONDS = 0.4
# A round trip of a second already makes the naive page take minutes.
MAX_RTT_MS = 1000.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m batchsync.demo",
        description=(
            "Serve a page of 50 customers with their orders and order items three ways"
            " (naive N+1 loop, batchsync loaders, hand-written bulk queries) on a real"
            " PostgreSQL, and measure queries, latency and throughput."
        ),
    )
    parser.add_argument(
        "--dsn",
        help=f"server to use (default: ${_server.DSN_ENV}, else an embedded pgserver)",
    )
    parser.add_argument("--threads", type=int, default=32, help="load threads (default 32)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds of load per mode (default 3)"
    )
    parser.add_argument(
        "--rtt",
        type=float,
        default=0.0,
        metavar="MS",
        help="simulate a network: a TCP proxy adds MS milliseconds per round trip",
    )
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="serve through a private PgBouncer in transaction mode (Debian's pgbouncer);"
        " without --dsn the server is a private cluster with pg_stat_statements",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="save a chart of the figures")
    return parser


def _check_arguments(args: argparse.Namespace) -> str | None:
    """Return what is wrong with the command line (one line), or None: before any work."""
    if args.threads < 1:
        return "--threads must be >= 1"
    if not math.isfinite(args.seconds) or args.seconds <= 0:
        return f"--seconds must be a finite number > 0, not {args.seconds:g}"
    if not math.isfinite(args.rtt) or not 0 <= args.rtt <= MAX_RTT_MS:
        return f"--rtt must be a number of milliseconds from 0 to {MAX_RTT_MS:g}, not {args.rtt:g}"
    if args.dsn is not None:
        wrong = _server.check_dsn(args.dsn)
        if wrong:
            return f"--dsn is {wrong}"
    elif os.environ.get(_server.DSN_ENV):
        wrong = _server.check_dsn(os.environ[_server.DSN_ENV])
        if wrong:
            return f"${_server.DSN_ENV} is {wrong}"
    if args.plot is not None:
        return check_plot_path(args.plot)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo with command-line arguments `argv`; return the exit status.

    Bad arguments (and a --plot the run could not save) end it before any work with one
    line and status 2; SIGTERM and SIGINT stop whatever it started (servers, pooler,
    proxy) and end it with 128 + the signal, without a traceback.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    wrong = _check_arguments(args)
    if wrong:  # one line, as argparse's own errors end, without the usage above it
        parser.exit(2, f"{parser.prog}: error: {wrong}\n")
    try:
        with _signals.stop_on_signals():
            report = run(
                dsn=args.dsn,
                threads=args.threads,
                seconds=args.seconds,
                rtt_ms=args.rtt,
                pgbouncer=args.pgbouncer,
            )
    except _signals.Stopped as exc:
        print(f"batchsync demo: {exc}; everything it started is stopped", file=sys.stderr)
        return exc.exit_code
    except (_server.NoServer, NoPgBouncer, _measure.CannotCount) as exc:
        print(f"batchsync demo: {_server.one_line(exc)}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"batchsync demo: cannot use the database: {_server.one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(report))
    if args.plot:
        try:
            with _signals.stop_on_signals():
                # The chart's load-sweep panels: the dispatch rule against a fixed window,
                # on an in-memory batch function (no database), a few seconds in all.
                report["sweep"] = _sweep.sweep(SWEEP_THREADS, SWEEP_SECONDS)
        except _signals.Stopped as exc:
            print(f"batchsync demo: {exc}; no chart saved", file=sys.stderr)
            return exc.exit_code
        plot(report, args.plot)
        print(f"chart saved to {args.plot}", file=sys.stderr)
    return 0


@contextmanager
def _shop_database(
    dsn: str | None, rtt_ms: float, pgbouncer: bool = False
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (DSN to use, DSN for statistics, facts) of a freshly filled shop database.

    facts["pooler"] describes the pooler the DSN to use goes through, or is None.
    """
    with ExitStack() as stack:
        given = dsn or os.environ.get(_server.DSN_ENV)
        if given:
            given = _server.with_connect_timeout(given)
            _server.check_admin(given)
        if pgbouncer and not given:
            # Exact counts through a pooler need pg_stat_statements, which pgserver lacks.
            admin = stack.enter_context(_server.local_cluster(preload=["pg_stat_statements"]))
            label = "private cluster with pg_stat_statements"
        else:
            label = "given DSN" if given else _server.embedded_kind()
            admin = stack.enter_context(_server.server(given))
        db = stack.enter_context(_server.scratch_database(admin, "batchsync_demo"))
        counts = _shop.create_shop(db)
        facts: dict[str, Any] = {"server": label}
        facts.update(counts)
        use = db
        if pgbouncer:
            use = stack.enter_context(pgbouncer_process(db, pool_size=MAX_POOL))
            facts["pooler"] = "PgBouncer in transaction mode, started by the demo"
        else:
            facts["pooler"] = _server.intermediary(db)
        if rtt_ms > 0:
            port = stack.enter_context(proxy_process(_server.proxy_target(use), rtt_ms))
            use = _server.proxied_dsn(use, port)
        yield use, db, facts


def run(
    *,
    dsn: str | None = None,
    threads: int = 32,
    seconds: float = 3.0,
    rtt_ms: float = 0.0,
    pgbouncer: bool = False,
) -> dict[str, Any]:
    """Run the three modes and return the report (what --json prints)."""


    pool_size = min(max(threads, 4), MAX_POOL)
    report: dict[str, Any] = {
        "settings": {
            "threads": threads,
            "seconds": seconds,
            "rtt_ms": rtt_ms,
            "rtt_simulated": rtt_ms > 0,
            "page_size": _shop.PAGE_SIZE,
            "pool_size": pool_size,
            "window_s": WINDOW,
            "max_concurrency": MAX_CONCURRENCY,
        },
        "modes": {},
    }
    with _shop_database(dsn, rtt_ms, pgbouncer) as (use, stats_dsn, facts):
        pooler = facts.pop("pooler")
        report["settings"]["pooler"] = pooler
        counter = _measure.QueryCounter(stats_dsn, pooled=pooler is not None)
        report["settings"]["query_count_source"] = counter.label
        report["settings"]["server_version"] = counter.server_version
        report["shop"] = facts
        # Through a pooler, psycopg's own prepared statements would reach other server
        # sessions (PgBouncer before 1.21): the naive and bulk modes run unprepared there.
        kwargs: dict[str, Any] = {"autocommit": True}
        if pooler is not None:
            kwargs["prepare_threshold"] = None
        try:
            pool: ConnectionPool[Any] = ConnectionPool(
                use,
                min_size=pool_size,
                max_size=pool_size,
                kwargs=kwargs,
                open=True,
                name="demo",
            )
            with pool, ExitStack() as serving:
                pool.wait(30.0)
                with pool.connection() as conn:
                    report["settings"]["round_trip_ms"] = round(_round_trip_ms(conn), 3)
                serves = {mode: serving.enter_context(_serving(mode, pool)) for mode in MODES}
                ids = _shop.page_ids(0)
                pages = [serve(ids) for serve in serves.values()]
                report["identical_pages"] = all(p == pages[0] for p in pages)
                single = _measure.single_page_ms(
                    {mode: partial(serve, ids) for mode, serve in serves.items()}
                )
                for mode, serve in serves.items():
                    figures = {
                        "queries_per_page": counter.count(pool, partial(serve, ids)),
                        "single_page_ms": round(single[mode], 3),
                    }
                    figures.update(_load(mode, serve, pool, counter, threads, seconds))
                    report["modes"][mode] = figures
        finally:
            counter.close()
    return report


def _round_trip_ms(conn: psycopg.Connection[Any]) -> float:
    """Return the median time of ``SELECT 1`` on `conn`, in ms."""
    times = []
    for _ in range(30):
        started = time.perf_counter()
        conn.execute("SELECT 1")
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


@contextmanager
def _serving(mode: str, pool: ConnectionPool[Any]) -> Iterator[Callable[[list[int]], Any]]:
    if mode == "naive":
        yield lambda ids: _shop.naive_page(pool, ids)
    elif mode == "bulk":
        yield lambda ids: _shop.bulk_page(pool, ids)
    else:
        shop = _shop.BatchedShop(pool, window=WINDOW, max_concurrency=MAX_CONCURRENCY)
        try:
            yield shop.page
        finally:
            shop.close()


def _load(
    mode: str,
    serve: Callable[[list[int]], Any],
    pool: ConnectionPool[Any],
    counter: _measure.QueryCounter,
    threads: int,
    seconds: float,
) -> dict[str, Any]:
    n_pages = _shop.CUSTOMERS // _shop.PAGE_SIZE

    def pick(rng: random.Random) -> list[int]:
        return _shop.page_ids(rng.randrange(n_pages))

    with counter.counting(pool) as queries:
        result = _measure.load_phase(serve, pick, threads=threads, seconds=seconds, label=mode)
    return {
        "requests": result.requests,
        "requests_per_s": round(result.requests_per_s, 1),
        "queries_per_s": round(queries[0] / result.elapsed, 1),
        "queries_per_request_under_load": round(queries[0] / max(result.requests, 1), 2),
        "p50_ms": round(result.percentile_ms(0.50), 3),
        "p99_ms": round(result.percentile_ms(0.99), 3),
    }


def format_report(report: dict[str, Any]) -> str:
    """Return the report as the human-readable tables the demo prints."""
    s, shop, modes = report["settings"], report["shop"], report["modes"]
    lines = [
        f"batchsync N+1 demo: a page of {s['page_size']} customers with their orders and items",
        f"shop: {shop['customers']} customers, {shop['orders']} orders,"
        f" {shop['order_items']} order items; PostgreSQL {s['server_version']}"
        f" ({shop['server']})",
    ]
    pooler = s.get("pooler")
    if s["rtt_simulated"]:
        lines.append(
            f"network: SIMULATED, a TCP proxy process on 127.0.0.1 adds {s['rtt_ms']:g} ms"
            " per round trip" + (f"; then through {pooler}" if pooler else "")
        )
    elif pooler:
        lines.append(f"network: no delay added; through {pooler}")
    else:
        lines.append("network: none added (direct connection)")
    lines += [
        f"queries counted by the server ({s['query_count_source']}),"
        f" batched loaders: window {s['window_s'] * 1000:g} ms,"
        f" max_concurrency {s['max_concurrency']}; pool of {s['pool_size']} connections",
        "",
        "one page, one thread",
        f"  {'mode':<8} {'queries/page':>12} {'time/page':>12}",
    ]
    for mode in MODES:
        m = modes[mode]
        lines.append(f"  {mode:<8} {m['queries_per_page']:>12} {m['single_page_ms']:>9.2f} ms")
    lines += [
        "",
        f"under load: {s['threads']} threads, {s['seconds']:g} s per mode",
        f"  {'mode':<8} {'requests/s':>11} {'queries/s':>10} {'queries/req':>12}"
        f" {'p50 ms':>9} {'p99 ms':>9}",
    ]
    for mode in MODES:
        m = modes[mode]
        lines.append(
            f"  {mode:<8} {m['requests_per_s']:>11.1f} {m['queries_per_s']:>10.0f}"
            f" {m['queries_per_request_under_load']:>12.2f}"
            f" {m['p50_ms']:>9.2f} {m['p99_ms']:>9.2f}"
        )
    naive, batched, bulk = (modes[m] for m in MODES)
    fewer = 1 - batched["queries_per_page"] / max(naive["queries_per_page"], 1)
    lines += [
        "",
        f"batched vs naive: {fewer:.0%} fewer queries per page,"
        f" {_ratio(batched['requests_per_s'], naive['requests_per_s'])} the requests/s,"
        f" p99 {_ratio(naive['p99_ms'], batched['p99_ms'])} lower",
        f"batched vs bulk: {_ratio(batched['requests_per_s'], bulk['requests_per_s'])}"
        f" the requests/s, {_ratio(batched['single_page_ms'], bulk['single_page_ms'])}"
        " the single-page time",
        f"the three modes returned {'identical' if report['identical_pages'] else 'DIFFERENT'}"
        " page data",
        "",
    ]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"
