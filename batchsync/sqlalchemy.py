"""SQLAlchemy loaders: one ``SELECT ... WHERE <field> = ANY(:keys)`` per batch.

::

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import scoped_session, sessionmaker
    from batchsync import sqlalchemy as bs

    engine = create_engine("postgresql+psycopg:///shop")
    Session = scoped_session(sessionmaker(engine))      # the request's session, per thread

    customers = bs.loader(Session, Customer)            # id -> Customer | None
    orders_of = bs.loader(Session, select(Order).order_by(Order.id),
                          field="customer_id", many=True)   # customer id -> [Order]
    customers.get(42).orders        # a Customer of Session(): lazy loads work

With Flask-SQLAlchemy, pass the ``db`` object: ``loader(db, Customer)``.

How delivered ORM objects stay safe. A batch serves the keys of many threads, so it runs
in a short session of its own, on a connection of its own, in the thread that runs the
batch, and closes both before it delivers: the objects it loaded are detached, with their
column attributes (and whatever the statement's loader options loaded) in place, and no
session is ever used by two threads. ``get`` and ``get_many`` then attach each object to
the *caller's* session, in the caller's thread: the instance already in that session's
identity map if there is one (as a query would), else a copy made by
``Session.merge(obj, load=False)``, which runs no SQL. So the request works with objects
of its own session, and lazy loads run on it as usual. Futures (``load``, ``load_many``,
``batchsync.aload``) hold the batch's detached objects; ``Loader.attach(value)`` attaches
them. Without a caller's session (``session=None``) the detached objects are delivered as
they are: shared by every caller of the batch, to be treated as read-only, and a lazy load
on one raises ``sqlalchemy.orm.exc.DetachedInstanceError``.
"""

from __future__ import annotations

import enum
import logging
import sys
import uuid
from collections.abc import Callable, Hashable, Sequence
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

try:
    import sqlalchemy as sa
    from sqlalchemy import orm
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.exc import MultipleResultsFound
    from sqlalchemy.sql import Select
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchsync.sqlalchemy needs SQLAlchemy 2: pip install 'batchsync[sqlalchemy]'"
    ) from exc

from batchsync import Batcher, current_partition
from batchsync._scope import SET_PARTITION_SQL, check_partition_setting
from batchsync._types import BatcherOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AUTO", "Loader", "loader"]

logger = logging.getLogger("batchsync")


class _Default(enum.Enum):
    AUTO = "auto"


#: The default of ``loader(session=...)``: the session the bind implies (see ``loader``).
AUTO = _Default.AUTO

SessionFn = Callable[[], orm.Session]


class Loader(Batcher[Any, Any]):
    """A Batcher whose ``get`` and ``get_many`` attach ORM objects to the caller's session.

    Made by ``loader()``; everything else is ``batchsync.Batcher``'s.
    """

    def __init__(
        self,
        query: _Query,
        session: SessionFn | None,
        **options: Any,
    ) -> None:
        super().__init__(query, **options)
        self._session = session
        self._many = query.many

    def get(self, key: Any, timeout: float | None = None) -> Any:
        """Return the value of key; ORM objects belong to the caller's session (see attach)."""
        return self.attach(super().get(key, timeout))

    def get_many(self, keys: Any, timeout: float | None = None) -> list[Any]:
        """Return the values of keys in order, attached like ``get``'s."""
        values = super().get_many(keys, timeout)
        if self._session is None:
            return values
        session = self._session()
        return [None if v is None else self._attach(session, v) for v in values]

    def attach(self, value: Any) -> Any:
        """Return value (an object, a list of them, or None) in the caller's session.

        For values taken from ``load()`` futures; call it in the thread that owns the
        session. Without a caller's session (``session=None``, rows) return value unchanged.
        """
        if self._session is None or value is None:
            return value
        return self._attach(self._session(), value)

    def _attach(self, session: orm.Session, value: Any) -> Any:
        if self._many:
            return [_attach_one(session, obj) for obj in value]
        return _attach_one(session, value)


def _attach_one(session: orm.Session, obj: Any) -> Any:
    # An instance the session already has wins, unchanged: its pending changes are the
    # request's own, and a query would not overwrite them either.
    key = sa.inspect(obj).key
    if key is not None:
        present = session.identity_map.get(key)
        if present is not None:
            return present
    return session.merge(obj, load=False)


# -- what a loader is made of ------------------------------------------------------------


