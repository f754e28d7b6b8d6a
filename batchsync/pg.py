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
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
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
from batchsync.errors import BatchError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["loader"]

R = TypeVar("R")

logger = logging.getLogger("batchsync")

# A psycopg placeholder: "%%" (a literal percent), "%(name)s" or "%s"; the
# format letter may also be b (binary) or t (automatic).
_PLACEHOLDER = re.compile(r"%(?:%|\((?P<name>[^)]*)\)[sbt]|[sbt])")



@overload
def loader(
    pool: ConnectionPool[Any],
    sql: str,
    *,
    key: str | tuple[str, ...],
    many: Literal[False] = False,
    row_factory: RowFactory[R],
    partition_setting: str | None = None,
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
    **batcher_options: Unpack[BatcherOptions],
) -> Batcher[Any, Any]:
    """Return a Batcher that loads rows by key with one `sql` query per batch.

    `sql` selects the rows for ``%(keys)s``, the array of the batch's keys
    (``WHERE id = ANY(%(keys)s)``); with a composite `key`, for one array per
    key column, each named after its column. `key` names the result column(s)
    holding the key. `row_factory` builds each row (a dict by default).
    `partition_setting` names a setting to set to the batch's partition for
    its transaction (needs the ``partition`` option). `batcher_options` go to
    `Batcher` unchanged.

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
    check_partition_setting(partition_setting, batcher_options)
    query = _Query(pool, sql, key, columns, many, row_factory, partition_setting)
    batcher_options.setdefault("name", f"pg:{','.join(columns)}")
    # The query borrows a pooled connection and keeps nothing per thread, so a waiting
    # caller may run it in its own thread (Batcher's inline option): no hand-over cost.
    batcher_options.setdefault("inline", True)
    return Batcher(query, **batcher_options)


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
    ) -> None:
        self._pool = pool
        self._sql = sql
        self._composite = not isinstance(key, str)
        self._columns = columns
        self._many = many
        self._row_factory = row_factory
        self._setting = partition_setting

    def __repr__(self) -> str:
        return f"<batchsync.pg query key={self._columns!r} many={self._many}>"

    def __call__(self, keys: list[Any]) -> dict[Any, Any] | list[Any]:
        params = self._params(keys)
        with self._pool.connection() as conn:
            # set_config(..., true) lasts until the end of the transaction, so
            # the setting and the query must share one.
            tx: AbstractContextManager[Any] = nullcontext()
            if self._setting is not None:
                tx = conn.transaction()
            with tx, conn.cursor(row_factory=tuple_row) as cur:
                if self._setting is not None:
                    cur.execute(SET_PARTITION_SQL, (self._setting, str(current_partition())))
                cur.execute(self._sql, params)
                get_key = self._key_getter(cur)
                make_row = self._row_factory(cur)
                values = cur.fetchall()
                rows = list(map(make_row, values))
        found = list(map(get_key, values))
        logger.debug("pg loader %r: %d keys, %d rows", self, len(keys), len(rows))
        return self._group(keys, found, rows)

    def _params(self, keys: list[Any]) -> dict[str, list[Any]]:
        if not self._composite:
            return {"keys": keys}
        width = len(self._columns)
        for k in keys:
            if not isinstance(k, tuple) or len(k) != width:
                raise TypeError(
                    f"keys of a loader with key={self._columns!r} must be tuples of"
                    f" {width} values, got {k!r}"
                )
        return {column: [k[i] for k in keys] for i, column in enumerate(self._columns)}

    def _key_getter(self, cur: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], Any]:
        names = [c.name for c in cur.description or ()]
        positions = []
        for column in self._columns:
            if column not in names:
                raise BatchError(
                    f"the query result has no column {column!r} to take the key from"
                    f" (its columns: {', '.join(names) or 'none'})"
                )
            positions.append(names.index(column))
        # With several positions, itemgetter returns the tuple a composite key is.
        return itemgetter(*positions)

    def _group(
        self, keys: list[Any], found: list[Any], rows: list[Any]
    ) -> dict[Any, Any] | list[Any]:
        if self._many:
            groups: dict[Any, list[Any]] = {k: [] for k in keys}
            for k, row in zip(found, rows, strict=True):
                bucket = groups.get(k)
                if bucket is not None:
                    bucket.append(row)
            return list(groups.values())
        # A mapping, so that the Batcher's `missing` option decides what an
        # absent key gets.
        wanted = set(keys)
        result: dict[Any, Any] = {}
        for k, row in zip(found, rows, strict=True):
            if k not in wanted:
                continue
            if k in result:
                result[k] = BatchError(
                    f"the query returned more than one row for key {k!r};"
                    " use many=True for a one-to-many loader"
                )
            else:
                result[k] = row
        return result
