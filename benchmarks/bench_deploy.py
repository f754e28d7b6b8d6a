"""The Flask example deployed: gunicorn --preload through PgBouncer, naive against batched.

gunicorn (``--preload -w 4 --threads 8``, each worker opening its own pool of 8) serves
examples/flask_shop.py through a private PgBouncer in transaction mode (20 server
connections) in front of a private PostgreSQL cluster with pg_stat_statements. --clients
threads GET random shop pages for --seconds per mode; every body is checked against the
truth (the page served one at a time on a direct connection). Statements are counted by
pg_stat_statements, server connections sampled from pg_stat_activity::

    python benchmarks/bench_deploy.py [--seconds 10] [--clients 32] [--workers 4] [--threads 8]

Needs Debian's postgresql-NN and pgbouncer packages (the server and pooler it starts).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import psycopg  # noqa: E402

from batchsync.demo._measure import _STATEMENTS_SQL  # noqa: E402
from batchsync.demo._pgbouncer import pgbouncer  # noqa: E402
from batchsync.demo._server import local_cluster, scratch_database  # noqa: E402
from batchsync.demo._shop import CUSTOMERS, PAGE_SIZE, create_shop  # noqa: E402
from tests.webutil import get, percentile_ms, run_clients, serve_gunicorn  # noqa: E402

PAGES = CUSTOMERS // PAGE_SIZE
SERVER_CONNECTIONS = 20


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    wrong: int = 0
    errors: list[BaseException] = field(default_factory=list)
    elapsed: float = 0.0


def load(base: str, mode: str, truth: list[bytes], clients: int, seconds: float) -> Phase:
    """GET random pages from `clients` threads for `seconds`, every body against the truth."""
    phase, lock = Phase(), threading.Lock()

    def step(rng: random.Random) -> None:
        page = rng.randrange(PAGES)
        try:
            reply = get(f"{base}/page/{page}/{mode}", timeout=30)
        except OSError as exc:
            with lock:
                phase.errors.append(exc)
            return
        with lock:
            phase.latencies.append(reply.seconds)
            if reply.status != 200 or reply.body != truth[page]:
                phase.wrong += 1

    phase.elapsed = run_clients(clients, seconds, step)
    return phase


class Backends:
    """Samples the most server connections open on database `dbname` while it runs."""

    def __init__(self, admin: str, dbname: str) -> None:
        self._conn = psycopg.connect(admin, autocommit=True, application_name="bench_deploy")
        self._dbname = dbname
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND backend_type = 'client backend' AND application_name <> 'bench_deploy'"
        )
        while not self._stop.wait(0.05):
            row = self._conn.execute(sql, [self._dbname]).fetchone()
            self.peak = max(self.peak, int(row[0]) if row else 0)

    def __enter__(self) -> Backends:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def statements(conn: psycopg.Connection[object]) -> int:
    row = conn.execute(_STATEMENTS_SQL).fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per mode (10)")
    parser.add_argument("--clients", type=int, default=32, help="client threads (32)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (4)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (8)")
    args = parser.parse_args()

    import flask_shop

    with (
        local_cluster(preload=["pg_stat_statements"]) as admin,
        scratch_database(admin, "batchsync_bench_deploy") as direct,
    ):
        create_shop(direct)
        app = flask_shop.create_app(direct, pool_size=1)
        client = app.test_client()
        truth = [client.get(f"/page/{n}/naive").data for n in range(PAGES)]
        flask_shop.close_app(app)
        dbname = str(psycopg.conninfo.conninfo_to_dict(direct)["dbname"])
        with (
            pgbouncer(admin, pool_size=SERVER_CONNECTIONS) as pooled_admin,
            psycopg.connect(direct, autocommit=True, application_name="bench_deploy") as stats,
        ):
            stats.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            pooled = psycopg.conninfo.make_conninfo(pooled_admin, dbname=dbname)
            env = {
                "BATCHSYNC_PG_DSN": pooled,
                "SHOP_PREPARE_THRESHOLD": "none",
                "SHOP_POOL_SIZE": str(args.threads),
                "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT)]),
            }
            gunicorn_args = [
                "--preload", "-w", str(args.workers), "--threads", str(args.threads),
                "--backlog", "2048",
            ]
            with serve_gunicorn("flask_shop:create_app()", gunicorn_args, env, args.workers) as g:
                print(
                    f"# {platform.python_implementation()} {platform.python_version()},"
                    f" {os.cpu_count()} CPUs; gunicorn --preload -w {args.workers}"
                    f" --threads {args.threads} (a pool of {args.threads} per worker) ->"
                    f" PgBouncer transaction mode, {SERVER_CONNECTIONS} server connections ->"
                    f" PostgreSQL {stats.info.server_version // 10000};"
                    f" {args.clients} clients, {args.seconds:g} s per mode"
                )
                print(
                    f"{'mode':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'stmts/page':>10}"
                    f" {'server conns':>12} {'wrong':>6} {'errors':>6}"
                )
                rows = {}
                for mode in ("naive", "batched"):
                    for n in range(PAGES):  # warm up every worker's pool and imports
                        get(f"{g.base}/page/{n}/{mode}")
                    before = statements(stats)
                    with Backends(admin, dbname) as backends:
                        phase = load(g.base, mode, truth, args.clients, args.seconds)
                    counted = statements(stats) - before
                    n = len(phase.latencies)
                    rps = n / phase.elapsed
                    rows[mode] = (rps, percentile_ms(phase.latencies, 0.99))
                    print(
                        f"{mode:<8} {rps:8.1f} {percentile_ms(phase.latencies, 0.5):8.1f}"
                        f" {rows[mode][1]:8.1f} {counted / max(n, 1):10.2f}"
                        f" {backends.peak:>12} {phase.wrong:>6} {len(phase.errors):>6}",
                        flush=True,
                    )
                (naive_rps, naive_p99), (rps, p99) = rows["naive"], rows["batched"]
                print(
                    f"batched vs naive: {rps / naive_rps:.1f}x the requests/s,"
                    f" p99 {naive_p99 / p99:.1f}x lower"
                )


if __name__ == "__main__":
    main()
