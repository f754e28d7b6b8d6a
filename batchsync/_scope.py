"""Request scope and partition, carried by context variables.

A scope is a per-request memo for Batchers made with ``cache="scope"``; the partition is what
a batch function asks ``current_partition()`` for while it runs.
"""

from __future__ import annotations

import math
import os
import threading
import time
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


class _Activity:
    """How many requests (outermost scopes) are open, and how many of them wait in batchsync.

    The dispatch rule (see ``_Core._company_locked``) holds a queue's window open only while
    a request that could still add keys is running: ``running()`` is that number. Cores that
    hold a window for company register in ``holding``; when the last running request blocks
    or ends, they are poked to dispatch at once. One lock guards the counters; it is taken
    after a core's lock, never before one.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0  # outermost scopes open (requests in progress)
        self.blocked = 0  # of those, how many wait in a batchsync call right now
        self.holding: set[Any] = set()  # cores whose window waits for running requests
        # When the latest request started, and in which thread; the same for the latest one
        # from another thread than that. Requests that keep arriving are company to come.
        self.last = (-math.inf, 0)
        self.before = (-math.inf, 0)
        self.gap = math.inf  # the typical gap between requests of different threads

    def running(self) -> int:
        return self.open - self.blocked

    def next_arrival(self, tid: int, within: float) -> float:
        """When another thread's next request is due, judging by the latest ones (-inf: none).

        That is the latest start of a request by another thread than tid, plus GAPS times
        the typical gap between requests of different threads; -inf when that many gaps
        exceed ``within`` seconds (requests too sparse to wait for).
        """
        wait = GAPS * self.gap
        if wait > within:
            return -math.inf
        return (self.last[0] if self.last[1] != tid else self.before[0]) + wait
    def change(self, opened: int, blocked: int) -> None:
        """Count a scope opening/ending or a request blocking/unblocking; poke when idle."""
        with self.lock:  # critical section: the counters; take the cores to poke
            if opened > 0:
                tid, now = threading.get_ident(), time.monotonic()
                if self.last[1] != tid:
                    # Smoothed, but a burst after a quiet spell starts from its first gap.
                    gap = now - self.last[0]
                    self.gap = gap if gap < self.gap / 4 else (self.gap + gap) / 2
                    self.before = self.last
                self.last = (now, tid)
            self.open += opened
            self.blocked += blocked
            cores = list(self.holding) if self.open == self.blocked and self.holding else ()
        for core in cores:  # outside the lock: each core takes its own
            core.poke()

    def _after_fork_in_child(self) -> None:
        self.lock = threading.Lock()
        self.open = 1 if _scope_memo.get() is not None else 0
        self.blocked = 0
        self.holding = set()
        self.last = self.before = (-math.inf, 0)
        self.gap = math.inf


#: How many gaps between recent requests a window waits for the next one (see next_arrival).
GAPS = 3.0

_activity = _Activity()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_activity._after_fork_in_child)


@contextmanager
def scope() -> Iterator[None]:
    """Open a request scope for the current thread (or asyncio task).

    Batchers made with ``cache="scope"`` memoize their results only inside a scope; the memo
    is dropped when the ``with`` block ends. Scopes nest: an inner scope starts empty and the
    outer one is back in force after it.

    An outermost scope also counts as a request in progress: while other requests run, a
    Batcher holds a blocking caller's keys for up to its window so theirs can join the call;
    when every open request waits in batchsync (or there is no other), it dispatches at once.
    """
    outermost = _scope_memo.get() is None
    token = _scope_memo.set({})
    if outermost:
        _activity.change(1, 0)
    try:
        yield
    finally:
        _scope_memo.reset(token)
        if outermost:
            _activity.change(-1, 0)


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