class _Bind:
    """Where batches get their engine and session, and the caller's session by default."""

    def __init__(
        self,
        engine: Engine | None,
        engine_of_app: Callable[[], Engine] | None,
        make_session: Callable[[Connection], orm.Session],
        session: SessionFn | None,
    ) -> None:
        self.engine = engine  # None: the app's engine, found in the loading thread
        self.engine_of_app = engine_of_app
        self.make_session = make_session
        self.session = session


def _flask_sqlalchemy(bind: object) -> bool:
    module = sys.modules.get("flask_sqlalchemy")
    return module is not None and isinstance(bind, module.SQLAlchemy)


def _resolve_bind(bind: object, bind_key: str | None) -> _Bind:
    if isinstance(bind, Engine):
        return _Bind(bind, None, lambda conn: orm.Session(bind=conn), None)
    if isinstance(bind, orm.scoped_session):
        factory = bind.session_factory
        return _Bind(_engine_of(factory), None, lambda conn: factory(bind=conn), bind)
    if isinstance(bind, orm.sessionmaker):
        factory = bind
        return _Bind(_engine_of(factory), None, lambda conn: factory(bind=conn), None)
    if _flask_sqlalchemy(bind):
        db: Any = bind

        def engine_of_app() -> Engine:
            # Called in the loading thread, which has the app context the worker lacks.
            engines = db.engines
            try:
                engine: Engine = engines[bind_key]
            except KeyError:
                raise ValueError(
                    f"batchsync: the app has no engine for bind key {bind_key!r} "
                    "(SQLALCHEMY_BINDS)"
                ) from None
            return engine

        # Flask-SQLAlchemy's Session picks its engine through the app context, which a
        # batch does not have: the batch's own session is a plain one on its connection.
        return _Bind(None, engine_of_app, lambda conn: orm.Session(bind=conn), db.session)
    raise TypeError(
        "batchsync: loader() takes an Engine, a sessionmaker, a scoped_session or a "
        f"Flask-SQLAlchemy db, not {bind!r}"
    )


def _engine_of(factory: orm.sessionmaker[Any]) -> Engine:
    engine = factory.kw.get("bind")
    if isinstance(engine, Engine):
        return engine
    raise TypeError(
        "batchsync: the sessionmaker must be bound to an Engine (sessionmaker(engine)), "
        f"not {engine!r}: a batch opens a connection of its own in another thread"
    )


# -- the statement -------------------------------------------------------------------------


def _same(key: Any) -> Any:
    return key


def _coercer(label: str, column_type: Any) -> Callable[[Any], Any]:
    """Return the function that turns a key into the Python value of the column's type."""
    try:
        python_type = column_type.python_type
    except NotImplementedError:
        return _same
    if python_type is int:

        def to_int(key: Any) -> int:
            if isinstance(key, int) and not isinstance(key, bool):
                return key
            if isinstance(key, str):
                try:
                    return int(key)
                except ValueError:
                    raise ValueError(
                        f"batchsync: key {key!r} for {label} is not an integer"
                    ) from None
            raise TypeError(f"batchsync: key {key!r} for {label} must be an int, not "
                            f"{type(key).__name__}")

        return to_int
    if python_type is str:

        def to_str(key: Any) -> str:
            if isinstance(key, str):
                return key
            if isinstance(key, int) and not isinstance(key, bool):
                return str(key)
            raise TypeError(f"batchsync: key {key!r} for {label} must be a str, not "
                            f"{type(key).__name__}")

        return to_str
    if python_type is uuid.UUID:

        def to_uuid(key: Any) -> uuid.UUID:
            if isinstance(key, uuid.UUID):
                return key
            if isinstance(key, str):
                try:
                    return uuid.UUID(key)
                except ValueError:
                    raise ValueError(f"batchsync: key {key!r} for {label} is not a UUID") from None
            raise TypeError(f"batchsync: key {key!r} for {label} must be a UUID, not "
                            f"{type(key).__name__}")

        return to_uuid
    return _same


def _composite(
    coercers: list[Callable[[Any], Any]], fields: tuple[str, ...]
) -> Callable[[Any], Any]:
    width = len(coercers)

    def coerce(key: Any) -> tuple[Any, ...]:
        if not isinstance(key, tuple) or len(key) != width:
            raise TypeError(
                f"batchsync: keys of a loader with field={fields!r} must be tuples of "
                f"{width} values, not {key!r}"
            )
        return tuple(c(k) for c, k in zip(coercers, key, strict=True))

    return coerce


