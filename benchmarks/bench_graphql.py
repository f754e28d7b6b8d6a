"""The GraphQL shop query through graphene-django: plain, batchsync, graphql-sync-dataloaders.

examples/graphql_shop runs under waitress (16 threads, CONN_MAX_AGE = 0) in its own process
on a scratch shop database; 16 client threads in this process send the query

    { customers(first: 50) { name orders { status items { product } } } }

for --seconds per mode, and the server's own statistics count the statements::

    python benchmarks/bench_graphql.py [--dsn DSN] [--seconds 3] [--clients 16]

Modes: ``plain`` (graphene-django's resolvers, the N+1), ``batchsync`` (the example's
schema: resolvers return ``Batcher.load`` futures, run by batchsync.graphql's
DeferredExecutionContext), ``sync-dataloaders`` (the same schema over
graphql-sync-dataloaders' SyncDataLoader and its DeferredExecutionContext, per-request
loaders; skipped when that package is not installed). Every mode's response is checked
against the plain one. Without --dsn or $BATCHSYNC_PG_DSN an embedded PostgreSQL
(pgserver) is started.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "examples" / "graphql_shop"
sys.path.insert(0, str(ROOT))

from tests.webutil import (  # noqa: E402
    DatabaseWatch,
    fetch_all,
    get,
    percentile_ms,
    run_clients,
)

QUERY = "{ customers(first: 50) { name orders { status items { product } } } }"
PATHS = {"plain": "graphql/plain", "batchsync": "graphql", "sync-dataloaders": "graphql/gsd"}


# -- the server side: the example's URLs plus one for graphql-sync-dataloaders --------------


def make_app() -> Any:
    """The example's WSGI app, with /graphql/gsd added (run in the server process)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "graphqlsite.settings")
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    app = get_wsgi_application()
    settings.ROOT_URLCONF = "bench_graphql"
    return app


def __getattr__(name: str) -> Any:
    # This module is the server's URLconf; build urlpatterns only when Django asks for it.
    if name == "urlpatterns":
        return _urlpatterns()
    raise AttributeError(name)


@functools.cache
def _urlpatterns() -> list[Any]:
    from django.urls import path
    from django.views.decorators.csrf import csrf_exempt
    from graphqlsite.urls import urlpatterns

    try:
        gsd = _gsd_view()
    except ImportError:
        return list(urlpatterns)
    return [*urlpatterns, path("graphql/gsd", csrf_exempt(gsd))]


def _gsd_view() -> Any:
    import graphene
    from graphene_django import DjangoObjectType
    from graphene_django.registry import Registry
    from graphene_django.views import GraphQLView
    from graphql_sync_dataloaders import DeferredExecutionContext, SyncDataLoader
    from shop import models

    gsd_registry = Registry()

    def grouped(queryset: Any, field: str) -> Any:
        def batch(keys: list[int]) -> list[list[Any]]:
            groups: dict[int, list[Any]] = {k: [] for k in keys}
            for obj in queryset.filter(**{f"{field}__in": keys}):
                groups[getattr(obj, f"{field}_id")].append(obj)
            return [groups[k] for k in keys]

        return batch

    def loader(info: Any, name: str, batch: Any) -> Any:
        # graphql-sync-dataloaders' loaders live for one request, in its context.
        loaders = info.context.__dict__.setdefault("gsd_loaders", {})
        if name not in loaders:
            loaders[name] = SyncDataLoader(batch)
        return loaders[name]

    class Item(DjangoObjectType):
        class Meta:
            model = models.OrderItem
            fields = ("id", "product", "quantity", "price_cents")
            registry = gsd_registry

    class Order(DjangoObjectType):
        items = graphene.List(graphene.NonNull(Item), required=True)

        class Meta:
            model = models.Order
            fields = ("id", "placed_on", "status")
            registry = gsd_registry

        def resolve_items(order: Any, info: Any) -> Any:
            batch = grouped(models.OrderItem.objects.order_by("id"), "order")
            return loader(info, "items", batch).load(order.id)

    class Customer(DjangoObjectType):
        orders = graphene.List(graphene.NonNull(Order), required=True)

        class Meta:
            model = models.Customer
            fields = ("id", "name", "email", "city")
            registry = gsd_registry

        def resolve_orders(customer: Any, info: Any) -> Any:
            batch = grouped(models.Order.objects.order_by("id"), "customer")
            return loader(info, "orders", batch).load(customer.id)

    class Query(graphene.ObjectType):
        customers = graphene.List(
            graphene.NonNull(Customer), first=graphene.Int(default_value=50), required=True
        )

        def resolve_customers(root: Any, info: Any, first: int) -> Any:
            return models.Customer.objects.order_by("id")[:first]

    schema = graphene.Schema(query=Query)
    return GraphQLView.as_view(schema=schema, execution_context_class=DeferredExecutionContext)


