"""batchsync.django: the shop example (examples/django_shop) under waitress, on PostgreSQL.

Django is configured once for this module, on a scratch shop database reached as the app's
own role (neither a superuser nor the tables' owner, so row-level security applies to it).
This module's ``urlpatterns`` (the example's, plus a few for the tests) is the URLconf.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")
pytest.importorskip("waitress")

from tests.webutil import (
    TENANTS,
    DatabaseWatch,
    ShopDatabase,
    fetch_all,
    get,
    serve_waitress,
    shop_database,
)

pytestmark = [pytest.mark.pg, pytest.mark.web]

SITE = Path(__file__).resolve().parent.parent / "examples" / "django_shop"
WAITRESS_THREADS = 16

urlpatterns: list[Any] = []
_site: dict[str, Any] = {}


@pytest.fixture(scope="module")
def shop(pg_admin_dsn: str) -> Iterator[ShopDatabase]:
    with shop_database(pg_admin_dsn, "batchsync_django") as db:
        yield db


@pytest.fixture(scope="module")
def site(shop: ShopDatabase) -> Iterator[dict[str, Any]]:
    """Configure Django for the example project on the shop database (once per process)."""
    if _site:
        if _site["dsn"] != shop.dsn:
            pytest.skip("Django is configured once per process, on another database")
        yield _site
        return
    import django

    sys.path.insert(0, str(SITE))
    os.environ["DJANGO_SHOP_DSN"] = shop.dsn
    os.environ["DJANGO_SETTINGS_MODULE"] = "shopsite.settings"
    django.setup()
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.db import models
    from django.http import JsonResponse
    from django.urls import path
    from shop import loaders
    from shop.models import Customer
    from shopsite.urls import urlpatterns as shop_urls

    import batchsync
    from batchsync.django import current_request, model_loader

    settings.ROOT_URLCONF = __name__
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]  # Django's test client

    class Note(models.Model):
        tenant = models.TextField()
        number = models.IntegerField()
        body = models.TextField()

        class Meta:
            app_label = "shop"
            db_table = "notes"
            managed = False

    notes = model_loader(
        Note,
        field="number",
        partition=lambda: current_request().headers["X-Tenant"],
        partition_setting="app.tenant",
    )
    names = model_loader(Customer, name="names")
    thing_calls: list[list[int]] = []

    def fetch_things(keys: list[int]) -> dict[int, int]:
        thing_calls.append(list(keys))
        return {k: k * 10 for k in keys}

    things = batchsync.Batcher(fetch_things, window=0.05)  # default options otherwise

    def thing(request: Any, key: int) -> JsonResponse:
        return JsonResponse({"thing": things.get(key)})

    def note(request: Any, number: int) -> JsonResponse:
        found = notes.get(number)
        data = None if found is None else {"tenant": found.tenant, "body": found.body}
        return JsonResponse({"note": data})

    def customer_name(request: Any, cid: int) -> JsonResponse:
        # ?prime=x puts a value in this request's memo: it must be served here, never later.
        if "prime" in request.GET:
            names.prime(cid, Customer(id=cid, name=request.GET["prime"]))
        found = names.get(cid)
        return JsonResponse({"name": found.name, "in_scope": batchsync.in_scope()})

    urlpatterns[:] = [
        *shop_urls,
        path("notes/<int:number>", note),
        path("customers/<int:cid>/name", customer_name),
        path("things/<int:key>", thing),
    ]
    _site.update(
        dsn=shop.dsn,
        app=WSGIHandler(),
        loaders=[loaders.customers, loaders.orders_of, loaders.items_of, notes, names, things],
        thing_calls=thing_calls,
    )
    yield _site
    # The loaders live as long as the process, as in a real site: close them at the end
    # of the module, once, and restart their workers lazily if another test loads again.


@pytest.fixture
def server(site: dict[str, Any]) -> Iterator[str]:
    try:
        with serve_waitress(site["app"], threads=WAITRESS_THREADS) as url:
            yield url
    finally:
        for loader in site["loaders"]:
            _stop_workers(loader)


def _stop_workers(loader: Any) -> None:
    # The site's loaders are module globals of the example, made once; the thread-leak
    # guard wants no worker left after a test, so end the workers and make the core
    # ready to start new ones (what the fork hook does for a child process).
    core = loader._core
    core.close(15.0)
    core._reset()


def test_naive_and_batched_pages_are_identical(server: str) -> None:
    urls = [f"{server}/page/{n}/{mode}" for n in range(10) for mode in ("naive", "batched")]
    replies = fetch_all(urls * 2)
    assert [r.status for r in replies] == [200] * len(replies)
    for i in range(0, len(replies), 2):
        assert replies[i].body == replies[i + 1].body, urls[i % len(urls)]
    page = json.loads(replies[0].body)
    assert [c["id"] for c in page] == list(range(1, 51))


def test_the_page_is_the_same_as_the_flask_example(server: str, shop: ShopDatabase) -> None:
    sys.path.insert(0, str(SITE.parent))
    import flask_shop

    app = flask_shop.create_app(shop.dsn, pool_size=1)
    try:
        flask_body = app.test_client().get("/page/2/batched").data
    finally:
        flask_shop.close_app(app)
    assert get(f"{server}/page/2/batched").body == flask_body


def count_queries(shop: ShopDatabase, site: dict[str, Any], urls: list[str]) -> int:
    with DatabaseWatch(shop.admin_dsn, shop.dbname) as watch:
        before = watch.settled_queries()
        with serve_waitress(site["app"], threads=WAITRESS_THREADS) as base:
            replies = fetch_all([base + u for u in urls])
        assert all(r.status == 200 for r in replies)
        # CONN_MAX_AGE = 0: every connection is closed after its request or batch.
        return watch.settled_queries() - before


def test_queries_per_page_counted_by_the_server(shop: ShopDatabase, site: dict[str, Any]) -> None:
    import psycopg

    with psycopg.connect(shop.owner_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM orders WHERE customer_id BETWEEN 151 AND 200"
        ).fetchone()
    assert row is not None
    try:
        assert count_queries(shop, site, ["/page/3/batched"]) == 3
        assert count_queries(shop, site, ["/page/3/naive"]) == 1 + 50 + int(row[0])
        assert count_queries(shop, site, [f"/page/{n % 10}/batched" for n in range(32)]) < 96
    finally:
        for loader in site["loaders"]:
            _stop_workers(loader)


@pytest.mark.timing
def test_32_concurrent_requests_share_calls_through_waitress(site: dict[str, Any]) -> None:
    calls = site["thing_calls"]
    calls.clear()
    try:
        with serve_waitress(site["app"], threads=32) as url:
            replies = fetch_all([f"{url}/things/{k}" for k in range(32)], threads=32)
    finally:
        for loader in site["loaders"]:
            _stop_workers(loader)
    assert [json.loads(r.body) for r in replies] == [{"thing": k * 10} for k in range(32)]
    assert sorted(k for call in calls for k in call) == list(range(32))
    assert len(calls) <= 32 // 4, calls


def test_a_value_cached_in_one_request_is_not_seen_by_the_next(server: str) -> None:
    # waitress reuses its 16 threads: a scope left open on one would leak the primed value.
    urls = [f"{server}/customers/{n % 8 + 1}/name?prime=stale" for n in range(64)]
    urls += [f"{server}/customers/{n % 8 + 1}/name" for n in range(64)]
    names = [json.loads(r.body) for r in fetch_all(urls)]
    assert names[:64] == [{"name": "stale", "in_scope": True}] * 64
    assert names[64:] == [{"name": f"Customer {n % 8 + 1}", "in_scope": True} for n in range(64)]


def test_tenants_see_only_their_rows_under_row_level_security(server: str) -> None:
    n = 160
    replies = fetch_all(
        [f"{server}/notes/{i // 2 % 20 + 1}" for i in range(n)],
        headers=lambda i: {"X-Tenant": TENANTS[i % 2]},
    )
    got = [json.loads(r.body)["note"] for r in replies]
    want = [
        {"tenant": TENANTS[i % 2], "body": f"{TENANTS[i % 2]} note {i // 2 % 20 + 1}"}
        for i in range(n)
    ]
    assert got == want


@pytest.mark.parametrize("conn_max_age", [0, 60])
def test_no_connection_leak_over_thousands_of_requests(
    server: str, shop: ShopDatabase, conn_max_age: int
) -> None:
    from django.db import connections
    from django.db.backends.signals import connection_created

    opened: list[Any] = []

    def record(sender: Any, connection: Any, **kwargs: Any) -> None:
        opened.append(connection)

    connection_created.connect(record)
    connections.settings["default"]["CONN_MAX_AGE"] = conn_max_age
    try:
        with DatabaseWatch(shop.admin_dsn, shop.dbname) as watch:
            assert watch.wait_backends(0) == 0
            fetch_all([f"{server}/customers/{n % 500 + 1}" for n in range(500)])
            warm = watch.backends()
            replies = fetch_all([f"{server}/customers/{n % 500 + 1}" for n in range(2000)])
            assert all(r.status == 200 for r in replies)
            if conn_max_age == 0:
                # Every request and every batch closes its connection when it ends.
                assert watch.wait_backends(0) == 0
            else:
                # Persistent: at most one per request thread and per loader worker, kept.
                bound = WAITRESS_THREADS + 2
                assert warm <= bound
                assert watch.backends() <= bound
    finally:
        connections.settings["default"]["CONN_MAX_AGE"] = 0
        connection_created.disconnect(record)
        # Persistent connections of threads that have ended (waitress's, after the test)
        # would be collected open; a real server closes them when the process ends.
        for wrapper in opened:
            if wrapper.connection is not None and not wrapper.connection.closed:
                wrapper.connection.close()


def test_async_view_awaits_without_blocking_the_loop(site: dict[str, Any]) -> None:
    from django.test import AsyncClient

    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async def main() -> list[Any]:
        client = AsyncClient()
        stop = asyncio.Event()
        tick_task = asyncio.create_task(ticker(stop))
        try:
            return await asyncio.gather(
                *(client.get(f"/async/customers/{n + 1}") for n in range(20))
            )
        finally:
            stop.set()
            await tick_task

    customers = site["loaders"][0]
    before = customers.stats()
    try:
        responses = asyncio.run(main())
    finally:
        _stop_workers(customers)
    assert [json.loads(r.content)[0]["id"] for r in responses] == list(range(1, 21))
    after = customers.stats()
    # Had aload blocked the loop, the 20 requests would have run one after another,
    # one batch each; instead they wait together and share batches.
    assert after.batches - before.batches < 20
    assert ticks > 0


def test_model_loader_reads_the_database_named_by_using(
    site: dict[str, Any], shop: ShopDatabase
) -> None:
    import psycopg
    from django.db import connections
    from psycopg.conninfo import conninfo_to_dict
    from shop.models import Customer

    from batchsync.demo._server import scratch_database
    from batchsync.django import model_loader

    with scratch_database(shop.admin_dsn, "batchsync_replica") as replica_dsn:
        with psycopg.connect(replica_dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, city text)"
            )
            conn.execute("INSERT INTO customers VALUES (1, 'replica one', 'r@x', 'R')")
        params = conninfo_to_dict(replica_dsn)
        connections.settings["replica"] = {
            **connections.settings["default"],
            "NAME": params["dbname"],
            "USER": params.get("user", ""),
            "PASSWORD": params.get("password", ""),
        }
        try:
            with model_loader(Customer, using="replica", cache=False) as on_replica:
                assert on_replica.get(1).name == "replica one"
                assert on_replica.get(2) is None  # the replica holds customer 1 only
            with model_loader(Customer, cache=False) as on_default:
                assert on_default.get(1).name == "Customer 1"
        finally:
            del connections.settings["replica"]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("Customer",), {}, TypeError, "takes a Django model class or QuerySet, not 'Customer'"),
        ((None,), {"field": "nickname"}, ValueError, "Customer has no field 'nickname'"),
        ((None,), {"using": "nowhere"}, ValueError, "using='nowhere' names no database"),
        ((None,), {"many": "yes"}, TypeError, "many must be a bool, not 'yes'"),
        ((None,), {"partition_setting": "app.t"}, ValueError, "needs the partition option"),
    ],
)
def test_model_loader_refuses_bad_arguments(
    site: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any], error: type, message: str
) -> None:
    from shop.models import Customer

    from batchsync.django import model_loader

    model = args[0] if args[0] is not None else Customer
    with pytest.raises(error, match=message.replace("(", r"\(")):
        model_loader(model, **kwargs)
