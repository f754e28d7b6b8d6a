"""The demo's shop: its schema, its generated rows, and one page served three ways.

The page shows 50 customers, each with their orders, each with its items.
`naive_page` runs the N+1 loop (one query for the customers, one per
customer for its orders, one per order for its items), `BatchedShop.page`
asks batchsync loaders for whole levels with `get_many`, and `bulk_page` is
the three ``= ANY`` queries a careful person writes by hand. All three return
the same data: a list of customer dicts, each with an ``orders`` list of
order dicts, each with an ``items`` list.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from batchsync import Batcher, pg

__all__ = [
    "PAGE_SIZE",
    "BatchedShop",
    "Page",
    "bulk_page",
    "create_shop",
    "ensure_shop",
    "naive_page",
    "page_ids",
]

PAGE_SIZE = 50
CUSTOMERS = 500
SEED = 20240601

Page = list[dict[str, Any]]

_SCHEMA = """
CREATE TABLE customers (
    id int PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    city text NOT NULL
);
CREATE TABLE orders (
    id int PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers,
    placed_on date NOT NULL,
    status text NOT NULL
);
CREATE INDEX orders_customer_id ON orders (customer_id);
CREATE TABLE order_items (
    id int PRIMARY KEY,
    order_id int NOT NULL REFERENCES orders,
    product text NOT NULL,
    quantity int NOT NULL,
    price_cents int NOT NULL
);
CREATE INDEX order_items_order_id ON order_items (order_id);
"""

CUSTOMERS_SQL = "SELECT id, name, email, city FROM customers WHERE id = ANY(%(keys)s)"
ORDERS_SQL = (
    "SELECT id, customer_id, placed_on, status FROM orders"
    " WHERE customer_id = ANY(%(keys)s) ORDER BY id"
)
ITEMS_SQL = (
    "SELECT id, order_id, product, quantity, price_cents FROM order_items"
    " WHERE order_id = ANY(%(keys)s) ORDER BY id"
)

_CITIES = ["Lisbon", "Oslo", "Kyoto", "Lima", "Accra", "Perth", "Quebec", "Turin"]
_PRODUCTS = ["mug", "lamp", "chair", "kettle", "rug", "clock", "vase", "shelf", "desk"]
_STATUSES = ["placed", "paid", "shipped", "delivered", "returned"]


def create_shop(dsn: str, customers: int = CUSTOMERS, seed: int = SEED) -> dict[str, int]:
    """Create the schema in the database of `dsn` and fill it; return the row counts.

    The rows come from `seed`: the same seed gives the same shop.
    """
    rng = random.Random(seed)
    counts = {"customers": 0, "orders": 0, "order_items": 0}
    first_day = date(2023, 1, 1)
    with psycopg.connect(dsn) as conn:
        conn.execute(_SCHEMA)
        with conn.cursor() as cur:
            with cur.copy("COPY customers (id, name, email, city) FROM STDIN") as copy:
                for cid in range(1, customers + 1):
                    copy.write_row(
                        (cid, f"Customer {cid}", f"c{cid}@example.com", rng.choice(_CITIES))
                    )
            counts["customers"] = customers
            orders: list[int] = []
            with cur.copy("COPY orders (id, customer_id, placed_on, status) FROM STDIN") as copy:
                for cid in range(1, customers + 1):
                    for _ in range(rng.randint(0, 6)):
                        oid = len(orders) + 1
                        orders.append(oid)
                        placed = first_day + timedelta(days=rng.randrange(365))
                        copy.write_row((oid, cid, placed, rng.choice(_STATUSES)))
            counts["orders"] = len(orders)
            items = "COPY order_items (id, order_id, product, quantity, price_cents) FROM STDIN"
            with cur.copy(items) as copy:
                item = 0
                for oid in orders:
                    for _ in range(rng.randint(1, 4)):
                        item += 1
                        price = rng.randrange(100, 20000)
                        copy.write_row((item, oid, rng.choice(_PRODUCTS), rng.randint(1, 5), price))
            counts["order_items"] = item
        conn.commit()
        # VACUUM as well as ANALYZE, so that autovacuum finds nothing to do on the new
        # tables while the demo runs: its transactions would add to the server's counts.
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return counts


def ensure_shop(dsn: str) -> tuple[dict[str, int], bool]:
    """Create and fill the shop in the database of `dsn` unless it is there already.

    Return (row counts, created). A database that already has the shop's ``customers``
    table is left as it is (so ``--create`` may be given on every start); one that has only
    some of the shop's tables is refused with ValueError rather than half overwritten.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT to_regclass('customers') IS NOT NULL, to_regclass('orders') IS NOT NULL,"
            " to_regclass('order_items') IS NOT NULL"
        ).fetchone()
        present = list(row) if row else [False, False, False]
        if all(present):
            counts = {}
            for table in ("customers", "orders", "order_items"):
                found = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                counts[table] = int(found[0]) if found else 0
            return counts, False
    if any(present):
        raise ValueError(
            "the database has some of the shop's tables (customers, orders, order_items)"
            " but not all: drop them or use another database"
        )
    return create_shop(dsn), True


