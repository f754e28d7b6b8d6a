"""The demo's shop page over Flask-SQLAlchemy models, served three ways with identical pages.

Run it (from a checkout: ``pip install -e ".[examples,sqlalchemy]" flask-sqlalchemy``)::

    python examples/flask_sqlalchemy_shop.py
    curl localhost:8000/page/0/naive      # lazy relationships: 1 + 50 + (orders) statements
    curl localhost:8000/page/0/selectin   # selectinload: 3 statements
    curl localhost:8000/page/0/batched    # batchsync loaders: 3, shared by concurrent pages
    curl localhost:8000/page/0/detached   # the same, objects left detached (session=None)

Without a DSN it starts a private PostgreSQL with a fresh shop, as the demo does, and stops
it on exit (Ctrl-C or SIGTERM). With ``--dsn`` (or $BATCHSYNC_PG_DSN, a libpq DSN or URL) it
serves that database; ``--create`` fills the demo's shop tables there unless they are there.

A page shows 50 customers, their orders and the orders' items, as JSON (the same bytes as
examples/flask_shop.py). The loaders are made with the app's ``db`` and shared by every
request thread; each batch runs on the app's engine in a session of its own, and the view
gets objects of its own ``db.session`` (a lazy relationship on them works, see
``/customers/<id>/orders``).

The engine runs in autocommit: the pages only read, and each statement is then one
transaction in the server's statistics, which is how the tests and the benchmark count them.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import date
from typing import Any

from flask import Flask, Response, abort
from flask_sqlalchemy import SQLAlchemy
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import ForeignKey, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from batchsync import sqlalchemy as bs
from batchsync.demo._examples import serve_example
from batchsync.flask import BatchSync

PAGE_SIZE = 50


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Customer(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    email: Mapped[str]
    city: Mapped[str]
    orders: Mapped[list[Order]] = relationship(order_by="Order.id")


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    placed_on: Mapped[date]
    status: Mapped[str]
    items: Mapped[list[OrderItem]] = relationship(order_by="OrderItem.id")


class OrderItem(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "order_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    product: Mapped[str]
    quantity: Mapped[int]
    price_cents: Mapped[int]


CUSTOMER = ("id", "name", "email", "city")
ORDER = ("id", "customer_id", "placed_on", "status")
ITEM = ("id", "order_id", "product", "quantity", "price_cents")


def columns(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(obj, n) for n in names}


def engine_url(dsn: str) -> URL:
    """A SQLAlchemy URL (psycopg 3 driver) for a libpq DSN or URL."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    return URL.create("postgresql+psycopg", query=params)


def page_ids(number: int) -> list[int]:
    """The customer ids on page `number`: 50 consecutive ids."""
    start = number * PAGE_SIZE
    return list(range(start + 1, start + PAGE_SIZE + 1))


def to_json(page: list[dict[str, Any]]) -> Response:
    return Response(json.dumps(page, default=str), mimetype="application/json")


def related_page(customers: list[Customer]) -> list[dict[str, Any]]:
    """The page from customers, reading their orders and items through the relationships."""
    return [
        {
            **columns(c, CUSTOMER),
            "orders": [
                {**columns(o, ORDER), "items": [columns(i, ITEM) for i in o.items]}
                for o in c.orders
            ],
        }
        for c in customers
    ]


def in_page_order(ids: list[int], customers: Any) -> list[Customer]:
    found = {c.id: c for c in customers}
    return [found[i] for i in ids if i in found]


def batched_page(
    ids: list[int], customers: bs.Loader, orders: bs.Loader, items: bs.Loader
) -> list[dict[str, Any]]:
    """The page from three loaders: one get_many per level."""
    found = customers.get_many(ids)  # one statement for the 50 customers
    by_customer = orders.get_many(ids)  # one for all their orders
    order_ids = [o.id for its_orders in by_customer for o in its_orders]
    by_order = dict(zip(order_ids, items.get_many(order_ids), strict=True))  # one more
    return [
        {
            **columns(c, CUSTOMER),
            "orders": [
                {**columns(o, ORDER), "items": [columns(i, ITEM) for i in by_order[o.id]]}
                for o in its_orders
            ],
        }
        for c, its_orders in zip(found, by_customer, strict=True)
        if c is not None
    ]


