"""The Flask-SQLAlchemy shop page three ways: lazy relationships, selectinload, batchsync.

examples/flask_sqlalchemy_shop.py runs under werkzeug's threaded server in a process of its
own on a scratch shop database; for each mode this prints the statements one page costs and
the statements per request under load (both counted by the server), and the requests/s and
p50/p99 latency of --clients threads GETting random pages for --seconds::

    python benchmarks/bench_sqlalchemy.py [--dsn DSN] [--seconds 3] [--clients 16]

Without --dsn or $BATCHSYNC_PG_DSN an embedded PostgreSQL (pgserver) is started.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import bench_web  # noqa: E402

from tests.webutil import DatabaseWatch, get, served_statements  # noqa: E402

APP = "flask_sqlalchemy"
MODES = ("naive", "selectin", "batched", "detached")
# The app in a child process, as bench_web runs the other example apps.
bench_web.APPS[APP] = (
    "werkzeug",
    "flask_sqlalchemy_shop:create_app",
    ROOT / "examples",
    "BATCHSYNC_PG_DSN",
)


def page_statements(watch: DatabaseWatch, dsn: str, mode: str, runs: int = 3) -> int:
    """Statements one page costs, served alone by a fresh app in this process.

    The least of `runs`: other sessions (autovacuum, statistics) can only add to the count.
    """
    import flask_sqlalchemy_shop as shop

    counts = []
    for _ in range(runs):
        app = shop.create_app(dsn)
        n, replies = served_statements(watch, app, [f"/page/3/{mode}"], shop.close_app,
                                       shop.warm_app)
        if replies[0].status != 200:
            raise RuntimeError(f"HTTP {replies[0].status}: {replies[0].body[:200]!r}")
        counts.append(n)
    return min(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dsn", help="PostgreSQL server (default: $BATCHSYNC_PG_DSN or embedded)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per mode (3)")
    parser.add_argument("--clients", type=int, default=16, help="client threads (16)")
    args = parser.parse_args()

    from psycopg.conninfo import conninfo_to_dict

    from batchsync.demo._server import scratch_database, server
    from batchsync.demo._shop import create_shop

    with server(args.dsn) as admin, scratch_database(admin, "batchsync_bench_sqla") as dsn:
        create_shop(dsn)
        dbname = str(conninfo_to_dict(dsn)["dbname"])
        print(
            f"# {platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, {args.clients} clients, {args.seconds:g} s per mode, "
            "statements counted by the server (pg_stat_database)"
        )
        print(
            f"{'mode':<9} {'stmts/page':>10} {'stmts/req':>10} {'req/s':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8}"
        )
        with DatabaseWatch(admin, dbname) as watch:
            for mode in MODES:
                per_page = page_statements(watch, dsn, mode)
                before = watch.settled_queries()
                with bench_web.app_server(APP, dsn, args.clients) as base:
                    url = base + "/page/{page}/" + mode
                    get(url.format(page=3))  # warm up (connections, imports): one page more
                    started = time.perf_counter()
                    rps, p50, p99 = bench_web.load(url, args.clients, args.seconds)
                    requests = rps * (time.perf_counter() - started)
                # Less the warm-up page; the engine's first connection adds a few more.
                statements = watch.settled_queries() - before - per_page
                print(
                    f"{mode:<9} {per_page:10d} {statements / requests:10.2f} {rps:8.1f} "
                    f"{p50:8.1f} {p99:8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