def page_ids(number: int, customers: int = CUSTOMERS) -> list[int]:
    """Return the customer ids shown on page `number` (pages wrap around)."""
    pages = max(customers // PAGE_SIZE, 1)
    start = (number % pages) * PAGE_SIZE
    return list(range(start + 1, start + PAGE_SIZE + 1))


def _assemble(
    customers: list[DictRow | None],
    orders: list[list[DictRow]],
    items: Mapping[int, list[DictRow] | None],
) -> Page:
    page: Page = []
    for customer, its_orders in zip(customers, orders, strict=True):
        if customer is None:
            continue
        page.append(
            {**customer, "orders": [{**o, "items": items.get(o["id"]) or []} for o in its_orders]}
        )
    return page


def naive_page(pool: ConnectionPool[Any], ids: list[int]) -> Page:
    """Serve the page with the N+1 loop: 1 + len(ids) + (number of orders) queries."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        found = {row["id"]: row for row in cur.execute(CUSTOMERS_SQL, {"keys": ids}).fetchall()}
        customers = [found.get(i) for i in ids]
        orders: list[list[DictRow]] = []
        items: dict[int, list[DictRow]] = {}
        for customer_id in ids:
            its_orders = cur.execute(
                "SELECT id, customer_id, placed_on, status FROM orders"
                " WHERE customer_id = %s ORDER BY id",
                (customer_id,),
            ).fetchall()
            orders.append(its_orders)
            for order in its_orders:
                items[order["id"]] = cur.execute(
                    "SELECT id, order_id, product, quantity, price_cents FROM order_items"
                    " WHERE order_id = %s ORDER BY id",
                    (order["id"],),
                ).fetchall()
    return _assemble(customers, orders, items)


def bulk_page(pool: ConnectionPool[Any], ids: list[int]) -> Page:
    """Serve the page with three hand-written ``= ANY`` queries on one connection."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        found = {row["id"]: row for row in cur.execute(CUSTOMERS_SQL, {"keys": ids}).fetchall()}
        by_customer: dict[int, list[DictRow]] = {i: [] for i in ids}
        order_ids: list[int] = []
        for row in cur.execute(ORDERS_SQL, {"keys": ids}).fetchall():
            by_customer[row["customer_id"]].append(row)
            order_ids.append(row["id"])
        items: dict[int, list[DictRow]] = {i: [] for i in order_ids}
        for row in cur.execute(ITEMS_SQL, {"keys": order_ids}).fetchall():
            items[row["order_id"]].append(row)
    customers = [found.get(i) for i in ids]
    return _assemble(customers, [by_customer[i] for i in ids], items)


class BatchedShop:
    """Serve the page from three batchsync loaders shared by every thread.

    Each level is one `get_many`; requests from concurrent threads that fall
    in the same window share one query per level.
    """

    def __init__(self, pool: ConnectionPool[Any], **batcher_options: Any) -> None:
        self.customers: Batcher[Any, DictRow | None] = pg.loader(
            pool, CUSTOMERS_SQL, key="id", name="customers", **batcher_options
        )
        self.orders: Batcher[Any, list[DictRow]] = pg.loader(
            pool, ORDERS_SQL, key="customer_id", many=True, name="orders", **batcher_options
        )
        self.items: Batcher[Any, list[DictRow]] = pg.loader(
            pool, ITEMS_SQL, key="order_id", many=True, name="order_items", **batcher_options
        )

    def page(self, ids: list[int]) -> Page:
        customers = self.customers.get_many(ids)
        orders = [its_orders or [] for its_orders in self.orders.get_many(ids)]
        order_ids = [o["id"] for its_orders in orders for o in its_orders]
        items = dict(zip(order_ids, self.items.get_many(order_ids), strict=True))
        return _assemble(customers, orders, items)

    def close(self) -> None:
        for batcher in (self.customers, self.orders, self.items):
            batcher.close()
