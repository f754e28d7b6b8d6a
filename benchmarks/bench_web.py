"""Requests per second and p50/p99 latency of the example web apps, naive against batched.

Each app (examples/flask_shop.py under werkzeug's threaded server, examples/django_shop
under waitress with 16 threads) runs in its own process on a scratch shop database; 16
client threads in this process GET random shop pages (50 customers, their orders and
items) for --seconds per mode::

    python benchmarks/bench_web.py [--dsn DSN] [--seconds 5] [--clients 16]

Without --dsn or $BATCHSYNC_PG_DSN an embedded PostgreSQL (pgserver) is started.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchsync.demo._child import child_process  # noqa: E402
from tests.webutil import get, percentile_ms, run_clients  # noqa: E402

PAGES = 10

APPS = {
    # name: (server, app spec, extra sys.path entry, DSN variable)
    "flask": ("werkzeug", "flask_shop:create_app", ROOT / "examples", "BATCHSYNC_PG_DSN"),
    "django": (
        "waitress",
        "shopsite.wsgi:application",
        ROOT / "examples" / "django_shop",
        "DJANGO_SHOP_DSN",
    ),
}


@contextmanager
def app_server(name: str, dsn: str, threads: int) -> Iterator[str]:
    """Run one example app in a child process; yield its base URL."""
    server, spec, path, variable = APPS[name]
    env = dict(os.environ)
    env[variable] = dsn
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, str(ROOT / "tests" / "webutil.py"), spec, "--server", server,
        "--threads", str(threads),
    ]
    with child_process(command, env) as line:
        if not line.startswith("listening on "):
            raise RuntimeError(f"the {name} server did not start: {line!r}")
        yield f"http://127.0.0.1:{line.split()[-1]}"


def load(url: str, clients: int, seconds: float) -> tuple[float, float, float]:
    """GET random pages from `clients` threads for `seconds`; return (req/s, p50, p99 ms)."""
    latencies: list[float] = []

    def step(rng: random.Random) -> None:
        reply = get(url.format(page=rng.randrange(PAGES)))
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.body[:200]!r}")
        latencies.append(reply.seconds)

    elapsed = run_clients(clients, seconds, step)
    return len(latencies) / elapsed, percentile_ms(latencies, 0.5), percentile_ms(latencies, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dsn", help="PostgreSQL server (default: $BATCHSYNC_PG_DSN or embedded)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per mode (5)")
    parser.add_argument("--clients", type=int, default=16, help="client threads (16)")
    parser.add_argument("--apps", default="flask,django", help="which apps (flask,django)")
    args = parser.parse_args()

    from batchsync.demo._server import scratch_database, server
    from batchsync.demo._shop import create_shop

    with server(args.dsn) as admin, scratch_database(admin, "batchsync_bench_web") as dsn:
        create_shop(dsn)
        print(
            f"# {platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, {args.clients} clients, {args.seconds:g} s per mode"
        )
        print(f"{'app':<8} {'mode':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for name in args.apps.split(","):
            with app_server(name, dsn, args.clients) as base:
                for mode in ("naive", "batched"):
                    url = base + "/page/{page}/" + mode
                    get(url.format(page=0))  # warm up: connections, imports
                    rps, p50, p99 = load(url, args.clients, args.seconds)
                    print(f"{name:<8} {mode:<8} {rps:8.1f} {p50:8.1f} {p99:8.1f}", flush=True)


if __name__ == "__main__":
    main()
