"""Request scope and partition, carried by context variables.

A scope is a per-request memo for Batchers made with ``cache="scope"``; the partition is what
a batch function asks ``current_partition()`` for while it runs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["SET_PARTITION_SQL", "check_partition_setting", "current_partition", "in_scope", "scope"]

# One memo per scope: the Batcher core -> {identity: entry}. A plain dict is enough: a scope
# lives as long as one request, so it can hold its cores strongly.
_scope_memo: ContextVar[dict[Any, dict[Hashable, Any]] | None] = ContextVar(
    "batchsync_scope", default=None
)
_partition: ContextVar[Hashable] = ContextVar("batchsync_partition", default=None)


@contextmanager
def scope() -> Iterator[None]:
    """Open a request scope for the current thread (or asyncio task).

    Batchers made with ``cache="scope"`` memoize their results only inside a scope; the memo
    is dropped when the ``with`` block ends. Scopes nest: an inner scope starts empty and the
    outer one is back in force after it.
    """
    token = _scope_memo.set({})
    try:
        yield
    finally:
        _scope_memo.reset(token)


def in_scope() -> bool:
    """Return True when the calling context is inside a ``scope()``."""
    return _scope_memo.get() is not None


def current_partition() -> Hashable:
    """Return the partition of the batch call that is running (None outside one, or unpartitioned).

    A Batcher made with ``partition=fn`` sends keys of different partitions in different calls;
    its batch function calls this to learn which partition (tenant, user) the call serves.
    """
    return _partition.get()


#: What the database adapters run before a batch's query, in its transaction, so that
#: row-level security policies see the partition: set_config(setting, partition, local).
SET_PARTITION_SQL = "SELECT set_config(%s, %s, true)"


def check_partition_setting(setting: object, options: Mapping[str, Any]) -> None:
    """Refuse a partition_setting that is not a non-empty str, or one without a partition."""
    if setting is None:
        return
    if not isinstance(setting, str) or not setting:
        raise ValueError(
            "batchsync: partition_setting must be a non-empty str such as "
            f"'app.tenant_id', not {setting!r}"
        )
    if options.get("partition") is None:
        raise ValueError(
            "batchsync: partition_setting needs the partition option: a function that "
            "returns the partition (e.g. the tenant id) in the loading thread"
        )
