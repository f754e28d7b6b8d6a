"""The engine behind Batcher: the queue, the window, the worker threads and the delivery.

Everything that is shared between threads lives in one ``_Core`` and is guarded by its one
lock (``_lock``, with the condition ``_cond`` on it). The public ``Batcher`` is a thin facade
over a core; worker threads reference only the core, so a Batcher that nobody references any
more can be collected, and its finalizer closes the core.

Life of a key::

    load/get_many ──> _Entry queued ──(window closes | full | flush | a caller waits)──> due
    due ──(a free slot: a worker, or an inline caller)──> running ──(returns)──> done

A key loaded again while its entry is queued or running joins that entry (one more waiter)
instead of being sent twice. Waiters are either ``_LoadFuture`` objects (``load``) or a
``_Latch`` shared by all keys of one ``get_many`` call, which is cheaper than a Future per key.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Generic

from . import _hooks
from ._scope import _partition, _scope_memo
from ._stats import Stats
from ._types import K, V
from .errors import BatchCycleError, BatcherClosed, BatchError

logger = logging.getLogger("batchsync")

_QUEUED, _RUNNING, _DONE = 0, 1, 2
_MISSING: Any = object()


class _Tls(threading.local):
    # ``worker`` marks batchsync's own threads, ``running`` holds the chunks this thread is
    # computing right now. A blocking call made from either (a batch function, or a future
    # callback on a worker) runs the batches it needs itself instead of waiting for a slot
    # that it may occupy itself; ``running`` also tells a true cycle from an ordinary wait.
    worker: bool = False
    running: list[list[_Entry]] | None = None


_tls = _Tls()


class _Latch:
    """Counts down the entries one get_many call waits on; opens at zero."""

    __slots__ = ("_lock", "remaining", "token")

    def __init__(self) -> None:
        self.remaining = 0
        self.token: object = None  # the observer hook's token of this caller (_hooks)
        self._lock = threading.Lock()
        self._lock.acquire()

    def open(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()
            return True
        return False


class _Entry:
    """One unique key, queued or running, with everyone who waits for it."""

    __slots__ = ("failed", "ident", "key", "mkey", "partition", "state", "value", "waiters")

    def __init__(
        self, key: Any, ident: Hashable, mkey: Hashable, partition: Hashable, waiter: Any = None
    ) -> None:
        self.key = key
        self.ident = ident  # the key's identity (key_fn(key) or the key itself)
        self.mkey = mkey  # identity within the batcher: (partition, ident) when partitioned
        self.partition = partition
        self.state = _QUEUED
        self.value: Any = None
        self.failed = False
        self.waiters: list[Any] = [] if waiter is None else [waiter]


class _LoadFuture(Future[V]):
    """The Future that ``load`` returns: waiting on it closes the window early.

    It is a plain ``concurrent.futures.Future`` in every other respect. ``result()`` and
    ``exception()`` first tell the batcher that somebody now waits for this key, so a lone
    caller does not sit out the window, and, on a batchsync worker thread, run the batch
    inline rather than wait for a worker that may be this thread.
    """

    _core: _Core[Any, V] | None = None
    _entry: _Entry | None = None
    _token: object = None  # the observer hook's token of this caller (_hooks)

    def result(self, timeout: float | None = None) -> V:
        core, entry = self._core, self._entry
        if core is not None and entry is not None and not self.done():
            core.await_entries([entry], self.done, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        core, entry = self._core, self._entry
        if core is not None and entry is not None and not self.done():
            core.await_entries([entry], self.done, timeout)
        return super().exception(timeout)


def _resolved(value: Any, failed: bool) -> _LoadFuture[Any]:
    fut: _LoadFuture[Any] = _LoadFuture()
    if failed:
        fut.set_exception(value)
    else:
        fut.set_result(value)
    return fut


def _collect(
    entry: _Entry, futures: list[tuple[Future[Any], _Entry]], latches: list[_Latch]
) -> None:
    """Count a finished entry down on its latches; gather its futures and opened latches.

    Called under the core's lock; _deliver then resolves what was gathered, outside it.
    """
    for w in entry.waiters:
        if type(w) is _Latch:
            w.remaining -= 1
            if not w.remaining:
                latches.append(w)
        else:
            futures.append((w, entry))


def _tokens(chunk: list[_Entry]) -> list[object]:
    """The observer hook's tokens of a running chunk's callers, once each (for _hooks).

    Read outside the lock: a running entry's waiters only ever grow by appends (callers
    joining late), so the walk sees a consistent prefix of them.
    """
    seen: dict[int, object] = {}
    for entry in chunk:
        for w in entry.waiters:
            token = w.token if type(w) is _Latch else w._token
            if token is not None:
                seen[id(token)] = token
    return list(seen.values())


def _deliver(futures: list[tuple[Future[Any], _Entry]], latches: list[_Latch]) -> None:
    """Resolve futures and open latches; called with no batchsync lock held. Never raises."""
    for latch in latches:
        latch.open()
    for fut, entry in futures:
        try:
            if entry.failed:
                fut.set_exception(entry.value)
            else:
                fut.set_result(entry.value)
        except InvalidStateError:
            pass  # cancelled by its caller while still queued: nobody wants the value
        except BaseException:  # a done-callback raised past Future's own `except Exception`
            logger.exception("batchsync: a future's done-callback raised")


class _Core(Generic[K, V]):
    """Queue, window, workers and delivery for one Batcher. See the module docstring."""

    def __init__(
        self,
        batch_fn: Callable[[list[K]], Any],
        *,
        window: float,
        max_batch_size: int,
        max_concurrency: int,
        cache: bool | str,
        key_fn: Callable[[K], Hashable] | None,
        partition: Callable[[], Hashable] | None,
        missing: str,
        eager: bool,
        inline: bool,
        name: str,
    ) -> None:
        self.batch_fn = batch_fn
        self.window = window
        self.max_batch_size = max_batch_size
        self.max_concurrency = max_concurrency
        self.cache_all = cache is True
        self.cache_scope = cache == "scope"
        self.key_fn = key_fn
        self.partition_fn = partition
        self.missing_raise = missing == "raise"
        self.eager = eager
        self.inline = inline
        self.name = name
        self.plain = key_fn is None and partition is None and cache is False
        self._reset()

    def _reset(self) -> None:
        """Give the core a fresh, empty state (at construction and in a forked child)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: dict[Hashable, _Entry] = {}  # queued and running, by mkey
        self._queue: list[_Entry] = []  # queued, in arrival order
        self._due = 0  # how many entries at the head of _queue are due for dispatch
        self._deadline = 0.0  # when the open window closes (valid while keys are not due)
        self._closing = False
        self._workers: list[threading.Thread] = []
        self._cache: dict[Hashable, Any] = {}
        self._running = 0  # keys in flight
        self._active = 0  # chunks in flight: slots taken of max_concurrency
        self._loads = self._cache_hits = self._deduplicated = 0
        self._batches = self._keys = self._failed_batches = 0
        self._largest = self._coalesced = 0

    # -- identities --------------------------------------------------------------------------

    def identities(self, keys: Sequence[Any]) -> list[tuple[Hashable, Hashable, Hashable]]:
        """Return (ident, mkey, partition) per key; the partition function runs once."""
        part = None if self.partition_fn is None else self.partition_fn()
        return [self._identity(key, part) for key in keys]

    def _identity(self, key: Any, part: Hashable) -> tuple[Hashable, Hashable, Hashable]:
        """Return (ident, mkey, partition) of a key; raise TypeError for an unhashable one."""
        ident = key if self.key_fn is None else self.key_fn(key)
        mkey = ident if self.partition_fn is None else (part, ident)
        try:
            hash(mkey)
        except TypeError:
            if self.key_fn is None:
                raise TypeError(
                    f"batchsync: key {key!r} is unhashable ({type(key).__name__}); "
                    "pass key_fn= to map keys to a hashable identity"
                ) from None
            raise TypeError(
                f"batchsync: key_fn returned an unhashable identity {ident!r} for key {key!r}"
            ) from None
        return ident, mkey, part

    # -- loading -----------------------------------------------------------------------------

    def load_many(self, keys: Sequence[K]) -> list[Future[V]]:
        """Queue keys and return one future per key, in order."""
        idents = self.identities(keys)
        futures: list[Future[V]] = []
        memo = self._scope_memo()
        # [hook call site 1 of 4] the caller's context, captured in the caller's thread.
        hook = _hooks.installed
        token = None if hook is None else hook.on_load(self.name, len(keys))
        with self._lock:  # critical section: look up, de-duplicate, queue
            self._refuse_if_closed_locked()
            self._loads += len(idents)
            for key, (ident, mkey, part) in zip(keys, idents, strict=True):
                entry = self._find_locked(mkey, memo)
                if entry is not None and entry.state == _DONE:
                    futures.append(_resolved(entry.value, entry.failed))
                    continue
                fut: _LoadFuture[V] = _LoadFuture()
                if entry is None:
                    entry = self._enqueue_locked(key, ident, mkey, part, memo)
                elif entry.state == _RUNNING:
                    fut.set_running_or_notify_cancel()
                entry.waiters.append(fut)
                fut._core = self
                fut._entry = entry
                if token is not None:
                    fut._token = token
                futures.append(fut)
            if not self._workers and self._queue:
                self._start_workers_locked()
        return futures

    def get_many(self, keys: Sequence[K], timeout: float | None) -> list[V | None]:
        """Queue keys, close the window for them, wait, and return the values in order."""
        if self.plain:
            return self._get_many_plain(keys, timeout)
        idents = self.identities(keys)
        memo = self._scope_memo()
        latch = _Latch()
        # [hook call site 2 of 4] the caller's context, captured in the caller's thread.
        hook = _hooks.installed
        if hook is not None:
            latch.token = hook.on_load(self.name, len(keys))
        slots: list[_Entry] = []
        waited: list[_Entry] = []
        with self._lock:  # critical section: look up, de-duplicate, queue
            self._refuse_if_closed_locked()
            self._loads += len(idents)
            seen: dict[Hashable, _Entry] = {}
            for key, (ident, mkey, part) in zip(keys, idents, strict=True):
                entry = seen.get(mkey)
                if entry is None:
                    entry = self._find_locked(mkey, memo)
                    if entry is None:
                        # An eager caller closes the window itself right after this.
                        entry = self._enqueue_locked(key, ident, mkey, part, memo, not self.eager)
                    if entry.state != _DONE:
                        entry.waiters.append(latch)
                        waited.append(entry)
                    seen[mkey] = entry
                else:
                    self._deduplicated += 1
                slots.append(entry)
            latch.remaining = len(waited)
            if waited and not self._workers:
                self._start_workers_locked()
        if waited:
            self._wait(waited, latch, timeout)
        out: list[V | None] = []
        for entry in slots:
            if entry.failed:
                raise entry.value
            out.append(entry.value)
        return out

    def _get_many_plain(self, keys: Sequence[K], timeout: float | None) -> list[V | None]:
        """get_many without key_fn, partition or cache: the hot path, as one tight loop."""
        try:
            unique: dict[Any, Any] = dict.fromkeys(keys)
        except TypeError:
            for key in keys:
                self._identity(key, None)  # raises the TypeError that names the key
            raise
        latch = _Latch()
        # [hook call site 3 of 4] the caller's context, captured in the caller's thread.
        hook = _hooks.installed
        if hook is not None:
            latch.token = hook.on_load(self.name, len(keys))
        with self._lock:  # critical section: de-duplicate, queue
            self._refuse_if_closed_locked()
            self._loads += len(keys)
            self._deduplicated += len(keys) - len(unique)
            entries, queue = self._entries, self._queue
            was_open = len(queue) > self._due
            for key in unique:
                entry = entries.get(key)
                if entry is None:
                    entry = entries[key] = _Entry(key, key, key, None, latch)
                    queue.append(entry)
                else:
                    self._deduplicated += 1
                    entry.waiters.append(latch)
                unique[key] = entry
            latch.remaining = len(unique)
            if unique:
                self._queued_locked(was_open, not self.eager)
                if not self._workers:
                    self._start_workers_locked()
        if unique:
            waited = list(unique.values())
            self._wait(waited, latch, timeout)
            for entry in waited:
                if entry.failed:
                    raise entry.value
        return [unique[key].value for key in keys]

    def _refuse_if_closed_locked(self) -> None:
        if self._closing:
            raise BatcherClosed(f"batchsync: Batcher {self.name!r} is closed")

    def _wait(self, waited: list[_Entry], latch: _Latch, timeout: float | None) -> None:
        """Block until latch opens for the entries of one get_many call, or time out."""
        self.await_entries(waited, lambda: latch.remaining == 0, timeout)
        if not latch.wait(timeout):
            raise TimeoutError(f"batchsync: no result within {timeout} s")

    def _queued_locked(self, was_open: bool, notify: bool) -> None:
        """Apply the window rules after keys were queued (see _wait_chunk_locked)."""
        queue = self._queue
        if len(queue) - self._due >= self.max_batch_size:
            self._due = len(queue)  # full: send at once
            self._cond.notify()
        elif not was_open:
            # The window opens: a worker starts timing it.
            self._deadline = time.monotonic() + self.window
            if notify:
                self._cond.notify()

    def _scope_memo(self) -> dict[Hashable, Any] | None:
        if not self.cache_scope:
            return None
        memos = _scope_memo.get()
        if memos is None:
            return None
        memo = memos.get(self)
        if memo is None:
            memo = memos[self] = {}
        return memo

    def _find_locked(self, mkey: Hashable, memo: dict[Hashable, Any] | None) -> _Entry | None:
        """Return the entry that already answers mkey (a DONE one for a cache hit), or None."""
        if self.cache_all:
            value = self._cache.get(mkey, _MISSING)
            if value is not _MISSING:
                self._cache_hits += 1
                hit = _Entry(None, None, mkey, None)
                hit.value, hit.state = value, _DONE
                return hit
        if memo is not None:
            entry: _Entry | None = memo.get(mkey)
            if entry is not None and not (entry.state == _DONE and entry.failed):
                if entry.state == _DONE:
                    self._cache_hits += 1
                else:
                    self._deduplicated += 1
                return entry
        entry = self._entries.get(mkey)
        if entry is not None:
            self._deduplicated += 1
            if memo is not None:
                memo[mkey] = entry
        return entry

    def _enqueue_locked(
        self,
        key: Any,
        ident: Hashable,
        mkey: Hashable,
        part: Hashable,
        memo: dict[Hashable, Any] | None,
        notify: bool = True,
    ) -> _Entry:
        entry = _Entry(key, ident, mkey, part)
        self._entries[mkey] = entry
        if memo is not None:
            memo[mkey] = entry
        was_open = len(self._queue) > self._due
        self._queue.append(entry)
        self._queued_locked(was_open, notify)
        return entry

    # -- waiting -----------------------------------------------------------------------------

    def await_entries(
        self, entries: list[_Entry], done: Callable[[], bool], timeout: float | None
    ) -> None:
        """Do what helps before a caller blocks on entries; the caller then waits for done().

        Inside a batch function (or on a worker thread): run the queued chunks here, see
        _help. On an ordinary thread, when eager: close the window; then, when inline and
        with no timeout to honour, run due chunks on this thread while a slot is free and
        the caller's own keys are still queued; hand what is left to a worker.
        """
        if _tls.worker or _tls.running:
            self._help(entries, done)
            return
        if not self.eager:
            return
        # With a timeout a worker runs the batch, so that the caller can leave on time.
        inline = self.inline and timeout is None
        i, n = 0, len(entries)
        while True:
            while i < n and entries[i].state != _QUEUED:
                i += 1
            chunk = None
            with self._lock:  # critical section: close the window, take a chunk or hand over
                if i < n:  # some of the caller's keys are still queued: close their window
                    self._due = len(self._queue)
                if self._due and self._active < self.max_concurrency:
                    if inline and i < n:
                        chunk = self._take_locked()
                    else:
                        self._cond.notify()
            if chunk is None:
                return
            if chunk:
                self._run(chunk, wake=False)

    def _help(self, entries: list[_Entry], done: Callable[[], bool]) -> None:
        """Run queued chunks on this (worker) thread until done() or nothing is left to run.

        A batch function that loads from its own Batcher, or a chain of Batchers, would
        otherwise wait for a worker slot that it occupies itself (with max_concurrency=1,
        for ever). What remains after this runs on other threads, so the caller may wait.
        """
        while not done():
            with self._lock:  # critical section: take a chunk to run on this thread
                # No slot check: a nested call borrows the slot of the call it runs in.
                self._due = len(self._queue)
                chunk = self._take_locked() if self._due else None
            if chunk is not None:
                if chunk:
                    self._run(chunk)
                continue
            mine = _tls.running or []
            for entry in entries:
                if entry.state == _RUNNING and any(entry in chunk for chunk in mine):
                    raise BatchCycleError(
                        f"batchsync: the batch function of {self.name!r} waited on key "
                        f"{entry.key!r}, which its own running call is computing"
                    )
            return  # what is left runs on other threads: the caller waits for it

    # -- the worker loop ---------------------------------------------------------------------

    def _start_workers_locked(self) -> None:
        # Starting a thread under the lock is safe (the new thread only blocks on this lock
        # after Thread.start() has returned) and keeps close() from missing a worker.
        for i in range(self.max_concurrency - len(self._workers)):
            thread = threading.Thread(
                target=self._worker, name=f"batchsync-{self.name}-{i}", daemon=True
            )
            self._workers.append(thread)
            thread.start()

    def _worker(self) -> None:
        _tls.worker = True
        while True:
            with self._lock:  # critical section: wait for a due chunk and take it
                chunk = self._wait_chunk_locked()
            if chunk is None:
                return
            try:
                self._run(chunk)
            except BaseException:  # _run catches the batch function's errors; this is a bug
                logger.exception("batchsync %s: internal error in a worker", self.name)

    def _wait_chunk_locked(self) -> list[_Entry] | None:
        # When is a batch dispatched? This is the one subtle decision of the design.
        #
        # A key that arrives at an empty queue opens a window of `window` seconds; keys that
        # arrive while it is open join it. The queued keys become *due* when the window
        # closes, when max_batch_size keys wait, on flush() and on close(). A free worker
        # takes due keys in chunks of at most max_batch_size (one partition per chunk).
        #
        # A window alone puts a floor under every load's latency (graphql/dataloader admits
        # it): a lone request would wait out the window at every level of its tree. So,
        # with eager=True (the default), a caller that *blocks* on a key (get, get_many,
        # Future.result) makes the queue due at once: it cannot add more keys, and waiting
        # longer only helps other threads. Under load this is group commit: while every
        # worker is busy, due keys pile up and the next free worker sends them together, so
        # keys coalesce exactly when the database is the bottleneck, and a lone request pays
        # no window. Futures nobody waits on yet (load without result) still ride the window.
        #
        # With inline=True a waiting caller with no timeout runs the chunk itself, in its own
        # thread, when a slot (max_concurrency) is free: that saves the two thread switches
        # of a hand-over, most of the layer's cost for a lone request. It is opt-in because
        # the batch function then runs on a caller's thread, where thread-bound state (a
        # Django connection, a thread-local ORM session) belongs to that caller's request;
        # batchsync.pg turns it on, as its batch function borrows from a pool. Workers and
        # inline callers share the slots.
        while True:
            if self._due and self._active < self.max_concurrency:
                chunk = self._take_locked()
                if chunk:
                    return chunk
                continue
            if self._due:
                self._cond.wait()  # every slot is busy: _finish notifies when one frees
            elif self._queue:
                if self._closing:
                    self._due = len(self._queue)
                    continue
                delay = self._deadline - time.monotonic()
                if delay <= 0:
                    self._due = len(self._queue)
                    continue
                self._cond.wait(min(delay, threading.TIMEOUT_MAX))
            elif self._closing:
                if not self._active:
                    return None
                # A call still runs on a caller's thread (inline, or nested in another
                # Batcher's batch): close() waits for it, so the workers do too.
                self._cond.wait()
            else:
                self._cond.wait()

    def _take_locked(self) -> list[_Entry]:
        """Take the next chunk of due entries, drop cancelled ones, mark the rest running."""
        queue, size = self._queue, self.max_batch_size
        if self.partition_fn is None:
            n = min(self._due, size)
            chunk = queue[:n]
            del queue[:n]
            self._due -= n
        else:
            part = queue[0].partition
            chunk, rest = [], []
            for entry in queue[: self._due]:
                if entry.partition == part and len(chunk) < size:
                    chunk.append(entry)
                else:
                    rest.append(entry)
            queue[: self._due] = rest
            self._due = len(rest)
        live = []
        for entry in chunk:
            waiters = entry.waiters
            cancelled = False
            if len(waiters) != 1 or type(waiters[0]) is not _Latch:  # any futures?
                for w in waiters:
                    # Once running, a future can no longer be cancelled by its caller.
                    if type(w) is not _Latch and not w.set_running_or_notify_cancel():
                        cancelled = True
            if cancelled:
                entry.waiters = waiters = [
                    w for w in waiters if type(w) is _Latch or not w.cancelled()
                ]
            if waiters:
                entry.state = _RUNNING
                live.append(entry)
            else:  # every caller of this key cancelled: do not send it
                entry.state = _DONE
                entry.failed = True
                del self._entries[entry.mkey]
        if live:
            n = len(live)
            self._active += 1
            self._batches += 1
            self._keys += n
            self._running += n
            if n > 1:
                self._coalesced += n
            if n > self._largest:
                self._largest = n
        if self._due and self._active < self.max_concurrency:
            self._cond.notify()  # more due chunks: another free worker may take one
        return live

    def _run(self, chunk: list[_Entry], wake: bool = True) -> None:
        """Call the batch function for one chunk and deliver its outcome; never raises."""
        keys = [e.key for e in chunk]
        running = _tls.running
        if running is None:
            running = _tls.running = []
        running.append(chunk)
        # A fresh, empty context: the call serves many callers, so it must see none of
        # their context variables (request scope, app context), wherever it runs.
        context = contextvars.Context()
        if self.partition_fn is not None:
            context.run(_partition.set, chunk[0].partition)
        error: BaseException | None = None
        values: Sequence[Any] = ()
        started = time.perf_counter()
        try:
            # [hook call site 4 of 4] the batch call, wrapped with its callers' tokens.
            hook = _hooks.installed
            if hook is None:
                result = context.run(self.batch_fn, keys)
            else:
                tokens = _tokens(chunk)
                part = chunk[0].partition
                result = context.run(hook.run_batch, self.name, keys, part, tokens, self.batch_fn)
            values = self._match(chunk, result)
        except BaseException as exc:  # delivered to the chunk's callers, never fatal here
            error = exc
        finally:
            running.pop()
        elapsed = time.perf_counter() - started
        if error is not None:
            logger.error(
                "batchsync %s: batch of %d keys failed after %.6f s",
                self.name,
                len(chunk),
                elapsed,
                exc_info=error,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("batchsync %s: batch of %d keys in %.6f s", self.name, len(chunk), elapsed)
        self._finish(chunk, values, error, wake)

    def _match(self, chunk: list[_Entry], result: object) -> Sequence[Any]:
        """Return one value (or exception instance) per entry; BatchError on a broken contract."""
        if isinstance(result, Mapping):
            get = result.get
            if self.missing_raise:
                out = []
                for e in chunk:
                    value = get(e.ident, _MISSING)
                    out.append(KeyError(e.key) if value is _MISSING else value)
                return out
            return [get(e.ident) for e in chunk]
        if isinstance(result, (list, tuple)) or (
            isinstance(result, Sequence) and not isinstance(result, (str, bytes, bytearray))
        ):
            if len(result) != len(chunk):
                raise BatchError(
                    f"batchsync: batch function of {self.name!r} returned {len(result)} items "
                    f"for {len(chunk)} keys; a Sequence result needs one item per key, in order"
                )
            if not isinstance(result, (list, tuple)):
                # Any other Sequence is read here, inside the caller's try: an item that
                # raises fails the call instead of the delivery.
                result = [result[i] for i in range(len(chunk))]
            return result
        raise BatchError(
            f"batchsync: batch function of {self.name!r} returned {type(result).__name__}; "
            "expected a Mapping keyed by key or a Sequence with one item per key"
        )

    def _finish(
        self,
        chunk: list[_Entry],
        values: Sequence[Any],
        error: BaseException | None,
        wake: bool,
    ) -> None:
        futures: list[tuple[Future[Any], _Entry]] = []
        latches: list[_Latch] = []
        with self._lock:  # critical section: publish outcomes, forget entries, collect waiters
            if error is not None:
                self._failed_batches += 1
            self._running -= len(chunk)
            self._active -= 1
            if self._closing and not self._active:
                self._cond.notify_all()  # the last call in flight: the workers may end
            elif wake and self._due:
                self._cond.notify()  # a slot is free for the next due chunk
            for i, entry in enumerate(chunk):
                if entry.state == _DONE:
                    continue  # abandoned by close(timeout=...): its callers have their answer
                value = error if error is not None else values[i]
                entry.value = value
                entry.failed = failed = error is not None or isinstance(value, BaseException)
                entry.state = _DONE
                del self._entries[entry.mkey]
                if self.cache_all and not failed:
                    self._cache[entry.mkey] = value
                waiters = entry.waiters
                if len(waiters) == 1 and type(waiters[0]) is _Latch:  # one get_many caller
                    latch = waiters[0]
                    latch.remaining -= 1
                    if not latch.remaining:
                        latches.append(latch)
                else:
                    _collect(entry, futures, latches)
        _deliver(futures, latches)

    # -- control -----------------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:  # critical section: make everything queued due
            if self._due < len(self._queue):
                self._due = len(self._queue)
                self._cond.notify()

    def close(self, timeout: float | None) -> None:
        workers = self.close_nowait()
        end = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        for thread in workers:
            if thread is not me:
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        if any(t.is_alive() and t is not me for t in workers):
            self._abandon()

    def close_nowait(self) -> list[threading.Thread]:
        """Stop taking loads; the workers send what is queued and then end. Return them."""
        with self._lock:  # critical section: stop taking loads, make the queue due
            self._closing = True
            self._due = len(self._queue)
            self._cond.notify_all()
            return list(self._workers)

    def _abandon(self) -> None:
        """Fail every key still queued or running with BatcherClosed (close timed out)."""
        futures: list[tuple[Future[Any], _Entry]] = []
        latches: list[_Latch] = []
        with self._lock:  # critical section: take every entry out
            entries = list(self._entries.values())
            self._entries.clear()
            self._queue.clear()
            self._due = 0
            for entry in entries:
                entry.state = _DONE
                entry.failed = True
                entry.value = BatcherClosed(
                    f"batchsync: Batcher {self.name!r} closed before key {entry.key!r} was answered"
                )
                _collect(entry, futures, latches)
        _deliver(futures, latches)

    @property
    def closed(self) -> bool:
        return self._closing

    def prime(self, mkey: Hashable, value: Any) -> None:
        memo = self._scope_memo()
        with self._lock:  # critical section: the cache
            if self.cache_all:
                self._cache[mkey] = value
            elif memo is not None:
                entry = _Entry(None, None, mkey, None)
                entry.value, entry.state = value, _DONE
                memo[mkey] = entry

    def clear(self, mkey: Hashable) -> None:
        memo = self._scope_memo()
        with self._lock:  # critical section: the cache
            self._cache.pop(mkey, None)
            if memo is not None:
                memo.pop(mkey, None)

    def clear_all(self) -> None:
        memo = self._scope_memo()
        with self._lock:  # critical section: the cache
            self._cache.clear()
            if memo is not None:
                memo.clear()

    def stats(self) -> Stats:
        with self._lock:  # critical section: a consistent snapshot
            return Stats(
                loads=self._loads,
                cache_hits=self._cache_hits,
                deduplicated=self._deduplicated,
                batches=self._batches,
                keys=self._keys,
                failed_batches=self._failed_batches,
                largest_batch=self._largest,
                coalesced_keys=self._coalesced,
                queued=len(self._queue),
                in_flight=self._running,
            )

    def live_threads(self) -> list[threading.Thread]:
        return [t for t in self._workers if t.is_alive()]


def check_timeout(timeout: float | None) -> float | None:
    """Return timeout normalized (infinity means None); refuse a negative, NaN or non-number."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"batchsync: timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"batchsync: timeout must be >= 0 seconds or None, not {timeout!r}")
    return None if timeout > threading.TIMEOUT_MAX else float(timeout)