def _check_fields(field: object) -> tuple[str, ...]:
    if isinstance(field, str):
        if not field:
            raise ValueError("batchsync: field must name the key attribute, not ''")
        return (field,)
    if isinstance(field, tuple) and all(isinstance(f, str) and f for f in field):
        if len(field) < 2:
            raise ValueError(
                f"batchsync: a composite key needs two or more fields, not {field!r}; "
                "name a single field with a str"
            )
        if len(set(field)) != len(field):
            raise ValueError(f"batchsync: field names an attribute twice: {field!r}")
        return field
    raise TypeError(
        f"batchsync: field must be an attribute name (str) or a tuple of them, not {field!r}"
    )


class _Plan:
    """The statement, how to run it, and how to read the key back from what it returns."""

    def __init__(self, target: object, fields: tuple[str, ...], rows: bool | None) -> None:
        stmt: Select[Any]
        if isinstance(target, type):
            mapper: Any = sa.inspect(target, raiseerr=False)
            if not isinstance(mapper, orm.Mapper):
                raise TypeError(
                    "batchsync: loader() takes a mapped class or a select(...), "
                    f"not {target!r}"
                )
            self.name = target.__name__
            exprs = [self._attribute(target, mapper, f) for f in fields]
            if rows:
                attrs = [getattr(target, p.key) for p in mapper.column_attrs]
                stmt = sa.select(*attrs)
                self.orm = False
                self._positions = [
                    [p.key for p in mapper.column_attrs].index(f) for f in fields
                ]
            else:
                stmt = sa.select(target)
                self.orm = True
        elif isinstance(target, Select):
            stmt = target
            described = target.column_descriptions
            entities = [d for d in described if d.get("entity") is not None
                        and d.get("expr") is d.get("entity")]
            if entities and len(described) == 1:
                entity = entities[0]["entity"]
                mapper = sa.inspect(entity).mapper
                self.name = mapper.class_.__name__
                if rows:
                    raise ValueError(
                        f"batchsync: rows=True with select({self.name}): select its columns "
                        "for rows, or leave rows out for objects"
                    )
                exprs = [self._attribute(entity, mapper, f) for f in fields]
                self.orm = True
            elif entities:
                raise ValueError(
                    "batchsync: the select must return one entity (objects) or only columns "
                    f"(rows), not {', '.join(str(d['name']) for d in described)}"
                )
            else:
                if rows is False:
                    raise ValueError(
                        "batchsync: rows=False with a select of columns: it returns rows; "
                        "select an entity for objects"
                    )
                columns = target.selected_columns
                names = list(columns.keys())
                for f in fields:
                    if f not in columns:
                        raise ValueError(
                            f"batchsync: the select has no column {f!r} to take the key "
                            f"from (its columns: {', '.join(names)})"
                        )
                exprs = [columns[f] for f in fields]
                self._positions = [names.index(f) for f in fields]
                self.name = "select"
                self.orm = False
        else:
            raise TypeError(
                f"batchsync: loader() takes a mapped class or a select(...), not {target!r}"
            )
        self.fields = fields
        labels = [f"{self.name}.{f}" for f in fields]
        coercers = [_coercer(lb, e.type) for lb, e in zip(labels, exprs, strict=True)]
        if len(fields) == 1:
            self.coerce = coercers[0]
            expr = exprs[0]
            # PostgreSQL: one array parameter, so the text is the same for any batch size.
            self.pg_stmt: Select[Any] = stmt.where(
                expr == sa.any_(sa.bindparam("batchsync_keys", type_=postgresql.ARRAY(expr.type)))
            )
            self.stmt: Select[Any] = stmt.where(
                expr.in_(sa.bindparam("batchsync_keys", expanding=True))
            )
        else:
            self.coerce = _composite(coercers, fields)
            self.stmt = self.pg_stmt = stmt.where(
                sa.tuple_(*exprs).in_(sa.bindparam("batchsync_keys", expanding=True))
            )
        if self.orm:
            self.key_of: Callable[[Any], Any] = attrgetter(*fields)
        else:
            self.key_of = itemgetter(*self._positions)

    @staticmethod
    def _attribute(entity: Any, mapper: orm.Mapper[Any], field: str) -> Any:
        prop = mapper.attrs.get(field)
        if not isinstance(prop, orm.ColumnProperty) or len(prop.columns) != 1:
            columns = ", ".join(p.key for p in mapper.column_attrs)
            raise ValueError(
                f"batchsync: {mapper.class_.__name__} has no column attribute {field!r} "
                f"(its column attributes: {columns})"
            )
        return getattr(entity, field)


