"""batchsync.pg through a real PgBouncer in transaction pooling mode (see tests/pg_fixtures.py).

Every answer is checked against the truth while threads load from two loaders of different
statements: a row from another statement is the failure these tests exist to catch.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("psycopg_pool")

from psycopg_pool import ConnectionPool  # noqa: E402

from batchsync import BatchError, pg  # noqa: E402
from batchsync.demo._server import scratch_database  # noqa: E402
from tests.pg_fixtures import Pooler  # noqa: E402

pytestmark = pytest.mark.pg

CUSTOMERS = "SELECT id, name FROM customers WHERE id = ANY(%(keys)s)"
ORDERS = "SELECT id, customer_id, total FROM orders WHERE customer_id = ANY(%(keys)s) ORDER BY id"
N_CUSTOMERS = 50


def customer(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"customer {i}"}


def orders_of(i: int) -> list[dict[str, Any]]:
    return [{"id": o, "customer_id": i, "total": o * 10} for o in (i, i + 50, i + 100)]


@pytest.fixture(scope="module")
def shop(pgbouncer: Pooler) -> Iterator[str]:
    """A database with customers 1..50, each with three orders; its DSN through PgBouncer."""
    with scratch_database(pgbouncer.direct, "batchsync_pooler") as direct:
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(
                """
                CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
                INSERT INTO customers SELECT i, 'customer ' || i FROM generate_series(1, 50) i;
                CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, total int);
                INSERT INTO orders SELECT o, (o - 1) % 50 + 1, o * 10
                    FROM generate_series(1, 150) o;
                """
            )
        yield pgbouncer.through(direct)


@dataclass
class Tally:
    correct: int = 0
    wrong: int = 0
    errors: list[BaseException] = field(default_factory=list)


def hammer(check: Callable[[list[int]], bool], threads: int = 8, seconds: float = 1.5) -> Tally:
    """Run check(ids) from `threads` threads for `seconds`; count its verdicts and errors."""
    tally = Tally()
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ids = rng.sample(range(1, N_CUSTOMERS + 1), 5)
            try:
                good = check(ids)
            except Exception as exc:  # counted: the assertions say which were allowed
                with lock:
                    tally.errors.append(exc)
                continue
            with lock:
                if good:
                    tally.correct += 1
                else:
                    tally.wrong += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return tally


def hostile_pool(dsn: str) -> ConnectionPool[Any]:
    # prepare_threshold=0: psycopg prepares every statement at its first run on a connection.
    # 8 client connections share PgBouncer's 4 server connections.
    kwargs = {"autocommit": True, "prepare_threshold": 0}
    return ConnectionPool(dsn, min_size=8, max_size=8, kwargs=kwargs, open=True)


def loader_check(pool: ConnectionPool[Any], **options: Any) -> tuple[Callable[..., bool], Any]:
    customers = pg.loader(pool, CUSTOMERS, key="id", max_concurrency=4, **options)
    orders = pg.loader(pool, ORDERS, key="customer_id", many=True, max_concurrency=4, **options)

    def check(ids: list[int]) -> bool:
        got_customers = customers.get_many(ids, timeout=20)
        got_orders = orders.get_many(ids, timeout=20)
        return got_customers == [customer(i) for i in ids] and got_orders == [
            orders_of(i) for i in ids
        ]

    return check, (customers, orders)


@pytest.mark.timeout(60)
def test_the_hazard_is_real_psycopg_prepared_statements_through_pgbouncer(shop: str) -> None:
    # Without batchsync: psycopg's own prepared statements through transaction pooling
    # return rows of the other statement, or fail. This is what the loaders must not do.
    with hostile_pool(shop) as pool:
        pool.wait(10)

        def check(ids: list[int]) -> bool:
            with pool.connection() as conn:
                a = conn.execute(CUSTOMERS, {"keys": ids}).fetchall()
                b = conn.execute(ORDERS, {"keys": ids}).fetchall()
            want_a = sorted((i, f"customer {i}") for i in ids)
            want_b = sorted((o["id"], i, o["total"]) for i in ids for o in orders_of(i))
            return sorted(a) == want_a and sorted(b) == want_b

        tally = hammer(check)
    assert tally.wrong + len(tally.errors) > 0, tally


@pytest.mark.timeout(60)
def test_loaders_never_mix_statements_through_pgbouncer(shop: str) -> None:
    with hostile_pool(shop) as pool:
        pool.wait(10)
        check, loaders = loader_check(pool)
        try:
            tally = hammer(check)
        finally:
            for b in loaders:
                b.close()
    assert (tally.wrong, tally.errors) == (0, [])
    assert tally.correct > 50


@pytest.mark.timeout(60)
def test_prepare_true_through_pgbouncer_fails_instead_of_answering_wrong_rows(shop: str) -> None:
    with hostile_pool(shop) as pool:
        pool.wait(10)
        check, loaders = loader_check(pool, prepare=True)
        try:
            tally = hammer(check)
        finally:
            for b in loaders:
                b.close()
    assert tally.wrong == 0, tally
    assert tally.errors, "the unsafe setup ran without a single error"
    clear = [e for e in tally.errors if isinstance(e, BatchError)]
    others = [e for e in tally.errors if not isinstance(e, (BatchError, psycopg.Error))]
    assert not others, others[:3]
    # Where another session's statement answered, the error names the cause and the fix.
    for e in clear:
        assert "a prepared statement of another session answered" in str(e)
        assert "keep prepare=False, the default" in str(e)
