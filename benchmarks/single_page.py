"""One thread, no added network: the batched page against the hand-written bulk page.

    python benchmarks/single_page.py [--rounds 5] [--pages 100] [--dsn DSN]

Serves the demo's page (50 customers, their orders, their items) with the batchsync
loaders and with the three hand-written bulk queries, in turn page by page (so that a slow
moment on a shared machine hits both), --pages times per round, and prints each round's
median page times and the ratio batched / bulk.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from psycopg_pool import ConnectionPool

from batchsync.demo import _server, _shop


def medians_ms(fns: list[Callable[[], Any]], pages: int) -> list[float]:
    """Run the fns in turn, page by page, so that noise hits them alike; median of each."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(pages):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pages", type=int, default=100)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--pool", type=int, default=4, help="connections in the pool")
    args = ap.parse_args()
    with _server.server(args.dsn) as admin, _server.scratch_database(admin) as dsn:
        _shop.create_shop(dsn)
        size, options = args.pool, {"autocommit": True}
        with ConnectionPool(dsn, min_size=size, max_size=size, kwargs=options) as pool:
            ids = _shop.page_ids(0)
            shop = _shop.BatchedShop(pool, window=0.002, max_concurrency=2)
            try:
                assert shop.page(ids) == _shop.bulk_page(pool, ids)
                modes = [lambda: _shop.bulk_page(pool, ids), lambda: shop.page(ids)]
                medians_ms(modes, 50)  # warm up: connections, prepared statements
                ratios = []
                for r in range(args.rounds):
                    bulk, batched = medians_ms(modes, args.pages)
                    ratios.append(batched / bulk)
                    print(
                        f"round {r + 1}: bulk {bulk:.2f} ms, batched {batched:.2f} ms, "
                        f"batched/bulk {batched / bulk:.2f}x"
                    )
                ratio = statistics.median(ratios)
                print(f"median batched/bulk over {args.rounds} rounds: {ratio:.2f}x")
            finally:
                shop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