class _Query:
    """The batch function of a loader: one statement per batch, in a session of its own."""

    def __init__(
        self,
        bind: _Bind,
        plan: _Plan,
        many: bool,
        setting: str | None,
        ident: Callable[[Any], Hashable],
        app_partitioned: bool,
    ) -> None:
        self._app_partitioned = app_partitioned  # the partition is (engine, user's partition)
        self._bind = bind
        self._plan = plan
        self.many = many
        self._setting = setting
        self._ident = ident

    def __repr__(self) -> str:
        fields = ",".join(self._plan.fields)
        return f"<batchsync.sqlalchemy query {self._plan.name}.{fields} many={self.many}>"

    def __call__(self, keys: list[Any]) -> dict[Hashable, Any] | list[Any]:
        part: Any = current_partition()
        engine = self._bind.engine
        if engine is None:  # a Flask-SQLAlchemy app's engine, found in the loading thread
            engine, part = part if self._app_partitioned else (part, None)
        assert isinstance(engine, Engine)
        # A key that cannot be coerced fails alone (possible with the caller's own key_fn).
        coerced: list[Any] = []
        failed: dict[int, BaseException] = {}
        for i, key in enumerate(keys):
            try:
                coerced.append(self._plan.coerce(key))
            except (TypeError, ValueError) as exc:
                failed[i] = exc
        values = self._fetch(engine, part, coerced) if coerced else []
        logger.debug("sqlalchemy loader %r: %d keys, %d rows", self, len(keys), len(values))
        key_of = self._plan.key_of
        if self.many:
            groups: dict[Any, list[Any]] = {}
            for value in values:
                groups.setdefault(key_of(value), []).append(value)
            out: list[Any] = []
            it = iter(coerced)
            for i in range(len(keys)):
                out.append(failed[i] if i in failed else groups.get(next(it), []))
            return out
        # A mapping, so that the Batcher's `missing` option decides what an absent key gets.
        found: dict[Any, Any] = {}
        for value in values:
            k = key_of(value)
            if k in found:
                found[k] = MultipleResultsFound(
                    f"batchsync: more than one {self._plan.name} has "
                    f"{self._plan.fields if len(self._plan.fields) > 1 else self._plan.fields[0]}"
                    f"={k!r}; use many=True for a one-to-many loader"
                )
            else:
                found[k] = value
        result: dict[Hashable, Any] = {}
        it = iter(coerced)
        for i, key in enumerate(keys):
            if i in failed:  # only with the caller's own key_fn: ours refuses it at load
                result[self._ident(key)] = failed[i]
                continue
            c = next(it)
            if c in found:
                result[self._ident(key)] = found[c]
        return result

    def _fetch(self, engine: Engine, part: Hashable, coerced: list[Any]) -> Sequence[Any]:
        plan = self._plan
        stmt = plan.pg_stmt if engine.dialect.name == "postgresql" else plan.stmt
        params = {"batchsync_keys": coerced}
        with engine.connect() as conn:
            if self._setting is not None:
                # set_config(..., true) lasts until the end of the transaction, so the
                # setting and the query must share one: an engine in autocommit gets its
                # usual isolation level back for this connection (until it is returned).
                if getattr(conn.connection.dbapi_connection, "autocommit", False):
                    conn.execution_options(
                        isolation_level=conn.default_isolation_level or "READ COMMITTED"
                    )
                conn.exec_driver_sql(SET_PARTITION_SQL, (self._setting, str(part)))
            if not plan.orm:
                return conn.execute(stmt, params).all()
            # The batch's own session, on the batch's connection: closed before the objects
            # are delivered, so they are detached and no session outlives this thread's use.
            with self._bind.make_session(conn) as session:
                return session.execute(stmt, params).scalars().unique().all()


