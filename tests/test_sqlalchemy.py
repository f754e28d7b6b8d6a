"""batchsync.sqlalchemy against a real PostgreSQL, then the Flask-SQLAlchemy shop under werkzeug.

The database is the demo's shop plus the notes table under row-level security
(``tests.webutil.shop_database``); the loaders connect as its app role, which is neither a
superuser nor the tables' owner, so the policy applies to them. Truth comes from psycopg
queries run as the owner.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("flask_sqlalchemy")
psycopg = pytest.importorskip("psycopg")

from flask_sqlalchemy.session import Session as FlaskSQLAlchemySession  # noqa: E402
from sqlalchemy import event, literal, select  # noqa: E402
from sqlalchemy.exc import DataError, MultipleResultsFound  # noqa: E402
from sqlalchemy.orm import (  # noqa: E402
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    object_session,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.orm.exc import DetachedInstanceError  # noqa: E402

from batchsync import sqlalchemy as bs  # noqa: E402
from tests.webutil import (  # noqa: E402
    TENANTS,
    DatabaseWatch,
    ShopDatabase,
    fetch_all,
    serve_werkzeug,
    served_statements,
    shop_database,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import flask_sqlalchemy_shop as shop_app  # noqa: E402
from flask_sqlalchemy_shop import Customer, Order  # noqa: E402  (plain mapped classes too)

pytestmark = pytest.mark.pg


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str]
    number: Mapped[int]
    body: Mapped[str]


class Token(Base):  # no table: only for key coercion, which runs before any query
    __tablename__ = "tokens"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)


class Recording:
    """Mixed into a Session class: records every thread that calls one of its methods.

    get_bind runs for every statement the session executes (queries, lazy loads, flushes),
    merge for every object attached to it, close at its end.
    """

    threads: set[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads = {threading.get_ident()}
        RECORDED.append(self)

    def _touched(self) -> None:
        self.threads.add(threading.get_ident())

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        self._touched()
        return super().get_bind(*args, **kwargs)  # type: ignore[misc]

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self._touched()
        return super().execute(*args, **kwargs)  # type: ignore[misc]

    def merge(self, *args: Any, **kwargs: Any) -> Any:
        self._touched()
        return super().merge(*args, **kwargs)  # type: ignore[misc]

    def close(self) -> None:
        self._touched()
        super().close()  # type: ignore[misc]


class RecordingSession(Recording, Session):
    pass


class RecordingFlaskSession(Recording, FlaskSQLAlchemySession):
    pass


RECORDED: list[Recording] = []


@pytest.fixture(scope="module")
def shop(pg_admin_dsn: str) -> Iterator[ShopDatabase]:
    with shop_database(pg_admin_dsn, "batchsync_sqla") as db:
        yield db


def make_engine(dsn: str, pool_size: int = 4, **options: Any) -> Any:
    return sa.create_engine(
        shop_app.engine_url(dsn), pool_size=pool_size, max_overflow=0, **options
    )


@pytest.fixture
def engine(shop: ShopDatabase) -> Iterator[Any]:
    """An engine connected as the app's role (neither superuser nor owner)."""
    engine = make_engine(shop.dsn)
    yield engine
    assert engine.pool.checkedout() == 0, "a batch kept its connection"
    engine.dispose()


