"""batchsync.pg against a real PostgreSQL (see tests/pg_fixtures.py)."""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")
psycopg_pool = pytest.importorskip("psycopg_pool")

from psycopg import sql  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402
from psycopg.rows import namedtuple_row  # noqa: E402
from psycopg_pool import ConnectionPool  # noqa: E402

from batchsync import BatchError, pg  # noqa: E402
from batchsync.demo._measure import QueryCounter  # noqa: E402
from batchsync.demo._proxy import Proxy  # noqa: E402
from batchsync.demo._server import proxied_dsn  # noqa: E402

pytestmark = pytest.mark.pg

PEOPLE = "SELECT id, name FROM people WHERE id = ANY(%(keys)s)"
PETS = "SELECT id, owner_id, name FROM pets WHERE owner_id = ANY(%(keys)s) ORDER BY id DESC"


@pytest.fixture
def tables(pg_conn: Any) -> Iterator[None]:
    """people(id, name) with ids 1..5 and pets(id, owner_id, name) of people 1 and 2."""
    pg_conn.execute(
        """
        CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL);
        INSERT INTO people SELECT i, 'person ' || i FROM generate_series(1, 5) AS i;
        CREATE TABLE pets (id int PRIMARY KEY, owner_id int NOT NULL, name text NOT NULL);
        INSERT INTO pets VALUES (1, 1, 'rex'), (2, 1, 'tom'), (3, 2, 'kit'), (4, 1, 'bo');
        """
    )
    yield
    pg_conn.execute("DROP TABLE people, pets")


@pytest.fixture
def counter(pg_dsn: str) -> Iterator[QueryCounter]:
    counter = QueryCounter(pg_dsn)
    yield counter
    counter.close()


def wait_all(futures: list[Any], timeout: float = 10.0) -> list[Any]:
    return [f.result(timeout) for f in futures]


# --- construction -----------------------------------------------------------


def test_sql_without_placeholder_is_refused(pg_pool: ConnectionPool[Any]) -> None:
    with pytest.raises(ValueError) as info:
        pg.loader(pg_pool, "SELECT id FROM people WHERE id = 1", key="id")
    assert str(info.value) == (
        "sql has no placeholder %(keys)s for the batch's keys;"
        " write it as in 'WHERE id = ANY(%(keys)s)'"
    )


def test_positional_and_unknown_placeholders_are_refused(pg_pool: ConnectionPool[Any]) -> None:
    with pytest.raises(ValueError, match="positional placeholder '%s'"):
        pg.loader(pg_pool, "SELECT id FROM people WHERE id = ANY(%s)", key="id")
    with pytest.raises(ValueError, match=r"placeholder\(s\) %\(other\)s that the loader"):
        pg.loader(pg_pool, "SELECT id FROM people WHERE id = ANY(%(keys)s) AND %(other)s", key="id")
    # A literal percent sign is not a placeholder.
    with pg.loader(
        pg_pool, "SELECT id FROM people WHERE id = ANY(%(keys)s) AND 'a%%' <> ''", key="id"
    ):
        pass


def test_composite_sql_needs_one_placeholder_per_column(pg_pool: ConnectionPool[Any]) -> None:
    with pytest.raises(ValueError, match=r"no placeholder %\(sku\)s"):
        pg.loader(pg_pool, "SELECT * FROM t WHERE a = ANY(%(tenant_id)s)", key=("tenant_id", "sku"))


def test_arguments_are_checked(pg_pool: ConnectionPool[Any]) -> None:
    with pytest.raises(TypeError, match=r"pool must be a psycopg_pool\.ConnectionPool, got 'x'"):
        pg.loader("x", PEOPLE, key="id")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="key must name the result column"):
        pg.loader(pg_pool, PEOPLE, key="")
    with pytest.raises(TypeError, match="key must be a column name"):
        pg.loader(pg_pool, PEOPLE, key=["id"])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="a composite key needs two or more columns"):
        pg.loader(pg_pool, PEOPLE, key=("id",))
    with pytest.raises(ValueError, match="partition_setting needs the partition option"):
        pg.loader(pg_pool, PEOPLE, key="id", partition_setting="app.tenant_id")


# --- loading ------------------------------------------------------------------


