"""The demo's shop page as a Flask app, served naive (N+1 queries) and batched (3 queries).

Run it (from a checkout: ``pip install -e ".[examples]"``)::

    python examples/flask_shop.py
    curl localhost:8000/page/0/naive
    curl localhost:8000/page/0/batched

Without a DSN it starts a private PostgreSQL with a fresh shop, as the demo does, and stops
it on exit (Ctrl-C or SIGTERM). With ``--dsn`` (or $BATCHSYNC_PG_DSN) it serves that
database; ``--create`` fills the demo's shop tables there unless they are there already.

or with Flask's own server: ``BATCHSYNC_PG_DSN=... flask --app examples/flask_shop run``,
or under gunicorn, forked workers and all (see the README, "Deploying with gunicorn")::

    BATCHSYNC_PG_DSN=postgresql://app@127.0.0.1:6432/shop SHOP_PREPARE_THRESHOLD=none \
        gunicorn --preload -w 4 --threads 8 --chdir examples 'flask_shop:create_app()'

The pool is opened in the process that serves, at its first request, never at import: with
``--preload`` the app is built in gunicorn's master and each worker is a fork of it, and a
pool opened before the fork would give every worker the same connections. Pool settings
come from the environment (or --pool-size and --prepare-threshold): ``SHOP_POOL_SIZE``
(default 8) and ``SHOP_PREPARE_THRESHOLD`` (psycopg's default 5; ``none`` behind a
transaction-pooling PgBouncer, where the naive view's prepared statements would reach other
server sessions; the loaders never prepare unless asked).

A page shows 50 customers, their orders and the orders' items. The batched view asks a
loader for a whole level at a time; the loaders are shared by every request thread, so
pages served at the same moment share their queries too.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from typing import Any

from flask import Flask, Response, abort
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from batchsync import pg
from batchsync.demo._examples import serve_example
from batchsync.flask import BatchSync

PAGE_SIZE = 50

CUSTOMERS_SQL = "SELECT id, name, email, city FROM customers WHERE id = ANY(%(keys)s)"
ORDERS_SQL = (
    "SELECT id, customer_id, placed_on, status FROM orders"
    " WHERE customer_id = ANY(%(keys)s) ORDER BY id"
)
ITEMS_SQL = (
    "SELECT id, order_id, product, quantity, price_cents FROM order_items"
    " WHERE order_id = ANY(%(keys)s) ORDER BY id"
)
# The naive view's one-key queries.
ORDERS_OF_SQL = (
    "SELECT id, customer_id, placed_on, status FROM orders WHERE customer_id = %s ORDER BY id"
)
ITEMS_OF_SQL = (
    "SELECT id, order_id, product, quantity, price_cents FROM order_items"
    " WHERE order_id = %s ORDER BY id"
)


def page_ids(number: int) -> list[int]:
    """The customer ids on page `number`: 50 consecutive ids."""
    start = number * PAGE_SIZE
    return list(range(start + 1, start + PAGE_SIZE + 1))


def to_json(page: list[dict[str, Any]]) -> Response:
    """The page as JSON, dates as ISO strings (the Django example sends the same bytes)."""
    return Response(json.dumps(page, default=str), mimetype="application/json")


def pool_settings() -> tuple[int, int | None]:
    """(pool size, prepare_threshold) from $SHOP_POOL_SIZE and $SHOP_PREPARE_THRESHOLD."""
    size = int(os.environ.get("SHOP_POOL_SIZE") or 8)
    threshold = os.environ.get("SHOP_PREPARE_THRESHOLD") or "5"
    return size, None if threshold.lower() == "none" else int(threshold)


def create_app(dsn: str | None = None, *, pool_size: int | None = None) -> Flask:
    """Build the app on the database of `dsn` (default: $BATCHSYNC_PG_DSN).

    The pool's settings come from pool_settings() (`pool_size` wins). It opens in the
    process that serves the first request (fork-safe: see the module docstring).
    """
    dsn = dsn or os.environ.get("BATCHSYNC_PG_DSN")
    if not dsn:
        raise RuntimeError("give a DSN: --dsn or $BATCHSYNC_PG_DSN")
    env_size, env_threshold = pool_settings()
    size = pool_size or env_size
    app = Flask(__name__)
    pool: ConnectionPool[Any] = ConnectionPool(
        dsn,
        min_size=size,
        max_size=size,
        kwargs={
            "autocommit": True,
            "application_name": "flask_shop",
            "prepare_threshold": env_threshold,
        },
        open=False,
        name="flask_shop",
    )
    app.extensions["shop_pool"] = pool

    opening = threading.Lock()

    @app.before_request
    def open_pool_in_this_process() -> None:
        if pool.closed:  # the first requests of this process
            # One opens it and waits for its connections; the others wait for that, rather
            # than use a pool that another thread is still opening.
            with opening:
                if pool.closed:
                    pool.open(wait=True, timeout=30.0)

    batch = BatchSync(app)
    # cache="scope": a key loaded twice in one request is fetched once; nothing is kept
    # after the request. A request waiting in get_many sends its keys at once when no other
    # request runs; otherwise it waits up to the window for theirs to join the query.
    options: dict[str, Any] = {"cache": "scope", "window": 0.002, "max_concurrency": 2}
    customers = batch.register(pg.loader(pool, CUSTOMERS_SQL, key="id", **options))
    orders = batch.register(pg.loader(pool, ORDERS_SQL, key="customer_id", many=True, **options))
    items = batch.register(pg.loader(pool, ITEMS_SQL, key="order_id", many=True, **options))

    @app.get("/page/<int:number>/batched")
    def page_batched(number: int) -> Response:
        ids = page_ids(number)
        found = customers.get_many(ids)  # one query for the 50 customers
        by_customer = orders.get_many(ids)  # one for all their orders
        order_ids = [o["id"] for its_orders in by_customer for o in its_orders or []]
        by_order = dict(zip(order_ids, items.get_many(order_ids), strict=True))  # one more
        page = []
        for c, its_orders in zip(found, by_customer, strict=True):
            if c is not None:
                its = [{**o, "items": by_order[o["id"]]} for o in its_orders or []]
                page.append({**c, "orders": its})
        return to_json(page)

    @app.get("/page/<int:number>/naive")
    def page_naive(number: int) -> Response:
        page = []
        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(CUSTOMERS_SQL, {"keys": page_ids(number)})
            found = {c["id"]: c for c in cur.fetchall()}
            for cid in page_ids(number):
                if cid not in found:
                    continue
                cur.execute(ORDERS_OF_SQL, (cid,))
                its_orders = cur.fetchall()
                for o in its_orders:
                    cur.execute(ITEMS_OF_SQL, (o["id"],))
                    o["items"] = cur.fetchall()
                page.append({**found[cid], "orders": its_orders})
        return to_json(page)

    @app.get("/customers/<int:cid>")
    def customer(cid: int) -> Response:
        found = customers.get(cid)
        if found is None:
            abort(404)
        return to_json([found])

    return app


def close_app(app: Flask) -> None:
    """Close the app's loaders, then its pool."""
    app.extensions["batchsync"].close()
    app.extensions["shop_pool"].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--dsn", help="PostgreSQL DSN (default: $BATCHSYNC_PG_DSN, else a private server)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--create", action="store_true", help="create the demo's shop tables unless they exist"
    )
    parser.add_argument("--pool-size", type=int, help="connections (default $SHOP_POOL_SIZE or 8)")
    parser.add_argument(
        "--prepare-threshold",
        help="psycopg's prepare_threshold for the naive view: a number, or none behind"
        " PgBouncer (default $SHOP_PREPARE_THRESHOLD or 5)",
    )
    args = parser.parse_args()
    if args.pool_size is not None:
        os.environ["SHOP_POOL_SIZE"] = str(args.pool_size)
    if args.prepare_threshold is not None:
        os.environ["SHOP_PREPARE_THRESHOLD"] = args.prepare_threshold
    serve_example("flask_shop", args.dsn, args.create, args.port, create_app, close_app)


if __name__ == "__main__":
    main()
