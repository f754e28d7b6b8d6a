"""batchsync.flask: the extension, then the shop example served by werkzeug's threaded server.

The server tests run the app of ``examples/flask_shop.py`` as the app's own PostgreSQL role
(neither a superuser nor the tables' owner, so row-level security applies to it) and count
queries from the server's statistics.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

flask = pytest.importorskip("flask")

import batchsync  # noqa: E402
from batchsync import BatcherClosed, pg  # noqa: E402
from batchsync.flask import BatchSync  # noqa: E402
from tests.webutil import (  # noqa: E402
    TENANTS,
    DatabaseWatch,
    ShopDatabase,
    fetch_all,
    get,
    serve_werkzeug,
    shop_database,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import flask_shop  # noqa: E402

# -- the extension, through Flask's test client ------------------------------------------------


def recording(calls: list[list[Any]]) -> Any:
    def fetch(keys: list[Any]) -> dict[Any, Any]:
        calls.append(list(keys))
        return {k: {"key": k} for k in keys}

    return fetch


def test_each_request_runs_in_its_own_scope() -> None:
    app = flask.Flask(__name__)
    batch = BatchSync(app)
    calls: list[list[Any]] = []
    things = batch.loader(recording(calls))

    @app.get("/<int:key>")
    def view(key: int) -> Any:
        first = things.get(key)
        return {"in_scope": batchsync.in_scope(), "same": things.get(key) is first}

    client = app.test_client()
    assert client.get("/1").json == {"in_scope": True, "same": True}
    assert client.get("/1").json == {"in_scope": True, "same": True}
    assert calls == [[1], [1]]  # the memo of the first request is gone in the second
    assert not batchsync.in_scope()
    batch.close()


def test_the_scope_is_closed_when_the_view_fails() -> None:
    app = flask.Flask(__name__)
    BatchSync(app)

    @app.get("/")
    def view() -> Any:
        raise RuntimeError("boom")

    client = app.test_client()
    assert client.get("/").status_code == 500
    assert not batchsync.in_scope()


def test_the_scope_is_open_for_the_apps_before_request_functions() -> None:
    app = flask.Flask(__name__)
    seen: list[bool] = []
    app.before_request(lambda: seen.append(batchsync.in_scope()))
    BatchSync().init_app(app)
    app.get("/")(lambda: "ok")
    assert app.test_client().get("/").status_code == 200
    assert seen == [True]


def test_init_app_twice_fails() -> None:
    app = flask.Flask("shop")
    BatchSync(app)
    with pytest.raises(RuntimeError, match="the app 'shop' already has a BatchSync extension"):
        BatchSync(app)


def test_loader_forms_and_close() -> None:
    batch = BatchSync()
    calls: list[list[Any]] = []
    plain = batch.loader(recording(calls))

    @batch.loader(cache=False, name="things")
    def things(keys: list[int]) -> list[int]:
        return [k * 2 for k in keys]

    elsewhere = batch.register(batchsync.Batcher(recording(calls)))
    assert batch.batchers == [plain, things, elsewhere]
    assert things.name == "things"
    assert things.get(21) == 42
    with batchsync.scope():
        plain.get(1)
        plain.get(1)
    assert calls == [[1]]  # cache="scope" by default
    batch.close()
    batch.close()
    assert batch.closed and plain.closed and things.closed and elsewhere.closed
    with pytest.raises(BatcherClosed, match="this BatchSync extension is closed"):
        batch.register(batchsync.Batcher(recording(calls)))
    with pytest.raises(TypeError, match="register\\(\\) takes a Batcher, not 42"):
        BatchSync().register(42)  # type: ignore[type-var]


@pytest.mark.web
@pytest.mark.timing
def test_32_concurrent_requests_share_calls_through_werkzeug() -> None:
    app = flask.Flask(__name__)
    batch = BatchSync(app)
    calls: list[list[Any]] = []
    things = batch.loader(recording(calls), window=0.05)  # default options otherwise

    @app.get("/things/<int:key>")
    def view(key: int) -> Any:
        return {"thing": things.get(key)}

    try:
        with serve_werkzeug(app) as url:
            replies = fetch_all([f"{url}/things/{k}" for k in range(32)], threads=32)
    finally:
        batch.close()
    assert [json.loads(r.body) for r in replies] == [{"thing": {"key": k}} for k in range(32)]
    assert sorted(k for call in calls for k in call) == list(range(32))
    assert len(calls) <= 32 // 4, calls


# -- the shop example under a real server ------------------------------------------------------

NOTES_SQL = "SELECT number, tenant, body FROM notes WHERE number = ANY(%(keys)s)"
CUSTOMERS_SQL = "SELECT id, name FROM customers WHERE id = ANY(%(keys)s)"


@pytest.fixture(scope="module")
def shop(pg_admin_dsn: str) -> Iterator[ShopDatabase]:
    with shop_database(pg_admin_dsn, "batchsync_flask") as db:
        yield db


def make_app(db: ShopDatabase, *, partitioned: bool = True) -> Any:
    """The example app, plus two routes for the tests: tenant notes and a scope probe."""
    app = flask_shop.create_app(db.dsn)
    batch: BatchSync = app.extensions["batchsync"]
    pool = app.extensions["shop_pool"]
    tenant_options: dict[str, Any] = {}
    if partitioned:
        tenant_options = {
            "partition": lambda: flask.request.headers["X-Tenant"],
            "partition_setting": "app.tenant",
        }
    notes = batch.register(
        pg.loader(pool, NOTES_SQL, key="number", name="notes", **tenant_options)
    )
    customers = batch.register(pg.loader(pool, CUSTOMERS_SQL, key="id", cache="scope"))

    @app.get("/notes/<int:number>")
    def note(number: int) -> Any:
        return flask.jsonify(notes.get(number))

    @app.get("/customers/<int:cid>/name")
    def customer_name(cid: int) -> Any:
        # ?prime=x puts a value in this request's memo: it must be served here, never later.
        if "prime" in flask.request.args:
            customers.prime(cid, {"id": cid, "name": flask.request.args["prime"]})
        found = customers.get(cid)
        return {"name": found["name"] if found else None}

    return app


@pytest.fixture
def server(shop: ShopDatabase) -> Iterator[str]:
    app = make_app(shop)
    try:
        with serve_werkzeug(app) as url:
            yield url
    finally:
        flask_shop.close_app(app)


@pytest.mark.pg
@pytest.mark.web
def test_naive_and_batched_pages_are_identical(server: str) -> None:
    urls = [f"{server}/page/{n}/{mode}" for n in range(10) for mode in ("naive", "batched")]
    replies = fetch_all(urls * 2)
    assert all(r.status == 200 for r in replies)
    bodies = [r.body for r in replies]
    for i in range(0, len(bodies), 2):
        assert bodies[i] == bodies[i + 1], urls[i % len(urls)]
    page = json.loads(bodies[0])
    assert len(page) == 50 and [c["id"] for c in page] == list(range(1, 51))
    assert sum(len(c["orders"]) for c in page) > 50


def orders_on_page(db: ShopDatabase, number: int) -> int:
    import psycopg

    with psycopg.connect(db.owner_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM orders WHERE customer_id = ANY(%s)",
            [flask_shop.page_ids(number)],
        ).fetchone()
    assert row is not None
    return int(row[0])


def count_queries(db: ShopDatabase, urls: list[str]) -> tuple[int, list[bytes]]:
    """Serve urls from a fresh app; return the server-counted transactions and the bodies."""
    with DatabaseWatch(db.admin_dsn, db.dbname) as watch:
        before = watch.settled_queries()
        app = make_app(db)
        try:
            with serve_werkzeug(app) as base:
                replies = fetch_all([base + u for u in urls])
        finally:
            flask_shop.close_app(app)  # its connections end and publish their counts
        return watch.settled_queries() - before, [r.body for r in replies]


@pytest.mark.pg
@pytest.mark.web
def test_queries_per_page_counted_by_the_server(shop: ShopDatabase) -> None:
    orders = orders_on_page(shop, 3)
    assert count_queries(shop, ["/page/3/batched"])[0] == 3
    # + 2: psycopg prepares a statement on its fifth run, and the server counts the
    # Parse round trip as one more transaction; the naive loop repeats two statements.
    assert count_queries(shop, ["/page/3/naive"])[0] == 1 + 50 + orders + 2


@pytest.mark.pg
@pytest.mark.web
def test_concurrent_pages_share_queries(shop: ShopDatabase) -> None:
    pages = 32
    queries, bodies = count_queries(shop, [f"/page/{n % 10}/batched" for n in range(pages)])
    assert all(json.loads(b) for b in bodies)
    assert queries < 3 * pages


@pytest.mark.pg
@pytest.mark.web
def test_a_value_cached_in_one_request_is_not_seen_by_the_next(server: str) -> None:
    urls = [f"{server}/customers/{n % 8 + 1}/name?prime=stale" for n in range(64)]
    urls += [f"{server}/customers/{n % 8 + 1}/name" for n in range(64)]
    replies = fetch_all(urls)
    names = [json.loads(r.body)["name"] for r in replies]
    assert names[:64] == ["stale"] * 64
    assert names[64:] == [f"Customer {n % 8 + 1}" for n in range(64)]


@pytest.mark.pg
@pytest.mark.web
def test_tenants_see_only_their_rows_under_row_level_security(server: str) -> None:
    # Two tenants ask for the same note numbers at the same moment; the app's role is
    # subject to the policy, so a batch that mixed tenants would return wrong or no rows.
    n = 160
    replies = fetch_all(
        [f"{server}/notes/{i // 2 % 20 + 1}" for i in range(n)],
        headers=lambda i: {"X-Tenant": TENANTS[i % 2]},
    )
    got = [json.loads(r.body) for r in replies]
    want = [
        {"number": i // 2 % 20 + 1, "tenant": TENANTS[i % 2], "body": f"{TENANTS[i % 2]} "
         f"note {i // 2 % 20 + 1}"}
        for i in range(n)
    ]
    assert got == want


@pytest.mark.pg
@pytest.mark.web
def test_the_app_role_is_subject_to_row_level_security(shop: ShopDatabase) -> None:
    # Without the partition (and so without the setting), the same role sees no note:
    # the tenant test above proves something only because of this.
    app = make_app(shop, partitioned=False)
    try:
        with serve_werkzeug(app) as url:
            reply = get(f"{url}/notes/1", {"X-Tenant": "acme"})
    finally:
        flask_shop.close_app(app)
    assert json.loads(reply.body) is None


@pytest.mark.pg
@pytest.mark.web
def test_no_connection_outlives_the_app(shop: ShopDatabase) -> None:
    with DatabaseWatch(shop.admin_dsn, shop.dbname) as watch:
        assert watch.wait_backends(0) == 0
        app = make_app(shop)
        try:
            with serve_werkzeug(app) as url:
                fetch_all([f"{url}/customers/{n % 50 + 1}/name" for n in range(1000)])
                assert watch.backends() <= 8  # the pool's size
        finally:
            flask_shop.close_app(app)
        assert watch.wait_backends(0) == 0