@pytest.mark.usefixtures("tables")
def test_one_to_one(pg_pool: ConnectionPool[Any], counter: QueryCounter) -> None:
    def work() -> None:
        with pg.loader(pg_pool, PEOPLE, key="id") as people:
            futures = [people.load(k) for k in (3, 1, 99, 3)]
            assert wait_all(futures) == [
                {"id": 3, "name": "person 3"},
                {"id": 1, "name": "person 1"},
                None,
                {"id": 3, "name": "person 3"},
            ]
            assert people.get_many([2, 5]) == [
                {"id": 2, "name": "person 2"},
                {"id": 5, "name": "person 5"},
            ]
            stats = people.stats()
        assert (stats.batches, stats.keys) == (2, 5)

    # Two batches, two statements counted by the server.
    assert counter.count(pg_pool, work) == 2


@pytest.mark.usefixtures("tables")
def test_missing_raise(pg_pool: ConnectionPool[Any]) -> None:
    with pg.loader(pg_pool, PEOPLE, key="id", missing="raise") as people:
        found, missing = people.load(1), people.load(42)
        assert found.result(10)["name"] == "person 1"
        with pytest.raises(KeyError):
            missing.result(10)


@pytest.mark.usefixtures("tables")
def test_one_to_many(pg_pool: ConnectionPool[Any], counter: QueryCounter) -> None:
    def work() -> None:
        with pg.loader(pg_pool, PETS, key="owner_id", many=True) as pets:
            owners = pets.get_many([1, 2, 3])
            assert pets.stats().batches == 1
        assert [[p["name"] for p in rows] for rows in owners] == [
            ["bo", "tom", "rex"],
            ["kit"],
            [],
        ]

    assert counter.count(pg_pool, work) == 1


@pytest.mark.usefixtures("tables")
def test_row_factory(pg_pool: ConnectionPool[Any]) -> None:
    with pg.loader(pg_pool, PEOPLE, key="id", row_factory=namedtuple_row) as people:
        row = people.get(4)
        assert row is not None
        assert (row.id, row.name) == (4, "person 4")


@pytest.mark.usefixtures("tables")
def test_duplicate_rows_fail_only_their_key(pg_pool: ConnectionPool[Any]) -> None:
    with pg.loader(pg_pool, PETS, key="owner_id") as pets:
        one, many = pets.load(2), pets.load(1)
        assert one.result(10)["name"] == "kit"
        with pytest.raises(BatchError, match="more than one row for key 1; use many=True"):
            many.result(10)


def test_composite_keys(pg_pool: ConnectionPool[Any], pg_conn: Any) -> None:
    pg_conn.execute(
        """
        CREATE TABLE stock (tenant_id int, sku text, qty int, PRIMARY KEY (tenant_id, sku));
        INSERT INTO stock VALUES (1, 'A', 10), (1, 'B', 11), (2, 'A', 20);
        """
    )
    try:
        with pg.loader(
            pg_pool,
            """
            SELECT tenant_id, sku, qty FROM stock
            WHERE (tenant_id, sku) IN (
                SELECT * FROM unnest(%(tenant_id)s::int[], %(sku)s::text[])
            )
            """,
            key=("tenant_id", "sku"),
        ) as stock:
            got = stock.get_many([(2, "A"), (1, "B"), (2, "B"), (1, "A")])
            assert [r and r["qty"] for r in got] == [20, 11, None, 10]
            assert stock.stats().batches == 1
            with pytest.raises(TypeError, match="must be tuples of 2 values, got 'A'"):
                stock.get("A", timeout=10)
    finally:
        pg_conn.execute("DROP TABLE stock")


@pytest.mark.parametrize(
    ("column_type", "keys"),
    [
        ("int", [1, 2, 3]),
        ("bigint", [2**40, 7, 2**40 + 1]),
        ("text", ["a", "b b", "ç"]),
        ("uuid", [uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)]),
    ],
)
def test_key_types(
    pg_pool: ConnectionPool[Any], pg_conn: Any, column_type: str, keys: list[Any]
) -> None:
    pg_conn.execute(
        sql.SQL("CREATE TABLE keyed (k {} PRIMARY KEY, n int)").format(sql.SQL(column_type))
    )
    try:
        with pg_conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO keyed VALUES (%s, %s)", [(k, i) for i, k in enumerate(keys[:2])]
            )
        with pg.loader(pg_pool, "SELECT k, n FROM keyed WHERE k = ANY(%(keys)s)", key="k") as keyed:
            got = keyed.get_many(keys)
        assert [r and r["n"] for r in got] == [0, 1, None]
    finally:
        pg_conn.execute("DROP TABLE keyed")