# -- the client side -------------------------------------------------------------------------


@contextmanager
def app_server(dsn: str, threads: int) -> Iterator[str]:
    from batchsync.demo._child import child_process

    env = dict(os.environ)
    env["DJANGO_SHOP_DSN"] = dsn
    env["DJANGO_SETTINGS_MODULE"] = "graphqlsite.settings"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SITE), str(ROOT / "benchmarks"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    command = [
        sys.executable, str(ROOT / "tests" / "webutil.py"), "bench_graphql:make_app",
        "--server", "waitress", "--threads", str(threads),
    ]  # fmt: skip
    with child_process(command, env) as line:
        if not line.startswith("listening on "):
            raise RuntimeError(f"the server did not start: {line!r}")
        yield f"http://127.0.0.1:{line.split()[-1]}"


def load(url: str, clients: int, seconds: float) -> tuple[float, float, float]:
    """Send the query from `clients` threads for `seconds`; return (req/s, p50, p99 ms)."""
    latencies: list[float] = []

    def step(rng: random.Random) -> None:
        reply = get(url)
        if reply.status != 200 or b'"errors"' in reply.body:
            raise RuntimeError(f"HTTP {reply.status}: {reply.body[:200]!r}")
        latencies.append(reply.seconds)

    elapsed = run_clients(clients, seconds, step)
    return len(latencies) / elapsed, percentile_ms(latencies, 0.5), percentile_ms(latencies, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dsn", help="PostgreSQL server (default: $BATCHSYNC_PG_DSN or embedded)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per mode (3)")
    parser.add_argument("--clients", type=int, default=16, help="client threads (16)")
    args = parser.parse_args()

    from psycopg.conninfo import conninfo_to_dict

    from batchsync.demo._server import scratch_database, server
    from batchsync.demo._shop import create_shop

    with server(args.dsn) as admin, scratch_database(admin, "batchsync_bench_graphql") as dsn:
        create_shop(dsn)
        dbname = str(conninfo_to_dict(dsn)["dbname"])
        print(
            f"# {platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, {args.clients} clients, {args.seconds:g} s per mode"
        )
        print(f"{'mode':<17} {'stmts/req':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        with app_server(dsn, args.clients) as base, DatabaseWatch(admin, dbname) as watch:
            query = urllib.parse.urlencode({"query": QUERY})
            plain = get(f"{base}/{PATHS['plain']}?{query}")
            if plain.status != 200 or b'"errors"' in plain.body:
                raise RuntimeError(f"HTTP {plain.status}: {plain.body[:200]!r}")
            reference = plain.body
            for mode, path in PATHS.items():
                url = f"{base}/{path}?{query}"
                first = get(url)
                if first.status == 404:
                    print(f"{mode:<17} (not installed: pip install graphql-sync-dataloaders)")
                    continue
                if first.status != 200 or first.body != reference:
                    raise RuntimeError(f"{mode}: another response than plain resolvers'")
                # Statements per request: 4 rounds of `clients` concurrent requests.
                n = 4 * args.clients
                before = watch.settled_queries()
                replies = fetch_all([url] * n, threads=args.clients)
                assert all(r.body == reference for r in replies), mode
                per_request = (watch.settled_queries() - before) / n
                rps, p50, p99 = load(url, args.clients, args.seconds)
                print(
                    f"{mode:<17} {per_request:9.2f} {rps:8.1f} {p50:8.1f} {p99:8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
