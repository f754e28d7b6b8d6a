"""PostgreSQL loaders on psycopg 3: one SQL statement becomes a bulk loader.

`loader()` turns a statement that selects rows for an array of keys into a
`Batcher`: single-key loads made by many threads within the window become one
execution of the statement. The statement takes the whole batch as one array
parameter, so it has the same text whatever the batch size and PostgreSQL can
prepare it and keep its plan::

    from psycopg_pool import ConnectionPool
    from batchsync import pg

    pool = ConnectionPool("dbname=shop", open=True)
    customers = pg.loader(
        pool, "SELECT * FROM customers WHERE id = ANY(%(keys)s)", key="id"
    )
    orders = pg.loader(
        pool,
        "SELECT * FROM orders WHERE customer_id = ANY(%(keys)s) ORDER BY id",
        key="customer_id",
        many=True,
    )
    customers.get(42)         # {"id": 42, "name": ...} or None
    orders.get_many([1, 2])   # [[{...}, {...}], []]

`key` names the result column that holds the key. With ``many=False`` each key
gets its row, or None when the query returns none (with the Batcher option
``missing="raise"``, a KeyError); a key that gets two rows fails with
`BatchError`. With ``many=True`` each key gets the list of its rows in the
order the query returned them, ``[]`` when there are none.

Composite keys: pass a tuple of column names as `key` and load tuples. The
statement gets one array per key column, each under a placeholder named after
its column, in the order of the keys; match them with ``unnest``, which walks
parallel arrays side by side::

    stock = pg.loader(
        pool,
        '''
        SELECT * FROM stock
        WHERE (tenant_id, sku) IN (
            SELECT * FROM unnest(%(tenant_id)s::int[], %(sku)s::text[])
        )
        ''',
        key=("tenant_id", "sku"),
    )
    stock.get((7, "A-100"))

Each batch borrows a connection with ``pool.connection()`` for its one query
and gives it back; no connection is held while keys wait for the window. A
batch that fails (statement error, ``statement_timeout``, lost server, a key
psycopg cannot adapt) fails its keys with the psycopg exception; the pool
replaces a broken connection and the next batch runs normally.

Poolers: the statement is executed with ``prepare=False`` unless the loader
is made with ``prepare=None`` (the connection's ``prepare_threshold``) or
``prepare=True``: a server-side prepared statement lives on one server
session, and a transaction-pooling PgBouncer (before 1.21) sends later
executions to other sessions, where its name may be another statement. With
preparing on, a result whose columns differ from the first one's fails its
batch with `BatchError` instead of being read as rows of this statement.

Forks: a pool open when the process forks is refused in the child
(`ForkedPoolError`, before any connection is touched); open it after the
fork (gunicorn ``--preload``: in the worker).

Key types: a key that cannot equal its column's values (the str ``"42"`` for
an ``int`` column) fails alone with TypeError naming both types, instead of
reading None for a row the server found. The default name is
``pg:<table>.<key>`` (the statement's first ``FROM``); pass ``name=`` to choose.

Row-level security: with ``partition=`` (a Batcher option, called in the
loading thread) and ``partition_setting="app.tenant_id"``, each batch runs
``SELECT set_config('app.tenant_id', <partition>, true)`` in the same
transaction as its query, so a policy such as
``USING (tenant_id = current_setting('app.tenant_id')::int)`` sees the
partition of the keys it serves. Keys of different partitions never share a
batch.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import date, datetime, time
from decimal import Decimal
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

try:
    import psycopg
    from psycopg.rows import DictRow, RowFactory, dict_row, tuple_row
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchsync.pg needs psycopg 3 and psycopg_pool: pip install 'batchsync[pg]'"
    ) from exc

from batchsync import Batcher, current_partition
from batchsync._scope import SET_PARTITION_SQL, check_partition_setting
from batchsync._types import BatcherOptions
from batchsync.errors import BatchError, ForkedPoolError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["loader"]

R = TypeVar("R")

logger = logging.getLogger("batchsync")

# A psycopg placeholder: "%%" (a literal percent), "%(name)s" or "%s"; the
# format letter may also be b (binary) or t (automatic). Any other "%" (a LIKE
# pattern's 'a%') is a lone percent sign that psycopg refuses at execution.
_PLACEHOLDER = re.compile(r"%(?:%|\((?P<name>[^)]*)\)[sbt]|[sbt]|(?P<lone>))")



@overload
def loader(
    pool: ConnectionPool[Any],
    sql: str,
    *,
    key: str | tuple[str, ...],
    many: Literal[False] = False,
    row_factory: RowFactory[R],
    partition_setting: str | None = None,
    prepare: bool | None = False,
    **batcher_options: Unpack[BatcherOptions],
) -> Batcher[Any, R | None]: ...


@overload
def loader(
    pool: ConnectionPool[Any],
    sql: str,
    *,
    key: str | tuple[str, ...],
    many: Literal[True],
    row_factory: RowFactory[R],
    partition_setting: str | None = None,
    prepare: bool | None = False,
    **batcher_options: Unpack[BatcherOptions],
) -> Batcher[Any, list[R]]: ...


@overload
def loader(
    pool: ConnectionPool[Any],
    sql: str,
    *,
    key: str | tuple[str, ...],
    many: Literal[False] = False,
    partition_setting: str | None = None,
    prepare: bool | None = False,
    **batcher_options: Unpack[BatcherOptions],
) -> Batcher[Any, DictRow | None]: ...


@overload
def loader(
    pool: ConnectionPool[Any],
    sql: str,
    *,
    key: str | tuple[str, ...],
    many: Literal[True],
    partition_setting: str | None = None,
    prepare: bool | None = False,
    **batcher_options: Unpack[BatcherOptions],
) -> Batcher[Any, list[DictRow]]: ...


def loader(
    pool: ConnectionPool[Any],
    sql: str,
    *,
    key: str | tuple[str, ...],
    many: bool = False,
    row_factory: RowFactory[Any] = dict_row,
    partition_setting: str | None = None,
    prepare: bool | None = False,
    **batcher_options: Unpack[BatcherOptions],
) -> Batcher[Any, Any]:
    """Return a Batcher that loads rows by key with one `sql` query per batch.

    `sql` selects the rows for ``%(keys)s``, the array of the batch's keys
    (``WHERE id = ANY(%(keys)s)``); with a composite `key`, for one array per
    key column, each named after its column. `key` names the result column(s)
    holding the key. `row_factory` builds each row (a dict by default).
    `partition_setting` names a setting to set to the batch's partition for
    its transaction (needs the ``partition`` option). `prepare` goes to
    psycopg's ``execute``: False (the default) never prepares the statement on
    the server, which is what transaction-pooling PgBouncer needs; None leaves
    it to the connection's ``prepare_threshold``; True prepares it at once.
    `batcher_options` go to `Batcher` unchanged; the default ``name`` is
    ``pg:<table>.<key>`` after the statement's first ``FROM``.

    Raise TypeError or ValueError when an argument is not what is described
    here; the database is not contacted.
    """
    if not isinstance(pool, ConnectionPool):
        raise TypeError(f"pool must be a psycopg_pool.ConnectionPool, got {pool!r}")
    columns = _check_key(key)
    _check_sql(sql, key)
    if not isinstance(many, bool):
        raise TypeError(f"many must be a bool, got {many!r}")
    if not callable(row_factory):
        raise TypeError(f"row_factory must be a psycopg row factory, got {row_factory!r}")
    if prepare is not None and not isinstance(prepare, bool):
        raise TypeError(f"prepare must be False, None or True, got {prepare!r}")
    check_partition_setting(partition_setting, batcher_options)
    name = batcher_options.get("name") or _default_name(sql, columns)
    batcher_options["name"] = name
    _watch(pool)
    query = _Query(
        pool,
        sql,
        key,
        columns,
        many,
        row_factory,
        partition_setting,
        prepare,
        batcher_options.get("key_fn"),
        name,
    )
    # The query borrows a pooled connection and keeps nothing per thread, so a waiting
    # caller may run it in its own thread (Batcher's inline option): no hand-over cost.
    batcher_options.setdefault("inline", True)
    return Batcher(query, **batcher_options)


# The first table the statement reads, for the loader's default name.
_FROM = re.compile(r"\bFROM\s+((?:\"[^\"]+\"|[\w$]+)(?:\.(?:\"[^\"]+\"|[\w$]+))?)", re.I)


def _default_name(sql: str, columns: tuple[str, ...]) -> str:
    keys = columns[0] if len(columns) == 1 else f"({','.join(columns)})"
    match = _FROM.search(sql)
    table = match.group(1).replace('"', "") if match else None
    return f"pg:{table}.{keys}" if table else f"pg:{keys}"


# -- fork safety ------------------------------------------------------------------------------
#
# A pool opened before os.fork() hands the child the parent's open sockets: both processes
# would talk to the same server sessions and read each other's answers (gunicorn --preload
# with the pool opened at import). psycopg_pool does not notice; its threads do not survive
# the fork either. So every pool a loader uses is watched, and in a forked child the pools
# that were open at the fork are marked: a batch on one fails with ForkedPoolError before it
# touches a connection. Nothing is "repaired" in the child: closing the inherited
# connections would end the parent's sessions too.

_pools: weakref.WeakSet[ConnectionPool[Any]] = weakref.WeakSet()
_inherited: weakref.WeakKeyDictionary[ConnectionPool[Any], int] = weakref.WeakKeyDictionary()


def _watch(pool: ConnectionPool[Any]) -> None:
    _pools.add(pool)
    # A pool opened in a parent and first given to a loader in the child: its threads did not
    # survive the fork (psycopg_pool's scheduler thread; private, hence the getattr).
    runner = getattr(pool, "_sched_runner", None)
    if not pool.closed and runner is not None and not runner.is_alive():
        _inherited.setdefault(pool, 0)


def _after_fork_in_child() -> None:
    parent = os.getppid()
    for pool in list(_pools):
        if not pool.closed:
            _inherited.setdefault(pool, parent)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _forked_pool_error(pool: ConnectionPool[Any], loader_name: str, parent: int) -> ForkedPoolError:
    where = f"process {parent}" if parent else "another process"
    return ForkedPoolError(
        f"batchsync.pg: loader {loader_name!r} refuses pool {pool.name!r} in process"
        f" {os.getpid()}: the pool was opened in {where} before this process was forked,"
        " so its connections are shared with that process and answers would be mixed."
        " Open the pool in the process that uses it: ConnectionPool(..., open=False), then"
        " pool.open() after the fork (gunicorn --preload: in the post_fork hook or on the"
        " worker's first request)"
    )


def _check_key(key: object) -> tuple[str, ...]:
    if isinstance(key, str):
        if not key:
            raise ValueError("key must name the result column holding the key, got ''")
        return (key,)
    if isinstance(key, tuple) and all(isinstance(c, str) and c for c in key):
        if len(key) < 2:
            raise ValueError(
                f"a composite key needs two or more columns, got {key!r};"
                " name a single key column with a str"
            )
        if len(set(key)) != len(key):
            raise ValueError(f"key names a column twice: {key!r}")
        return key
    raise TypeError(f"key must be a column name (str) or a tuple of column names, got {key!r}")


def _check_sql(sql: object, key: str | tuple[str, ...]) -> None:
    if not isinstance(sql, str):
        raise TypeError(f"sql must be a str, got {type(sql).__name__}")
    if isinstance(key, str):
        expected = {"keys"}
        example = "WHERE id = ANY(%(keys)s)"
    else:
        expected = set(key)
        arrays = ", ".join(f"%({c})s" for c in key)
        example = f"WHERE ({', '.join(key)}) IN (SELECT * FROM unnest({arrays}))"
    found: set[str] = set()
    for match in _PLACEHOLDER.finditer(sql):
        name = match.group("name")
        if name is not None:
            found.add(name)
        elif match.group("lone") is not None:
            at = match.start()
            raise ValueError(
                f"sql has a lone '%' at offset {at} ({sql[max(0, at - 10) : at + 10]!r});"
                " psycopg reads '%' as the start of a placeholder: write a literal percent"
                " sign as '%%', as in \"name LIKE 'a%%'\""
            )
        elif match.group() != "%%":
            raise ValueError(
                f"sql has a positional placeholder {match.group()!r}; the loader"
                f" passes only named ones, as in {example!r}"
            )
    missing = sorted(expected - found)
    if missing:
        names = ", ".join(f"%({n})s" for n in missing)
        raise ValueError(
            f"sql has no placeholder {names} for the batch's keys; write it as in {example!r}"
        )
    extra = sorted(found - expected)
    if extra:
        names = ", ".join(f"%({n})s" for n in extra)
        raise ValueError(
            f"sql has placeholder(s) {names} that the loader does not fill;"
            f" it fills only {', '.join(f'%({n})s' for n in sorted(expected))}"
        )


# The Python type psycopg gives the values of a key column, by type oid: a key of another
# type never equals a row's key (the server may still cast it and find the row, as
# ``id = ANY('{42}')`` does for the str "42"), so such a key fails instead of reading None.
_KEY_TYPES: dict[int, type] = {
    16: bool,
    17: bytes,
    19: str,
    20: int,
    21: int,
    23: int,
    25: str,
    26: int,
    1042: str,
    1043: str,
    1082: date,
    1083: time,
    1114: datetime,
    1184: datetime,
    1700: Decimal,
    2950: uuid.UUID,
}


def _fits(value: object, expected: type) -> bool:
    if isinstance(value, expected):
        return True
    # int, Decimal and float keys compare (and hash) equal across types: 42 finds Decimal(42).
    numeric = (int, float, Decimal)
    return expected in numeric and isinstance(value, numeric) and not isinstance(value, bool)


class _Query:
    """The batch function of a loader: run the query for a list of keys."""

    def __init__(
        self,
        pool: ConnectionPool[Any],
        sql: str,
        key: str | tuple[str, ...],
        columns: tuple[str, ...],
        many: bool,
        row_factory: RowFactory[Any],
        partition_setting: str | None,
        prepare: bool | None,
        key_fn: Callable[[Any], Any] | None,
        name: str,
    ) -> None:
        self._pool = pool
        self._sql = sql
        self._composite = not isinstance(key, str)
        self._columns = columns
        self._many = many
        self._row_factory = row_factory
        self._setting = partition_setting
        self._prepare = prepare
        self._key_fn = key_fn
        self._name = name
        # With server-side preparing on, the result's columns as first seen (see _check_shape).
        self._shape: tuple[tuple[str, int], ...] | None = None
        # The Python types of the key columns' values, once a batch has run.
        self._types: list[type | None] | None = None

    def __repr__(self) -> str:
        return f"<batchsync.pg query {self._name!r} key={self._columns!r} many={self._many}>"

    def __call__(self, keys: list[Any]) -> dict[Any, Any] | list[Any]:
        parent = _inherited.get(self._pool)
        if parent is not None:
            raise _forked_pool_error(self._pool, self._name, parent)
        # Keys that cannot match their column's type (known after the first batch) are not
        # sent; keys of different Python types go in separate executions, since psycopg
        # cannot send them in one array: a wrong key fails alone, not the keys it rides with.
        refused: dict[Any, TypeError] = {}
        send = keys
        if self._types is not None or self._composite:
            send = []
            for k in keys:
                error = self._wrong_type(k, self._types)
                if error is None:
                    send.append(k)
                else:
                    refused[k] = error
        values: list[Any] = []
        rows: list[Any] = []
        types = self._types
        if send:
            with self._pool.connection() as conn:
                # set_config(..., true) lasts until the end of the transaction, so
                # the setting and the query must share one.
                tx: AbstractContextManager[Any] = nullcontext()
                if self._setting is not None:
                    tx = conn.transaction()
                with tx, conn.cursor(row_factory=tuple_row) as cur:
                    if self._setting is not None:
                        cur.execute(
                            SET_PARTITION_SQL,
                            (self._setting, str(current_partition())),
                            prepare=False,
                        )
                    for group in self._by_type(send):
                        # Until the true columns are known, run unprepared (see _check_shape).
                        prepare = self._prepare if self._shape is not None else False
                        cur.execute(self._sql, self._params(group), prepare=prepare)
                        if self._prepare is not False:
                            self._check_shape(cur)
                        get_key = self._key_getter(cur)
                        types = self._types = self._key_types(cur)
                        make_row = self._row_factory(cur)
                        got = cur.fetchall()
                        values += map(get_key, got)
                        rows += map(make_row, got)
        logger.debug("pg loader %r: %d keys, %d rows", self, len(keys), len(rows))
        return self._group(keys, values, rows, types, refused)

    def _by_type(self, keys: list[Any]) -> list[list[Any]]:
        if self._composite:
            sig: Callable[[Any], Any] = lambda k: tuple(map(type, k))  # noqa: E731
        else:
            sig = type
        first = sig(keys[0])
        if all(sig(k) == first for k in keys):
            return [keys]
        groups: dict[Any, list[Any]] = {}
        for k in keys:
            groups.setdefault(sig(k), []).append(k)
        return list(groups.values())

    def _check_shape(self, cur: psycopg.Cursor[Any]) -> None:
        # A prepared statement is known by its name on one server session; behind a
        # transaction pooler (PgBouncer before 1.21) the name may reach another session,
        # where it is another statement: its rows would be taken for ours. Such rows
        # almost always have other columns, so a change of columns fails the batch. The
        # first execution runs unprepared (an unnamed statement cannot be confused), so
        # the columns it records are the statement's own.
        shape = tuple((c.name, c.type_code) for c in cur.description or ())
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise BatchError(
                f"batchsync.pg: loader {self._name!r} got rows with columns"
                f" ({', '.join(n for n, _ in shape)}) where its statement returns"
                f" ({', '.join(n for n, _ in self._shape)}): a prepared statement of another"
                " session answered. Behind a transaction-pooling PgBouncer (before 1.21)"
                " keep prepare=False, the default"
            )

    def _params(self, keys: list[Any]) -> dict[str, list[Any]]:
        if not self._composite:
            return {"keys": keys}
        return {column: [k[i] for k in keys] for i, column in enumerate(self._columns)}

    def _positions(self, cur: psycopg.Cursor[Any]) -> list[int]:
        names = [c.name for c in cur.description or ()]
        positions = []
        for column in self._columns:
            if column not in names:
                raise BatchError(
                    f"the query result has no column {column!r} to take the key from"
                    f" (its columns: {', '.join(names) or 'none'})"
                )
            positions.append(names.index(column))
        return positions

    def _key_getter(self, cur: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], Any]:
        # With several positions, itemgetter returns the tuple a composite key is.
        return itemgetter(*self._positions(cur))

    def _key_types(self, cur: psycopg.Cursor[Any]) -> list[type | None]:
        description = cur.description or ()
        return [_KEY_TYPES.get(description[i].type_code) for i in self._positions(cur)]

    def _wrong_type(self, key: Any, types: list[type | None] | None) -> TypeError | None:
        """Return the error for a key that cannot match a row (its shape or type), else None."""
        width = len(self._columns)
        if self._composite and (not isinstance(key, tuple) or len(key) != width):
            return TypeError(
                f"keys of a loader with key={self._columns!r} must be tuples of"
                f" {width} values, got {key!r}"
            )
        if types is None:
            return None
        parts = key if self._composite else (key,)
        for column, part, expected in zip(self._columns, parts, types, strict=True):
            if expected is not None and not _fits(part, expected):
                return TypeError(
                    f"batchsync.pg: key {key!r} of loader {self._name!r}: a"
                    f" {type(part).__name__} for column {column!r}, which holds"
                    f" {expected.__name__} values, so it never matches a row;"
                    f" load {expected.__name__} keys (e.g. {expected.__name__}(value))"
                )
        return None

    def _group(
        self,
        keys: list[Any],
        found: list[Any],
        rows: list[Any],
        types: list[type | None] | None,
        refused: dict[Any, TypeError],
    ) -> dict[Any, Any] | list[Any]:
        if self._many:
            groups: dict[Any, list[Any]] = {k: [] for k in keys}
            for k, row in zip(found, rows, strict=True):
                bucket = groups.get(k)
                if bucket is not None:
                    bucket.append(row)
            out: list[Any] = list(groups.values())
            for i, (k, bucket) in enumerate(groups.items()):
                if not bucket:
                    out[i] = refused.get(k) or self._wrong_type(k, types) or bucket
            return out
        by_value: dict[Any, Any] = {}
        for k, row in zip(found, rows, strict=True):
            if k in by_value:
                by_value[k] = BatchError(
                    f"the query returned more than one row for key {k!r};"
                    " use many=True for a one-to-many loader"
                )
            else:
                by_value[k] = row
        # A mapping keyed like the Batcher's entries (key_fn(key) with key_fn), so that
        # the Batcher's `missing` option decides what an absent key gets.
        ident = self._key_fn
        result: dict[Any, Any] = {}
        for k in keys:
            row = by_value.get(k, _ABSENT)
            if row is _ABSENT:
                row = refused.get(k) or self._wrong_type(k, types)
                if row is None:
                    continue
            result[k if ident is None else ident(k)] = row
        return result


_ABSENT: Any = object()