@pytest.mark.usefixtures("tables")
def test_unadaptable_key_fails_its_batch(pg_pool: ConnectionPool[Any]) -> None:
    with pg.loader(pg_pool, PEOPLE, key="id") as people:
        future = people.load(object())
        with pytest.raises(psycopg.ProgrammingError, match="cannot adapt type 'object'"):
            future.result(10)
        assert people.get(1, timeout=10) == {"id": 1, "name": "person 1"}


@pytest.mark.usefixtures("tables")
def test_key_column_not_in_result(pg_pool: ConnectionPool[Any]) -> None:
    query = "SELECT name, 1 AS x FROM people WHERE id = ANY(%(keys)s)"
    with pg.loader(pg_pool, query, key="id") as people:
        futures = people.load_many([1, 2])
        errors = [f.exception(10) for f in futures]
        with pytest.raises(BatchError) as info:
            people.get(3, timeout=10)
    assert type(errors[0]) is BatchError and errors[1] is errors[0]  # one error for the call
    for error in (errors[0], info.value):
        assert str(error) == (
            "the query result has no column 'id' to take the key from (its columns: name, x)"
        )


# --- failures -------------------------------------------------------------------


@pytest.mark.usefixtures("tables")
def test_statement_error_fails_its_batch_only(pg_pool: ConnectionPool[Any]) -> None:
    query = "SELECT id, 10 / (id - 3) AS x FROM people WHERE id = ANY(%(keys)s)"
    with pg.loader(pg_pool, query, key="id") as people:
        bad = [people.load(k) for k in (2, 3)]
        for future in bad:
            with pytest.raises(psycopg.errors.DivisionByZero):
                future.result(10)
        assert [r and r["x"] for r in people.get_many([1, 2], timeout=10)] == [-5, -10]
        stats = people.stats()
    assert (stats.batches, stats.failed_batches) == (2, 1)


@pytest.mark.timing
def test_proxy_adds_round_trip_time(pg_dsn: str) -> None:
    from batchsync.demo._server import proxy_target

    with (
        Proxy(proxy_target(pg_dsn), rtt_ms=20) as proxy,
        psycopg.connect(proxied_dsn(pg_dsn, proxy.port), autocommit=True) as conn,
    ):
        started = time.monotonic()
        for _ in range(5):
            conn.execute("SELECT 1")
        elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 1.0


# --- row-level security ----------------------------------------------------------


