"""What prepare=False costs: a pg.loader batch of 50 keys, unprepared against prepared.

On a private PostgreSQL cluster (Debian's postgresql-NN) with the demo's shop, direct
connection, one pooled connection; the modes alternate, best of 5 rounds of 300 batches::

    python benchmarks/bench_prepare.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psycopg_pool import ConnectionPool

from batchsync import pg
from batchsync.demo._server import local_cluster, scratch_database
from batchsync.demo._shop import create_shop

LOADERS = [
    ("customers", "SELECT id, name, email, city FROM customers WHERE id = ANY(%(keys)s)", "id"),
    (
        "orders",
        "SELECT id, customer_id, placed_on, status FROM orders"
        " WHERE customer_id = ANY(%(keys)s) ORDER BY id",
        "customer_id",
    ),
]


def per_batch_us(pool: ConnectionPool[Any], sql: str, key: str, prepare: bool) -> float:
    ids = list(range(1, 51))
    with pg.loader(pool, sql, key=key, many=key != "id", prepare=prepare) as loader:
        for _ in range(50):  # warm up (and prepare, with prepare=True)
            loader.get_many(ids)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(300):
                loader.get_many(ids)
            best = min(best, (time.perf_counter() - started) / 300 * 1e6)
    return best


def main() -> None:
    with local_cluster() as admin, scratch_database(admin, "batchsync_bench_prepare") as db:
        create_shop(db)
        kwargs = {"autocommit": True}
        with ConnectionPool(db, min_size=1, max_size=1, kwargs=kwargs, open=True) as pool:
            print(f"{'loader':<10} {'prepare=False':>14} {'prepare=True':>13} {'ratio':>6}")
            for name, sql, key in LOADERS:
                unprepared = min(per_batch_us(pool, sql, key, False) for _ in range(2))
                prepared = min(per_batch_us(pool, sql, key, True) for _ in range(2))
                print(
                    f"{name:<10} {unprepared:11.0f} us {prepared:10.0f} us"
                    f" {unprepared / prepared:6.2f}"
                )


if __name__ == "__main__":
    main()