def create_app(dsn: str | None = None, *, pool_size: int = 8) -> Flask:
    """Build the app on the database of `dsn` (default: $BATCHSYNC_PG_DSN)."""
    dsn = dsn or os.environ.get("BATCHSYNC_PG_DSN")
    if not dsn:
        raise RuntimeError("give a DSN: --dsn or $BATCHSYNC_PG_DSN")
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = engine_url(dsn)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "pool_size": pool_size,
        "max_overflow": 0,
        "isolation_level": "AUTOCOMMIT",
        "connect_args": {"application_name": "flask_sqlalchemy_shop"},
    }
    db.init_app(app)

    batch = BatchSync(app)
    # cache="scope" (the default): a key loaded twice in one request is fetched once.
    options: dict[str, Any] = {"window": 0.002, "max_concurrency": 2}
    customers = batch.register(bs.loader(db, Customer, **options))
    orders = batch.register(
        bs.loader(db, select(Order).order_by(Order.id), field="customer_id", many=True, **options)
    )
    items = batch.register(
        bs.loader(db, select(OrderItem).order_by(OrderItem.id), field="order_id", many=True,
                  **options)
    )

    @app.get("/page/<int:number>/naive")
    def page_naive(number: int) -> Response:
        ids = page_ids(number)
        found = db.session.scalars(select(Customer).where(Customer.id.in_(ids)))
        return to_json(related_page(in_page_order(ids, found)))  # 1 + 50 + orders statements

    @app.get("/page/<int:number>/selectin")
    def page_selectin(number: int) -> Response:
        ids = page_ids(number)
        stmt = (
            select(Customer)
            .where(Customer.id.in_(ids))
            .options(selectinload(Customer.orders).selectinload(Order.items))
        )
        return to_json(related_page(in_page_order(ids, db.session.scalars(stmt))))

    @app.get("/page/<int:number>/batched")
    def page_batched(number: int) -> Response:
        return to_json(batched_page(page_ids(number), customers, orders, items))

    # The same loaders with session=None: the batch's detached objects, shared by every
    # request of the batch, with no copy into db.session; for read-only use (no lazy loads).
    ro: dict[str, Any] = {**options, "session": None}
    customers_ro = batch.register(bs.loader(db, Customer, **ro))
    orders_ro = batch.register(
        bs.loader(db, select(Order).order_by(Order.id), field="customer_id", many=True, **ro)
    )
    items_ro = batch.register(
        bs.loader(db, select(OrderItem).order_by(OrderItem.id), field="order_id", many=True,
                  **ro)
    )

    @app.get("/page/<int:number>/detached")
    def page_detached(number: int) -> Response:
        return to_json(batched_page(page_ids(number), customers_ro, orders_ro, items_ro))

    @app.get("/customers/<int:cid>/orders")
    def customer_orders(cid: int) -> Response:
        # A lookup from anywhere in a request, then a lazy relationship: the customer is an
        # object of this request's db.session, so the lazy load runs on it.
        found = customers.get(cid)
        if found is None:
            abort(404)
        return to_json([columns(o, ORDER) for o in found.orders])

    return app


def warm_app(app: Flask) -> None:
    """Connect once and close: the engine's first connection runs queries of its own."""
    with app.app_context():
        db.engine.connect().close()
        db.engine.dispose()


def close_app(app: Flask) -> None:
    """Close the app's loaders, then its engines' connections."""
    app.extensions["batchsync"].close()
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--dsn", help="PostgreSQL DSN (default: $BATCHSYNC_PG_DSN, else a private server)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--create", action="store_true", help="create the demo's shop tables unless they exist"
    )
    args = parser.parse_args()
    serve_example(
        "flask_sqlalchemy_shop", args.dsn, args.create, args.port, create_app, close_app
    )


if __name__ == "__main__":
    main()