@pytest.fixture
def tenant_role(pg_conn: Any, pg_dsn: str) -> Iterator[str]:
    """A DSN for a LOGIN role that is neither superuser nor owner of tenant_items.

    tenant_items has a policy that shows a row only to the tenant named by the
    app.tenant_id setting, enabled and forced.
    """
    role = f"batchsync_tenant_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    try:
        pg_conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("the test server does not let us create a role")
    pg_conn.execute(
        """
        CREATE TABLE tenant_items (id int PRIMARY KEY, tenant_id int NOT NULL, label text);
        INSERT INTO tenant_items VALUES (1, 1, 'one-a'), (2, 1, 'one-b'), (3, 2, 'two-a');
        ALTER TABLE tenant_items ENABLE ROW LEVEL SECURITY;
        ALTER TABLE tenant_items FORCE ROW LEVEL SECURITY;
        CREATE POLICY by_tenant ON tenant_items
            USING (tenant_id = current_setting('app.tenant_id')::int);
        """
    )
    pg_conn.execute(sql.SQL("GRANT SELECT ON tenant_items TO {}").format(sql.Identifier(role)))
    try:
        yield make_conninfo(pg_dsn, user=role, password=password)
    finally:
        pg_conn.execute("DROP TABLE tenant_items")
        pg_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_partition_setting_applies_row_level_security(tenant_role: str) -> None:
    tenant = threading.local()
    query = "SELECT id, tenant_id, label FROM tenant_items WHERE id = ANY(%(keys)s)"
    with (
        ConnectionPool(
            tenant_role, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True
        ) as pool,
        pg.loader(
            pool,
            query,
            key="id",
            partition=lambda: tenant.id,
            partition_setting="app.tenant_id",
            window=0.05,
        ) as items,
    ):
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT current_user, rolsuper, rolbypassrls FROM pg_roles"
                " WHERE rolname = current_user"
            ).fetchone()
            assert row is not None and row[1:] == (False, False)
        results: dict[int, list[Any]] = {}
        start = threading.Barrier(2)

        def serve(tenant_id: int) -> None:
            tenant.id = tenant_id
            start.wait()
            results[tenant_id] = items.get_many([1, 2, 3], timeout=10)

        threads = [threading.Thread(target=serve, args=(t,)) for t in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = items.stats()
    assert [r and r["label"] for r in results[1]] == ["one-a", "one-b", None]
    assert [r and r["label"] for r in results[2]] == [None, None, "two-a"]
    assert stats.batches == 2


# --- names, statement checks, key types, key_fn ----------------------------------------------


def test_a_lone_percent_sign_is_refused_at_construction(pg_pool: ConnectionPool[Any]) -> None:
    query = "SELECT id, name FROM people WHERE id = ANY(%(keys)s) AND name LIKE 'person%'"
    with pytest.raises(ValueError) as info:
        pg.loader(pg_pool, query, key="id")
    assert str(info.value) == (
        "sql has a lone '%' at offset 74 (\"KE 'person%'\"); psycopg reads '%' as the start"
        " of a placeholder: write a literal percent sign as '%%', as in \"name LIKE 'a%%'\""
    )
    with pytest.raises(ValueError, match=r"lone '%' at offset 47"):
        pg.loader(pg_pool, "SELECT id FROM people WHERE id = ANY(%(keys)s) %(x)d", key="id")


@pytest.mark.usefixtures("tables")
def test_a_doubled_percent_sign_runs_as_a_literal_one(pg_pool: ConnectionPool[Any]) -> None:
    query = "SELECT id, name FROM people WHERE id = ANY(%(keys)s) AND name LIKE 'person%%'"
    with pg.loader(pg_pool, query, key="id") as people:
        assert people.get(2, timeout=10) == {"id": 2, "name": "person 2"}


def test_loaders_are_named_after_their_table_and_key(pg_pool: ConnectionPool[Any]) -> None:
    composite = (
        'SELECT * FROM public."Stock" WHERE (a, b) IN (SELECT * FROM unnest(%(a)s, %(b)s))'
    )
    with (
        pg.loader(pg_pool, PEOPLE, key="id") as people,
        pg.loader(pg_pool, PETS, key="owner_id", many=True) as pets,
        pg.loader(pg_pool, composite, key=("a", "b")) as stock,
        pg.loader(pg_pool, "SELECT 1 AS id WHERE 1 = ANY(%(keys)s)", key="id") as no_table,
        pg.loader(pg_pool, PEOPLE, key="id", name="people by id") as named,
    ):
        assert [b.name for b in (people, pets, stock, no_table, named)] == [
            "pg:people.id",
            "pg:pets.owner_id",
            "pg:public.Stock.(a,b)",
            "pg:id",
            "people by id",
        ]


@pytest.mark.usefixtures("tables")
def test_a_key_of_the_wrong_type_fails_with_both_types(pg_pool: ConnectionPool[Any]) -> None:
    # The server casts the text array '{2}' to int[] and finds row 2; its key is 2, not "2".
    with pg.loader(pg_pool, PEOPLE, key="id") as people:
        wrong, right = people.load("2"), people.load(3)
        with pytest.raises(TypeError) as info:
            wrong.result(10)
        assert right.result(10) == {"id": 3, "name": "person 3"}
        assert people.get(99, timeout=10) is None  # a missing key of the right type
    assert str(info.value) == (
        "batchsync.pg: key '2' of loader 'pg:people.id': a str for column 'id', which holds"
        " int values, so it never matches a row; load int keys (e.g. int(value))"
    )
    with pg.loader(pg_pool, PETS, key="owner_id", many=True) as pets:
        with pytest.raises(TypeError, match=r"key '1' of loader 'pg:pets\.owner_id': a str"):
            pets.get("1", timeout=10)
        assert pets.get(3, timeout=10) == []


@pytest.mark.usefixtures("tables")
def test_key_fn_finds_the_rows_that_exist(pg_pool: ConnectionPool[Any]) -> None:
    # Keys as (id, label) pairs; key_fn picks the id. The query gets the raw keys' ids.
    query = "SELECT id, name FROM people WHERE id = ANY(%(keys)s)"
    with (
        pg.loader(pg_pool, query, key="id", key_fn=lambda k: k) as people,
        pg.loader(
            pg_pool, PETS, key="owner_id", many=True, key_fn=lambda k: ("owner", k)
        ) as pets,
        pg.loader(pg_pool, query, key="id", key_fn=str, missing="raise") as strict,
    ):
        assert people.get_many([1, 7, 2]) == [
            {"id": 1, "name": "person 1"},
            None,
            {"id": 2, "name": "person 2"},
        ]
        assert [len(p) for p in pets.get_many([1, 2, 3])] == [3, 1, 0]
        assert strict.get(4, timeout=10) == {"id": 4, "name": "person 4"}
        with pytest.raises(KeyError):
            strict.get(8, timeout=10)


# --- prepared statements ----------------------------------------------------------------------


@pytest.mark.usefixtures("tables")
@pytest.mark.parametrize(("prepare", "prepared"), [(False, 0), (None, 1), (True, 1)])
def test_the_statement_is_prepared_only_when_asked(
    pg_dsn: str, prepare: bool | None, prepared: int
) -> None:
    # prepare_threshold=0 on the connection: psycopg would prepare at the first run.
    kwargs = {"autocommit": True, "prepare_threshold": 0}
    with (
        ConnectionPool(pg_dsn, min_size=1, max_size=1, kwargs=kwargs, open=True) as pool,
        pg.loader(pool, PEOPLE, key="id", prepare=prepare) as people,
    ):
        for k in range(1, 6):
            assert people.get(k, timeout=10) == {"id": k, "name": f"person {k}"}
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%people%'",
                prepare=False,
            ).fetchone()
    assert row is not None and row[0] == prepared