def loader(
    bind: Any,
    target: Any,
    field: str | tuple[str, ...] = "id",
    many: bool = False,
    *,
    rows: bool | None = None,
    session: SessionFn | _Default | None = AUTO,
    partition_setting: str | None = None,
    **batcher_options: Unpack[BatcherOptions],
) -> Loader:
    """Return a Loader (a Batcher) that loads by the value of ``field`` with one query a batch.

    ``bind`` is an Engine, a sessionmaker or scoped_session bound to one, or a
    Flask-SQLAlchemy ``db`` (the engine of the app serving the loading thread, found in
    that thread, so the worker needs no app context; ``__bind_key__`` is honoured).
    ``target`` is a mapped class or a ``select(...)``: of one entity for ORM objects
    (``select(Order).order_by(Order.id)``, loader options allowed), or of columns for
    Core rows; ``rows=True`` with a mapped class selects its columns as rows. Each batch
    runs the statement with ``WHERE <field> = ANY(:keys)`` on PostgreSQL (``IN`` on other
    databases; ``(a, b) IN (...)`` for a composite ``field=("a", "b")`` with tuple keys).

    ``many=False``: a key gets its object (row) or None (KeyError with
    ``missing="raise"``; ``MultipleResultsFound`` for that key when two match).
    ``many=True``: the list in the statement's order, ``[]`` when none. Keys go through
    the column's type (int, str, UUID), so ``"42"`` and ``42`` are one key of an integer
    column, and a key that cannot be one fails at ``load`` with TypeError or ValueError.

    ``session``: the caller's session, into which ``get`` and ``get_many`` attach ORM
    objects in the calling thread: a callable returning it, or None for the batch's
    detached objects. By default ``db.session`` for Flask-SQLAlchemy, the scoped_session
    itself when ``bind`` is one, else None.

    ``partition_setting`` (with the ``partition`` option): each batch runs
    ``set_config(<setting>, <partition>, true)`` in its transaction before its query, for
    row-level security. ``batcher_options`` go to ``batchsync.Batcher``; ``cache``
    defaults to "scope", ``inline`` to True. Raise TypeError or ValueError for a bad
    argument; the database is not contacted.
    """
    fields = _check_fields(field)
    if not isinstance(many, bool):
        raise TypeError(f"batchsync: many must be a bool, not {many!r}")
    if rows is not None and not isinstance(rows, bool):
        raise TypeError(f"batchsync: rows must be a bool or None, not {rows!r}")
    plan = _Plan(target, fields, rows)
    bind_key = _bind_key(target)
    resolved = _resolve_bind(bind, bind_key)
    check_partition_setting(partition_setting, batcher_options)
    if session is AUTO:
        attach_to = resolved.session
    elif session is None or callable(session):
        attach_to = session
    else:
        raise TypeError(
            "batchsync: session must be a callable returning the caller's Session "
            f"(a scoped_session is one) or None, not {session!r}"
        )
    if not plan.orm:
        attach_to = None  # rows are immutable and belong to no session
    ident: Callable[[Any], Hashable] = batcher_options.get("key_fn") or plan.coerce
    batcher_options.setdefault("key_fn", plan.coerce)
    batcher_options.setdefault("cache", "scope")
    # A batch opens its own connection and session and keeps nothing per thread, so a
    # waiting caller may run it in its own thread: no hand-over cost.
    batcher_options.setdefault("inline", True)
    batcher_options.setdefault("name", f"{plan.name}.{','.join(fields)}")
    engine_of_app = resolved.engine_of_app
    app_partitioned = False
    if engine_of_app is not None:
        # The app's engine travels with the keys as (part of) their partition: found in
        # the loading thread, it keeps the keys of two apps out of one batch as well.
        user_partition = batcher_options.get("partition")
        if user_partition is None:
            batcher_options["partition"] = engine_of_app
        else:
            user_fn = user_partition

            def partition() -> Hashable:
                return (engine_of_app(), user_fn())

            batcher_options["partition"] = partition
            app_partitioned = True
    query = _Query(resolved, plan, many, partition_setting, ident, app_partitioned)
    return Loader(query, attach_to, **batcher_options)


def _bind_key(target: object) -> str | None:
    """The Flask-SQLAlchemy bind key of the target's table (None: the default engine)."""
    tables: list[Any] = []
    if isinstance(target, type):
        mapper: Any = sa.inspect(target, raiseerr=False)
        if isinstance(mapper, orm.Mapper):
            tables = [mapper.local_table]
    elif isinstance(target, Select):
        tables = list(target.get_final_froms())
    for table in tables:
        metadata = getattr(table, "metadata", None)
        if metadata is not None and "bind_key" in metadata.info:
            key: str | None = metadata.info["bind_key"]
            return key
    return None