@pytest.fixture
def sent(engine: Any) -> list[list[Any]]:
    """The keys of every statement the engine runs, as sent to the server."""
    calls: list[list[Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if isinstance(params, dict) and "batchsync_keys" in params:
            calls.append(list(params["batchsync_keys"]))

    event.listen(engine, "before_cursor_execute", record)
    return calls


def truth(db: ShopDatabase, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db.owner_dsn) as conn:
        return conn.execute(sql, params).fetchall()


def as_tuple(customer: Customer) -> tuple[Any, ...]:
    return (customer.id, customer.name, customer.email, customer.city)


# -- construction ------------------------------------------------------------------------------


def test_arguments_are_checked() -> None:
    engine = sa.create_engine("postgresql+psycopg://")  # never connects: nothing is loaded
    with pytest.raises(TypeError) as info:
        bs.loader("postgresql://", Customer)
    assert str(info.value) == (
        "batchsync: loader() takes an Engine, a sessionmaker, a scoped_session or a "
        "Flask-SQLAlchemy db, not 'postgresql://'"
    )
    with pytest.raises(TypeError, match=r"takes a mapped class or a select\(\.\.\.\), not 42"):
        bs.loader(engine, 42)
    with pytest.raises(ValueError) as info:
        bs.loader(engine, Customer, field="nmae")
    assert str(info.value) == (
        "batchsync: Customer has no column attribute 'nmae' "
        "(its column attributes: id, name, email, city)"
    )
    with pytest.raises(ValueError, match="no column attribute 'orders'"):
        bs.loader(engine, Customer, field="orders")  # a relationship is not a column
    with pytest.raises(ValueError) as info:
        bs.loader(engine, select(Customer.id, Customer.name), field="city")
    assert str(info.value) == (
        "batchsync: the select has no column 'city' to take the key from (its columns: id, name)"
    )
    with pytest.raises(ValueError, match=r"rows=True with select\(Customer\)"):
        bs.loader(engine, select(Customer), rows=True)
    with pytest.raises(ValueError, match="rows=False with a select of columns"):
        bs.loader(engine, select(Customer.id), rows=False)
    with pytest.raises(ValueError, match=r"one entity \(objects\) or only columns"):
        bs.loader(engine, select(Customer, Customer.name))
    with pytest.raises(ValueError, match="a composite key needs two or more fields"):
        bs.loader(engine, Note, field=("tenant",))
    with pytest.raises(TypeError, match="many must be a bool, not 1"):
        bs.loader(engine, Customer, many=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="session must be a callable"):
        bs.loader(engine, Customer, session=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the sessionmaker must be bound to an Engine"):
        bs.loader(sessionmaker(), Customer)
    with pytest.raises(ValueError, match="partition_setting needs the partition option"):
        bs.loader(engine, Note, partition_setting="app.tenant")


def test_keys_are_coerced_or_refused_at_load() -> None:
    engine = sa.create_engine("postgresql+psycopg://")  # bad keys fail before any query
    with bs.loader(engine, Customer) as customers, bs.loader(engine, Token) as tokens:
        with pytest.raises(ValueError, match=r"key 'abc' for Customer\.id is not an integer"):
            customers.load("abc")
        with pytest.raises(TypeError, match=r"key 1\.5 for Customer\.id must be an int, not float"):
            customers.load(1.5)
        with pytest.raises(TypeError, match=r"key True for Customer\.id must be an int, not bool"):
            customers.load(True)
        with pytest.raises(ValueError, match=r"key 'xyz' for Token\.id is not a UUID"):
            tokens.load("xyz")
        with pytest.raises(TypeError, match=r"key 7 for Token\.id must be a UUID, not int"):
            tokens.load(7)
    with bs.loader(engine, Note, field=("tenant", "number")) as notes, pytest.raises(
        TypeError, match=r"field=\('tenant', 'number'\) must be tuples of 2 values, not 'acme'"
    ):
        notes.load("acme")


# -- loading -----------------------------------------------------------------------------------


def test_objects_and_misses(shop: ShopDatabase, engine: Any, sent: list[list[Any]]) -> None:
    want = {r[0]: r for r in truth(shop, "SELECT * FROM customers WHERE id = ANY(%s)", [1, 3])}
    with bs.loader(engine, Customer) as customers:
        got = customers.get_many([3, "1", 99999, 3])
        assert [c and as_tuple(c) for c in got] == [want[3], want[1], None, want[3]]
        assert got[0] is got[3]
        assert customers.get(99999) is None
    # "1" is the key 1; duplicates are sent once.
    assert sent == [[3, 1, 99999], [99999]]


def test_many_in_the_statements_order(shop: ShopDatabase, engine: Any) -> None:
    rows = truth(
        shop, "SELECT customer_id, id FROM orders WHERE customer_id <= 20 ORDER BY id DESC"
    )
    want: dict[int, list[int]] = {}
    for customer_id, order_id in rows:
        want.setdefault(customer_id, []).append(order_id)
    ids = [*range(1, 21), 99999]
    stmt = select(Order).order_by(Order.id.desc())
    with bs.loader(engine, stmt, field="customer_id", many=True) as orders:
        got = orders.get_many(ids)
    assert [[o.id for o in os] for os in got] == [want.get(i, []) for i in ids]
    assert got[-1] == [] and any(len(os) > 1 for os in got) and [] in got[:-1]


def test_rows(shop: ShopDatabase, engine: Any) -> None:
    want = truth(shop, "SELECT id, name, email, city FROM customers WHERE id IN (2, 5)")
    with bs.loader(engine, Customer, rows=True) as rows, bs.loader(
        engine, select(Customer.name, Customer.id), field="id"
    ) as names:
        got = rows.get_many([2, 5, 99999])
        assert [tuple(r) for r in got[:2]] == want and got[2] is None
        assert got[0]._mapping["email"] == want[0][2]
        assert [tuple(r) for r in names.get_many([5, 2])] == [(want[1][1], 5), (want[0][1], 2)]


def test_composite_keys(shop: ShopDatabase) -> None:
    owner = make_engine(shop.owner_dsn)  # the owner is not subject to the notes' policy
    try:
        with bs.loader(owner, Note, field=("tenant", "number")) as notes:
            got = notes.get_many([("globex", 2), ("acme", "7"), ("acme", 99)])
        assert [n and n.body for n in got] == ["globex note 2", "acme note 7", None]
    finally:
        owner.dispose()


def test_two_rows_for_one_key_fail_only_that_key(engine: Any, shop: ShopDatabase) -> None:
    counts = dict(truth(shop, "SELECT customer_id, count(*) FROM orders GROUP BY customer_id"))
    many = next(c for c, n in counts.items() if n > 1)
    one = next(c for c, n in counts.items() if n == 1)
    with bs.loader(engine, Order, field="customer_id") as order_of:
        futures = order_of.load_many([many, one])
        with pytest.raises(MultipleResultsFound, match=f"one Order has customer_id={many};"):
            futures[0].result(10)
        assert futures[1].result(10).customer_id == one


def test_a_failing_statement_fails_only_its_batch(engine: Any) -> None:
    stmt = select(Customer.id, (literal(10) / (Customer.id - 3)).label("x"))
    with bs.loader(engine, stmt) as ratios:
        bad = ratios.load_many([2, 3])  # one batch: 10 / 0 for key 3 fails it whole
        for future in bad:
            with pytest.raises(DataError, match="division by zero"):
                future.result(10)
        assert [r.x for r in ratios.get_many([1, 2], timeout=10)] == [-5, -10]
        stats = ratios.stats()
    assert (stats.batches, stats.failed_batches) == (2, 1)


@pytest.mark.timeout(120)
def test_no_connection_leaks_over_2000_requests(shop: ShopDatabase) -> None:
    app_name = f"batchsync_leak_{uuid.uuid4().hex[:8]}"
    engine = make_engine(shop.dsn, connect_args={"application_name": app_name})
    stmt = select(Customer.id, (literal(10) / (Customer.id - 3)).label("x"))
    requests, threads = 2000, 16
    errors: list[BaseException] = []
    peak = [0]
    with DatabaseWatch(shop.admin_dsn, shop.dbname) as watch, bs.loader(
        engine, Customer
    ) as customers, bs.loader(engine, stmt, window=0) as ratios:
        start = threading.Barrier(threads)

        def client(n: int) -> None:
            rng = random.Random(n)
            start.wait(10)
            for i in range(requests // threads):
                ids = [rng.randint(1, 600) for _ in range(5)]
                try:
                    got = customers.get_many(ids, timeout=10)
                    assert [c and c.id for c in got] == [i if i <= 500 else None for i in ids]
                    if i % 10 == 0:  # every tenth request also runs a failing statement
                        with pytest.raises(DataError):
                            ratios.get(3, timeout=10)
                except BaseException as exc:
                    errors.append(exc)
                    return

        def watch_backends() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], watch.backends(application_name=app_name))
                done.wait(0.05)

        done = threading.Event()
        watcher = threading.Thread(target=watch_backends)
        watcher.start()
        clients = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        done.set()
        watcher.join()
        assert not errors, errors[0]
        assert engine.pool.checkedout() == 0
        assert 1 <= peak[0] <= 4  # the pool's size: no batch opened one of its own
        engine.dispose()
        assert watch.wait_backends(0, application_name=app_name) == 0


@pytest.mark.timeout(30)
def test_other_databases_get_in(tmp_path: Path) -> None:
    # Not PostgreSQL: an expanding IN instead of = ANY, composite keys as row values.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'notes.db'}")
    Note.__table__.create(engine)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(Note.__table__.insert(), [  # type: ignore[attr-defined]
            {"id": i, "tenant": t, "number": i, "body": f"{t} {i}"}
            for i, t in enumerate(TENANTS * 3, start=1)
        ])
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        with bs.loader(engine, Note, field="number") as notes, bs.loader(
            engine, Note, field=("tenant", "number")
        ) as by_tenant:
            assert [n and n.body for n in notes.get_many([2, "5", 99])] == [
                "globex 2", "acme 5", None
            ]
            assert [n and n.number for n in by_tenant.get_many([("acme", 3), ("acme", 2)])] == [
                3, None
            ]
        assert " IN (" in statements[0] and "ANY" not in statements[0]
    finally:
        engine.dispose()


# -- sessions and threads ----------------------------------------------------------------------


def test_objects_join_the_callers_session_in_its_thread(shop: ShopDatabase) -> None:
    # Each request's session keeps a connection from its first lazy load until it is
    # removed, and the batches need theirs: a pool for all of them.
    threads = 16
    engine = make_engine(shop.dsn, pool_size=threads + 2)
    want: dict[int, list[int]] = {}
    for customer_id, order_id in truth(shop, "SELECT customer_id, id FROM orders ORDER BY id"):
        want.setdefault(customer_id, []).append(order_id)
    RECORDED.clear()
    requests = scoped_session(sessionmaker(engine, class_=RecordingSession))
    start = threading.Barrier(threads)
    errors: list[BaseException] = []
    mine: dict[int, Session] = {}

    def request(n: int) -> None:
        try:
            session = mine[n] = requests()
            start.wait(10)
            ids = [n * 3 + 1, n * 3 + 2, n * 3 + 3, 1]  # customer 1 is in every batch
            found = customers.get_many(ids)
            for c in found:
                assert object_session(c) is session  # not the batch's, not another thread's
                # A lazy load, on the request's own session:
                assert [o.id for o in c.orders] == want.get(c.id, [])
            assert customers.get(ids[0]) is found[0]
        except BaseException as exc:
            errors.append(exc)
        finally:
            requests.remove()

    # A window long enough for all 16 to share batches, so objects of one batch go to
    # many sessions.
    with bs.loader(requests, Customer, window=0.2, eager=False) as customers:
        workers = [threading.Thread(target=request, args=(n,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stats = customers.stats()
    engine.dispose()
    assert not errors, errors[0]
    assert stats.batches < threads  # the requests shared batches (customer 1 at least)
    request_sessions = {id(s) for s in mine.values()}
    batch_sessions = [s for s in RECORDED if id(s) not in request_sessions]
    assert len(request_sessions) == threads and batch_sessions
    shared = [s for s in RECORDED if len(s.threads) != 1]
    assert not shared, f"{len(shared)} sessions used from two threads"


def test_without_a_session_objects_are_detached(engine: Any) -> None:
    with bs.loader(engine, Customer) as customers:
        customer = customers.get(1)
    assert object_session(customer) is None and customer.name == "Customer 1"
    with pytest.raises(DetachedInstanceError, match="lazy load operation of attribute 'orders'"):
        customer.orders  # noqa: B018


def test_futures_hold_detached_objects_that_attach(engine: Any) -> None:
    with Session(engine) as session, bs.loader(
        engine, select(Order).order_by(Order.id), field="customer_id", many=True,
        session=lambda: session,
    ) as orders:
        detached = orders.load(1).result(10)
        assert detached and all(object_session(o) is None for o in detached)
        attached = orders.attach(detached)
        assert [o.id for o in attached] == [o.id for o in detached]
        assert all(object_session(o) is session for o in attached)
        assert orders.get(1) == attached  # the session's own instances, found again


def test_loader_options_load_relationships_that_attach_with_their_object(
    shop: ShopDatabase, engine: Any, sent: list[list[Any]]
) -> None:
    from sqlalchemy.orm import selectinload

    want = [r[0] for r in truth(shop, "SELECT id FROM orders WHERE customer_id = 1 ORDER BY id")]
    statements: list[str] = []
    stmt = select(Customer).options(selectinload(Customer.orders))
    with Session(engine) as session, bs.loader(
        engine, stmt, session=lambda: session
    ) as customers:
        customer = customers.get(1)
        event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        assert [o.id for o in customer.orders] == want  # loaded by the batch: no lazy load
        assert all(object_session(o) is session for o in customer.orders)
    assert statements == [] and len(sent) == 1


# -- row-level security ------------------------------------------------------------------------


@pytest.mark.parametrize("isolation_level", [None, "AUTOCOMMIT"])
def test_partition_setting_applies_row_level_security(
    shop: ShopDatabase, isolation_level: str | None
) -> None:
    options = {"isolation_level": isolation_level} if isolation_level else {}
    engine = make_engine(shop.dsn, **options)
    tenant = threading.local()
    try:
        with engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT rolsuper, rolbypassrls, pg_has_role(current_user, tableowner, 'MEMBER')"
                " FROM pg_roles, pg_tables WHERE rolname = current_user AND tablename = 'notes'"
            ).one()
        assert tuple(row) == (False, False, False)  # neither superuser nor the owner
        with bs.loader(
            engine, Note, field="number", partition=lambda: tenant.id,
            partition_setting="app.tenant", window=0.05,
        ) as notes:
            results: dict[str, list[Any]] = {}
            start = threading.Barrier(2)

            def serve(name: str) -> None:
                tenant.id = name
                start.wait(10)
                results[name] = [n and n.body for n in notes.get_many([1, 2, 21], timeout=10)]

            workers = [threading.Thread(target=serve, args=(t,)) for t in TENANTS]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            assert notes.stats().batches == 2
        for name in TENANTS:
            assert results[name] == [f"{name} note 1", f"{name} note 2", None]
        if isolation_level == "AUTOCOMMIT":  # the batch's transaction did not stay behind
            with engine.connect() as conn:
                assert conn.connection.dbapi_connection.autocommit  # type: ignore[union-attr]
        # The same role without the partition (so without the setting) sees no note:
        # the test above proves something only because of this.
        with bs.loader(engine, Note, field="number") as unpartitioned:
            assert unpartitioned.get_many([1, 2]) == [None, None]
    finally:
        engine.dispose()


# -- Flask-SQLAlchemy: the shop under werkzeug's threaded server -----------------------------


def test_a_flask_sqlalchemy_loader_needs_the_app_context_of_the_loading_thread() -> None:
    with bs.loader(shop_app.db, shop_app.Customer) as customers, pytest.raises(
        RuntimeError, match="Working outside of application context"
    ):
        customers.load(1)  # which app's engine? the loading thread must say


def test_one_flask_sqlalchemy_loader_serves_each_app_on_its_own_engine(shop: ShopDatabase) -> None:
    apps = [shop_app.create_app(shop.dsn), shop_app.create_app(shop.dsn)]
    ran_on: list[Any] = []  # the engine of each batch's statement

    def record(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if isinstance(params, dict) and "batchsync_keys" in params:
            ran_on.append(conn.engine)

    engines = []
    for app in apps:
        with app.app_context():
            engine = shop_app.db.engine
        event.listen(engine, "before_cursor_execute", record)
        engines.append(engine)
    start = threading.Barrier(2)
    try:
        with bs.loader(shop_app.db, Customer, window=0.5) as customers:

            def load(app: Any) -> Any:
                with app.app_context():
                    start.wait(10)
                    return customers.load(1)  # a future: the window stays open for both

            futures: list[Any] = []
            workers = [
                threading.Thread(target=lambda a=a: futures.append(load(a))) for a in apps
            ]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            assert [f.result(10).name for f in futures] == ["Customer 1"] * 2
            assert customers.stats().batches == 2  # one per app: never mixed
        assert sorted(map(id, ran_on)) == sorted(map(id, engines))
    finally:
        for app in apps:
            shop_app.close_app(app)


def page_truth(db: ShopDatabase, number: int) -> bytes:
    from psycopg_pool import ConnectionPool

    from batchsync.demo._shop import bulk_page

    with ConnectionPool(db.owner_dsn, min_size=1, max_size=1, open=True) as pool:
        return json.dumps(bulk_page(pool, shop_app.page_ids(number)), default=str).encode()


@pytest.fixture
def served(shop: ShopDatabase) -> Iterator[str]:
    app = shop_app.create_app(shop.dsn)
    try:
        with serve_werkzeug(app) as url:
            yield url
    finally:
        shop_app.close_app(app)


MODES = ("naive", "selectin", "batched", "detached")


@pytest.mark.web
def test_three_modes_serve_identical_pages(shop: ShopDatabase, served: str) -> None:
    urls = [f"{served}/page/{n}/{mode}" for n in range(10) for mode in MODES]
    replies = fetch_all(urls)  # 16 client threads
    assert [r.status for r in replies] == [200] * len(urls), replies[0].body[:300]
    for n in range(10):
        want = page_truth(shop, n)
        modes = len(MODES)
        assert [r.body for r in replies[modes * n : modes * n + modes]] == [want] * modes, n


def count_statements(db: ShopDatabase, urls: list[str]) -> tuple[int, list[Any]]:
    """Serve urls from a fresh app; return the statements the server counted, and replies."""
    with DatabaseWatch(db.admin_dsn, db.dbname) as watch:
        app = shop_app.create_app(db.dsn)
        return served_statements(watch, app, urls, shop_app.close_app, shop_app.warm_app)


@pytest.mark.web
def test_statements_per_page_counted_by_the_server(shop: ShopDatabase) -> None:
    (orders,) = truth(
        shop, "SELECT count(*) FROM orders WHERE customer_id = ANY(%s)", shop_app.page_ids(3)
    )[0]
    assert count_statements(shop, ["/page/3/batched"])[0] == 3
    assert count_statements(shop, ["/page/3/selectin"])[0] == 3
    assert count_statements(shop, ["/page/3/detached"])[0] == 3
    # + 2: psycopg prepares a statement on its fifth run, and the server counts the
    # Parse round trip as one more transaction; the lazy loads repeat two statements.
    assert count_statements(shop, ["/page/3/naive"])[0] == 1 + 50 + orders + 2


@pytest.mark.web
def test_concurrent_pages_share_statements(shop: ShopDatabase) -> None:
    pages = 32
    statements, replies = count_statements(
        shop, [f"/page/{n % 10}/batched" for n in range(pages)]
    )
    assert [r.status for r in replies] == [200] * pages
    assert statements < 3 * pages


@pytest.mark.web
def test_sessions_and_threads_under_the_server(
    shop: ShopDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Request sessions are db.session's, made of a recording class; every session of the
    # process (the batches' too) is also watched through the ORM's execute event.
    RECORDED.clear()
    monkeypatch.setattr(shop_app.db.session.session_factory, "class_", RecordingFlaskSession)
    seen: dict[Session, set[int]] = {}

    def on_execute(state: Any) -> None:
        seen.setdefault(state.session, set()).add(threading.get_ident())

    event.listen(Session, "do_orm_execute", on_execute)
    app = shop_app.create_app(shop.dsn)
    try:
        with serve_werkzeug(app) as url:
            cids = list(range(1, 41))
            urls = [f"{url}/customers/{cid}/orders" for cid in cids]
            urls += [f"{url}/page/{n % 4}/batched" for n in range(24)]
            replies = fetch_all(urls)
    finally:
        event.remove(Session, "do_orm_execute", on_execute)
        shop_app.close_app(app)
    bodies = [r.body.decode() for r in replies]
    assert [r.status for r in replies] == [200] * len(urls), bodies[0][:300]
    for cid, body in zip(cids, bodies, strict=False):
        want = truth(shop, "SELECT id FROM orders WHERE customer_id = %s ORDER BY id", cid)
        assert [o["id"] for o in json.loads(body)] == [w[0] for w in want]
    for n, body in enumerate(bodies[len(cids) :]):
        assert body.encode() == page_truth(shop, n % 4)
    assert len(RECORDED) >= len(cids)  # the lazy loads ran on request sessions
    assert all(len(s.threads) == 1 for s in RECORDED)
    batch_sessions = [s for s in seen if not isinstance(s, Recording)]
    assert batch_sessions
    assert all(len(threads) == 1 for threads in seen.values())