def test_prepare_is_checked(pg_pool: ConnectionPool[Any]) -> None:
    with pytest.raises(TypeError, match="prepare must be False, None or True, got 'no'"):
        pg.loader(pg_pool, PEOPLE, key="id", prepare="no")  # type: ignore[call-overload]


# --- fork safety --------------------------------------------------------------------------------

FORK_SCRIPT = r"""
import os, sys
from psycopg_pool import ConnectionPool
from batchsync import ForkedPoolError, pg

dsn, case = sys.argv[1], sys.argv[2]
SQL = "SELECT id, name FROM people WHERE id = ANY(%(keys)s)"
kwargs = {"autocommit": True}
pool = ConnectionPool(dsn, min_size=1, max_size=1, kwargs=kwargs, open=case != "open_after")
people = None if case == "loader_after" else pg.loader(pool, SQL, key="id", name="people")
if case != "open_after":
    assert people is None or people.get(1, timeout=10)["name"] == "person 1"
pid = os.fork()
if pid == 0:
    try:
        if case == "open_after":
            pool.open(wait=True)
        if people is None:
            people = pg.loader(pool, SQL, key="id", name="people")
        print("child got", people.get(2, timeout=10)["name"], flush=True)
    except ForkedPoolError as exc:
        print("child refused:", exc, flush=True)
    os._exit(0)  # never let the child close the inherited connections
_, status = os.waitpid(pid, 0)
assert status == 0, status
if case != "open_after":
    loader = people or pg.loader(pool, SQL, key="id")
    print("parent got", loader.get(3, timeout=10)["name"], flush=True)
    loader.close()
pool.close()
"""


@pytest.mark.usefixtures("tables")
@pytest.mark.parametrize("case", ["loader_before", "loader_after", "open_after"])
def test_a_pool_opened_before_a_fork_is_refused_in_the_child(pg_dsn: str, case: str) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, pg_dsn, case],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    if case == "open_after":  # the documented setup: the pool opened after the fork
        assert lines == ["child got person 2"]
        return
    assert lines[1] == "parent got person 3"  # the parent's connections are intact
    # Made before the fork, the loader knows the parent; made after it, only that it was.
    where = r"process \d+" if case == "loader_before" else "another process"
    assert re.fullmatch(
        r"child refused: batchsync\.pg: loader 'people' refuses pool 'pool-\d+' in process"
        rf" \d+: the pool was opened in {where} before this process"
        r" was forked, so its connections are shared with that process and answers would"
        r" be mixed\. Open the pool in the process that uses it: ConnectionPool\(\.\.\.,"
        r" open=False\), then pool\.open\(\) after the fork \(gunicorn --preload: in the"
        r" post_fork hook or on the worker's first request\)",
        lines[0],
    ), lines[0]
