"""graphene-django: the GraphQL shop (examples/graphql_shop) under waitress, on PostgreSQL.

The site runs in a process of its own (Django is configured once per process, and the
Django tests configure this one for another project), with 16 waitress threads, on a
scratch shop database reached as the app's role. Statements are counted by the server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

# Importing graphene_django needs configured settings: only look for it here.
if importlib.util.find_spec("graphene_django") is None:
    pytest.skip(
        "graphene-django is not installed (pip install -e '.[test]')", allow_module_level=True
    )
pytest.importorskip("waitress")

from tests.webutil import DatabaseWatch, ShopDatabase, fetch_all, get, shop_database

pytestmark = [pytest.mark.pg, pytest.mark.web]

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "examples" / "graphql_shop"
QUERY = "{ customers(first: 50) { name orders { status items { product } } } }"


@pytest.fixture(scope="module")
def shop(pg_admin_dsn: str) -> Iterator[ShopDatabase]:
    with shop_database(pg_admin_dsn, "batchsync_graphql") as db:
        yield db


@pytest.fixture(scope="module")
def site(shop: ShopDatabase) -> Iterator[str]:
    """The example under waitress in a child process; yields its base URL."""
    from batchsync.demo._child import child_process

    env = dict(os.environ)
    env["DJANGO_SHOP_DSN"] = shop.dsn
    # This process may have configured Django for another project (tests/test_django.py).
    env["DJANGO_SETTINGS_MODULE"] = "graphqlsite.settings"
    env["DJANGO_CONN_MAX_AGE"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, str(ROOT / "tests" / "webutil.py"), "graphqlsite.wsgi:application",
        "--server", "waitress", "--threads", "16",
    ]  # fmt: skip
    with child_process(command, env) as line:
        assert line.startswith("listening on "), line
        yield f"http://127.0.0.1:{line.split()[-1]}"


def url(base: str, path: str, query: str) -> str:
    return f"{base}/{path}?{urllib.parse.urlencode({'query': query})}"


def statements(shop: ShopDatabase, urls: list[str]) -> tuple[int, list[bytes]]:
    """Send urls from 16 client threads; return the statements they cost and the bodies."""
    with DatabaseWatch(shop.admin_dsn, shop.dbname) as watch:
        before = watch.settled_queries()
        replies = fetch_all(urls)
        assert [r.status for r in replies] == [200] * len(urls), replies[0].body[:300]
        # CONN_MAX_AGE = 0: requests and batches close their connections when they end.
        return watch.settled_queries() - before, [r.body for r in replies]


def orders_of_first(shop: ShopDatabase, customers: int) -> int:
    import psycopg

    with psycopg.connect(shop.owner_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM orders WHERE customer_id <= %s", [customers]
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(120)
def test_the_shop_query_costs_3_statements_instead_of_1_plus_50_plus_orders(
    site: str, shop: ShopDatabase
) -> None:
    plain, (plain_body,) = statements(shop, [url(site, "graphql/plain", QUERY)])
    batched, (batched_body,) = statements(shop, [url(site, "graphql", QUERY)])
    assert plain == 1 + 50 + orders_of_first(shop, 50)
    assert batched == 3
    assert batched_body == plain_body
    data = json.loads(batched_body)
    assert "errors" not in data
    customers = data["data"]["customers"]
    assert [c["name"] for c in customers] == [f"Customer {i}" for i in range(1, 51)]
    assert sum(len(o["items"]) for c in customers for o in c["orders"]) > 50


@pytest.mark.timeout(120)
def test_16_concurrent_clients_share_statements(site: str, shop: ShopDatabase) -> None:
    n = 32
    count, bodies = statements(shop, [url(site, "graphql", QUERY)] * n)
    assert count < 3 * n
    reference = get(url(site, "graphql/plain", QUERY)).body
    assert bodies == [reference] * n  # every response holds the whole, right answer


def test_a_parent_loaded_for_each_item_of_a_list(site: str, shop: ShopDatabase) -> None:
    # graphql-sync-dataloaders' graphene-django view test, on the shop: each order's
    # customer by a loader costs one statement for all, after the one for the orders.
    query = "{ orders(first: 20) { id status customer { name } } }"
    batched, (batched_body,) = statements(shop, [url(site, "graphql", query)])
    plain, (plain_body,) = statements(shop, [url(site, "graphql/plain", query)])
    assert batched == 2
    assert plain == 1 + 20
    assert batched_body == plain_body


def test_a_missing_key_is_null_and_a_bad_query_an_error(site: str) -> None:
    reply = get(
        url(site, "graphql", "{ a: customer(id: 1) { name } b: customer(id: 9999) { name } }")
    )
    assert json.loads(reply.body) == {"data": {"a": {"name": "Customer 1"}, "b": None}}
    reply = get(url(site, "graphql", "{ customers { nickname } }"))
    assert reply.status == 400
    assert "Cannot query field 'nickname' on type 'Customer'." in reply.body.decode()
