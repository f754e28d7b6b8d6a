"""The engine behind Batcher: the queue, the window, the worker threads and the delivery.

Everything that is shared between threads lives in one ``_Core`` and is guarded by its one
lock (``_lock``, with the condition ``_cond`` on it). The public ``Batcher`` is a thin facade
over a core; worker threads reference only the core, so a Batcher that nobody references any
more can be collected, and its finalizer closes the core.

Life of a key::

    load/get_many ──> _Entry queued ──(window closes | full | flush | the dispatch rule)──> due
    due ──(a free slot: a worker, or an inline caller)──> running ──(returns)──> done

A key loaded again while its entry is queued or running joins that entry (one more waiter)
instead of being sent twice. Waiters are either ``_LoadFuture`` objects (``load``) or a
``_Latch`` shared by all keys of one ``get_many`` call, which is cheaper than a Future per key.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Generic, TypeVar

from . import _hooks, _lograte
from ._future import LoadFuture as _LoadFuture
from ._future import resolved as _resolved
from ._queue import DONE as _DONE
from ._queue import QUEUED as _QUEUED
from ._queue import RUNNING as _RUNNING
from ._queue import Entry as _Entry
from ._queue import Queue
from ._scope import _activity, _partition, _scope_memo
from ._stats import Stats
from ._types import K, V
from .errors import BatchCycleError, BatcherClosed, BatchError

logger = logging.getLogger("batchsync")

_T = TypeVar("_T")
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

    __slots__ = ("_lock", "remaining", "tid", "token")

    def __init__(self) -> None:
        self.remaining = 0
        self.tid = 0  # the thread counted as blocked on this core for it, until answered
        self.token: object = None  # the observer hook's token of this caller (_hooks)
        self._lock = threading.Lock()
        self._lock.acquire()

    def open(self) -> None:
        # Idempotent: a delivery interrupted (a signal handler raising) is done again.
        try:  # noqa: SIM105 (no suppress(): a plain try is cheaper and has no call to interrupt)
            self._lock.release()
        except RuntimeError:
            pass

    def wait(self, timeout: float | None) -> bool:
        if self._lock.acquire(timeout=-1 if timeout is None else timeout):
            self._lock.release()
            return True
        return False


def _last_resort(what: str) -> None:
    """Report an error of the delivery machinery itself; never raises (not even if stderr is gone).

    It bypasses logging on purpose: a logging filter or handler that raises is one of the
    faults this must survive (trio's thread cache and CPython's executor do the same).
    """
    try:
        import sys
        import traceback

        sys.stderr.write(f"batchsync: {what}\n{traceback.format_exc()}")
    except BaseException:
        pass


def _clear_own_frames(error: BaseException) -> None:
    """Clear the locals of batchsync's finished frames on error's traceback (not the user's)."""
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals is globals():
            try:  # noqa: SIM105 (no suppress(): a plain try is cheaper and has no call to interrupt)
                frame.clear()
            except RuntimeError:
                pass  # still executing (the _run frame itself): its locals are reset there
        tb = tb.tb_next


def _is_error(value: Any) -> bool:
    # type(), not isinstance(): a lazy proxy's __class__ property must not run user code
    # under the core lock (Django's SimpleLazyObject, werkzeug's LocalProxy).
    return issubclass(type(value), BaseException)


#: The waiters of a finished entry, once _finish took them: one shared empty list (a new
#: list per key would be one more object per key for the garbage collector). Never changed:
#: nobody joins a finished entry, and _join copies any list shorter than two.
_TAKEN: list[Any] = []


def _join(entry: _Entry, waiter: Any) -> None:
    """Add a waiter to an entry queued or running (called under the core's lock).

    A one-waiter list may be shared by the new entries of one get_many call
    (_get_many_plain), so it is copied, never appended to; a longer list is the entry's own.
    Readers outside the lock (_tokens) see the old list or the new one, both consistent.
    """
    waiters = entry.waiters
    if len(waiters) < 2:
        entry.waiters = [*waiters, waiter]
    else:
        waiters.append(waiter)


def _collect(
    entry: _Entry, futures: list[tuple[Future[Any], _Entry]], latches: list[_Latch]
) -> None:
    """Count a finished entry down on its latches; gather its futures and opened latches.

    Called under the core's lock; _deliver then resolves what was gathered, outside it. The
    waiters are taken from the entry, so a second pass (after an interrupted first one)
    counts none of them twice.
    """
    waiters, entry.waiters = entry.waiters, _TAKEN
    for w in waiters:
        if type(w) is _Latch:
            w.remaining -= 1
            if not w.remaining:
                latches.append(w)
        else:
            futures.append((w, entry))


def _tokens(chunk: list[_Entry]) -> list[object]:
    """The observer hook's tokens of a running chunk's callers, once each (for _hooks).

    Read outside the lock: a running entry's waiters only ever grow (callers joining late,
    see _join) or are replaced (taken by _finish), so the walk sees a consistent list.
    """
    seen: dict[int, object] = {}
    for entry in chunk:
        for w in entry.waiters:
            token = w.token if type(w) is _Latch else w._token
            if token is not None:
                seen[id(token)] = token
    return list(seen.values())


def _deliver(futures: list[tuple[Future[Any], _Entry]], latches: list[_Latch]) -> None:
    """Resolve futures and open latches, emptying both lists; called with no batchsync lock held.

    Every waiter is served even if an exception interrupts the loop (a signal handler that
    raises on the main thread): the first such one is re-raised once all are delivered.
    Each step is idempotent (a latch opens once, a done future refuses a second result),
    and a waiter leaves its list only after it was served.
    """
    interrupt: BaseException | None = None
    while latches or futures:
        try:
            while latches:
                latches[-1].open()
                latches.pop()
            while futures:
                fut, entry = futures[-1]
                try:
                    if entry.failed:
                        fut.set_exception(entry.value)
                    else:
                        fut.set_result(entry.value)
                except InvalidStateError:
                    pass  # cancelled by its caller while still queued: nobody wants the value
                except Exception:  # a done-callback raised past Future's own `except Exception`
                    _last_resort("a future's done-callback raised")
                futures.pop()
        except BaseException as exc:  # an interrupt: serve the rest, then let it through
            if interrupt is None:
                interrupt = exc
    if interrupt is not None:
        _reraise(interrupt)


def _reraise(exc: BaseException) -> None:
    """Raise exc, without this frame holding it (no cycle exception -> traceback -> frame)."""
    try:
        raise exc
    finally:
        del exc


# _DROP_ENTRIES: a batch function that raises on a caller's thread (inline, or nested) leaves
# a traceback whose user frame links (f_back) to every frame down to the caller's. Were the
# entries still referenced there, the error would hold itself (entry.value) in a cycle until
# the cyclic collector runs; so each frame on that path drops its entries on the way out.

#: Passes of _finish over one chunk before the delivery path reports itself broken.
_FINISH_ATTEMPTS = 8

#: Frames kept free below a nested load for the machinery that delivers its outcome.
_HEADROOM = 150


def _too_deep() -> bool:
    """Return True when the stack is within _HEADROOM frames of the recursion limit.

    A nested load (a batch function that loads) that ran the next call this deep could hit
    RecursionError between taking a chunk and delivering it; it refuses to first.
    """
    limit = sys.getrecursionlimit()
    try:
        sys._getframe(max(1, limit - min(_HEADROOM, limit // 2)))
    except ValueError:
        return False
    return True


class _Abandoned:
    """The message of BatcherClosed for a key that close(timeout=...) gave up on, built lazily.

    The key's repr() is user code (it may raise, or query a database): it runs only when
    the message is read (str() of the exception), never in close() nor under the core's lock.
    """

    __slots__ = ("key", "name")

    def __init__(self, name: str, key: Any) -> None:
        self.name, self.key = name, key

    def __repr__(self) -> str:
        return repr(str(self))

    def __str__(self) -> str:
        try:
            shown = repr(self.key)
        except Exception:
            shown = f"<{type(self.key).__name__} object: repr() failed>"
        return f"batchsync: Batcher {self.name!r} closed before key {shown} was answered"


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
        # A bound method is held weakly (its object holds the Batcher, which holds it): a
        # worker thread, a GC root, must not keep `self.users = Batcher(self._fetch)` alive.
        # The Batcher facade holds it strongly, so it lives exactly as long as the Batcher.
        self._fn_ref: weakref.WeakMethod[Callable[[list[K]], Any]] | None = None
        self.batch_fn: Callable[[list[K]], Any] | None = batch_fn
        if isinstance(batch_fn, types.MethodType):
            self._fn_ref = weakref.WeakMethod(batch_fn)
            self.batch_fn = None
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
        self._failure_log = _lograte.FailureLog()
        self._entries: dict[Hashable, _Entry] = {}  # queued and running, by mkey
        self._queue = Queue(self.window, self.max_batch_size, self.partition_fn is not None)
        self._closing = False
        self._workers: list[threading.Thread] = []
        self._cache: dict[Hashable, Any] = {}
        self._running = 0  # keys in flight
        self._active = 0  # chunks in flight: slots taken of max_concurrency
        # Company by thread: thread id -> when it last loaded or was answered here, and the
        # threads blocked in a wait on this core right now (thread id -> count).
        self._recent: dict[int, float] = {}
        self._waiting: dict[int, int] = {}
        self._tick_loops: set[asyncio.AbstractEventLoop] = set()  # aload flushes scheduled
        self._loads = self._cache_hits = self._deduplicated = 0
        self._batches = self._keys = self._failed_batches = 0
        self._largest = self._coalesced = 0

    # -- identities --------------------------------------------------------------------------

    def identities(self, keys: Sequence[Any]) -> list[tuple[Hashable, Hashable, Hashable]]:
        """Return (ident, mkey, partition) per key; the partition function runs once."""
        part = None if self.partition_fn is None else self.partition_fn()
        if part is not None:
            try:
                hash(part)
            except TypeError:
                raise TypeError(
                    f"batchsync: the partition function returned an unhashable value {part!r} "
                    f"({type(part).__name__}); it must return a hashable partition"
                ) from None
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
        if self.plain:
            return self._load_many_plain(keys)
        idents = self.identities(keys)
        futures: list[Future[V]] = []
        memo = self._scope_memo()
        # [hook call site 1 of 4] the caller's context, captured in the caller's thread.
        hook = _hooks.installed
        token = None if hook is None else hook.on_load(self.name, len(keys))
        with self._lock:  # critical section: look up, de-duplicate, queue
            self._refuse_if_closed_locked()
            self._loads += len(idents)
            self._seen_locked(threading.get_ident())
            for key, (ident, mkey, part) in zip(keys, idents, strict=True):
                entry = self._find_locked(mkey, memo)
                if entry is not None and entry.state == _DONE:
                    futures.append(_resolved(entry.value, entry.failed))
                    continue
                fut: _LoadFuture[V] = _LoadFuture(self)
                if entry is None:
                    entry = self._enqueue_locked(key, ident, mkey, part, memo)
                elif entry.state == _RUNNING:
                    fut.set_running_or_notify_cancel()
                _join(entry, fut)
                fut._entry = entry
                if token is not None:
                    fut._token = token
                futures.append(fut)
            if not self._workers and self._queue:
                self._start_workers_locked()
        return futures

    def _load_many_plain(self, keys: Sequence[K]) -> list[Future[V]]:
        """load_many without key_fn, partition or cache: the hot path, as one tight loop."""
        try:
            dict.fromkeys(keys)  # every key hashable, before anything is queued
        except TypeError:
            for key in keys:
                self._identity(key, None)  # raises the TypeError that names the key
            raise
        futures: list[Future[V]] = []
        append = futures.append
        # [hook call site 1 of 4, plain] the caller's context, captured in the caller's thread.
        hook = _hooks.installed
        token = None if hook is None else hook.on_load(self.name, len(keys))
        with self._lock:  # critical section: de-duplicate, queue
            self._refuse_if_closed_locked()
            self._loads += len(keys)
            self._seen_locked(threading.get_ident())
            entries, queue = self._entries, self._queue.entries
            was_open = self._queue.held > 0
            queued = len(queue)
            try:
                for key in keys:
                    fut: _LoadFuture[V] = _LoadFuture(self)
                    entry = entries.get(key)
                    if entry is None:
                        entry = entries[key] = _Entry(key, key, key, None, [fut])
                        queue.append(entry)
                    else:  # queued or running (plain: no cache, so never done)
                        self._deduplicated += 1
                        if entry.state == _RUNNING:
                            fut.set_running_or_notify_cancel()
                        _join(entry, fut)
                    fut._entry = entry
                    if token is not None:
                        fut._token = token
                    append(fut)
            finally:
                # Also when a key's __hash__ or an interrupt stopped the loop half way: the
                # keys queued so far get their window and a worker, or nobody would send them.
                if len(queue) > queued and self._queue.pushed(was_open, time.monotonic()):
                    self._cond.notify()  # the window opened (a worker times it) or is full
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
            self._seen_locked(threading.get_ident())
            seen: dict[Hashable, _Entry] = {}
            for key, (ident, mkey, part) in zip(keys, idents, strict=True):
                entry = seen.get(mkey)
                if entry is None:
                    entry = self._find_locked(mkey, memo)
                    if entry is None:
                        entry = self._enqueue_locked(key, ident, mkey, part, memo)
                    if entry.state != _DONE:
                        _join(entry, latch)
                        waited.append(entry)
                    seen[mkey] = entry
                elif entry.state == _DONE:  # one rule for both paths: each cached load is a hit
                    self._cache_hits += 1
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
                try:
                    raise entry.value
                finally:  # break the cycle exception -> traceback -> this frame -> entries
                    del entry, slots, waited, seen
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
            self._seen_locked(threading.get_ident())
            self._deduplicated += len(keys) - len(unique)
            entries, queue = self._entries, self._queue.entries
            was_open = self._queue.held > 0
            # One waiters list for all new entries of this call: a list per key would double
            # the objects the garbage collector walks (_join copies it before adding to it).
            waiters = [latch]
            if entries.keys().isdisjoint(unique):  # no key queued or running: all new
                waited = [_Entry(key, key, key, None, waiters) for key in unique]
                # Queued before they are findable: an interrupt between the two calls leaves
                # keys that are sent and answered, never findable entries that are not queued.
                queue.extend(waited)
                entries.update(zip(unique, waited, strict=True))
            else:
                waited = []
                for key in unique:
                    entry = entries.get(key)
                    if entry is None:
                        entry = entries[key] = _Entry(key, key, key, None, waiters)
                        queue.append(entry)
                    else:
                        self._deduplicated += 1
                        _join(entry, latch)
                    waited.append(entry)
            latch.remaining = len(waited)
            if waited:
                if self._queue.pushed(was_open, time.monotonic()):
                    self._cond.notify()
                if not self._workers:
                    self._start_workers_locked()
        if not waited:
            return []
        self._wait(waited, latch, timeout)
        for entry in waited:
            if entry.failed:
                try:
                    raise entry.value  # the first failed key's error, in key order
                finally:  # break the cycle exception -> traceback -> this frame -> entries
                    del entry, waited, unique
        if len(waited) == len(keys):  # no key twice: waited is in key order
            return [entry.value for entry in waited]
        unique = dict(zip(unique, waited, strict=True))
        return [unique[key].value for key in keys]

    def _refuse_if_closed_locked(self) -> None:
        if self._closing:
            raise BatcherClosed(f"batchsync: Batcher {self.name!r} is closed")

    def _wait(self, waited: list[_Entry], latch: _Latch, timeout: float | None) -> None:
        """Block until latch opens for the entries of one get_many call, or time out."""
        try:
            ok = self.block_on(
                waited, lambda: latch.remaining == 0, timeout, lambda: latch.wait(timeout), latch
            )
        finally:
            waited = []  # see _DROP_ENTRIES
        if not ok:
            raise TimeoutError(f"batchsync: no result within {timeout} s")

    def _seen_locked(self, tid: int) -> None:
        """Note that thread tid is active on this core now."""
        recent = self._recent
        now = recent[tid] = time.monotonic()
        if len(recent) > 256:  # forget threads that have been quiet for a window
            horizon = now - self.window
            for other in [t for t, seen in recent.items() if seen <= horizon]:
                del recent[other]

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
                hit.value, hit.state, hit.failed = value, _DONE, _is_error(value)
                return hit
        if memo is not None:
            entry: _Entry | None = memo.get(mkey)
            if (
                entry is not None
                and entry.state != _DONE
                and self._entries.get(mkey) is not entry
            ):
                entry = None  # queued or in flight in a parent process (a fork in a scope)
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
    ) -> _Entry:
        entry = _Entry(key, ident, mkey, part)
        self._entries[mkey] = entry
        if memo is not None:
            memo[mkey] = entry
        if self._queue.push(entry, time.monotonic()):
            self._cond.notify()  # the window opened (a worker times it) or is full
        return entry

    # -- waiting -----------------------------------------------------------------------------

    def block_on(
        self,
        entries: list[_Entry],
        done: Callable[[], bool],
        timeout: float | None,
        wait: Callable[[], _T],
        latch: _Latch | None = None,
    ) -> _T:
        """Block the caller on entries: apply the dispatch rule, then return ``wait()``.

        Inside a batch function (or on a worker thread): run the queued chunks here, see
        _help. On an ordinary thread: count the caller as blocked for the dispatch rule
        (see _company_locked) while it waits, and dispatch at once when nobody else could
        add keys; then, when inline and with no timeout to honour, run due chunks on this
        thread while a slot is free and the caller's own keys are still queued.
        """
        if _tls.worker or _tls.running:
            try:
                if timeout is None:
                    self._help(entries, done)
                else:  # leave on time: a worker runs the batch, this caller only waits
                    self._refuse_cycle(entries)
                    self.flush()
            finally:
                entries = []  # see _DROP_ENTRIES
            return wait()
        scoped = _scope_memo.get() is not None
        if not scoped and all(e.state != _QUEUED for e in entries):
            return wait()  # sent already: nothing left to decide (load_many + result())
        tid = threading.get_ident()
        if scoped:
            _activity.change(0, 1)
        try:
            try:
                self._before_wait(entries, timeout, tid, latch)
            finally:
                entries = []  # see _DROP_ENTRIES
            return wait()
        finally:
            if scoped:
                _activity.change(0, -1)
            with self._lock:  # critical section: the caller runs again
                if latch is None or latch.tid:  # not already counted as answered by _finish
                    self._unwait_locked(tid)
                    if latch is not None:
                        latch.tid = 0

    def _unwait_locked(self, tid: int) -> None:
        """Count thread tid as running again: it is company from now on (see the rule)."""
        waiting = self._waiting
        count = waiting.get(tid, 0)
        if count > 1:
            waiting[tid] = count - 1
        else:
            waiting.pop(tid, None)
        self._recent[tid] = time.monotonic()

    def _before_wait(
        self, entries: list[_Entry], timeout: float | None, tid: int, latch: _Latch | None
    ) -> None:
        # With a timeout a worker runs the batch, so that the caller can leave on time.
        inline = self.inline and timeout is None
        i, n = 0, len(entries)
        first = True
        if inline and _too_deep():
            inline = False  # no room below for running and delivering a call: hand it over
        chunk: list[_Entry] | None = None
        try:
            while True:
                while i < n and entries[i].state != _QUEUED:
                    i += 1
                chunk = None
                try:
                    with self._lock:  # critical section: the dispatch rule, take or hand over
                        if first:
                            self._waiting[tid] = self._waiting.get(tid, 0) + 1
                            if latch is not None:
                                latch.tid = tid
                        first = False
                        if i < n and self._queue.held and not self._company_locked(tid):
                            self._queue.make_due()
                        if self._queue.due and self._active < self.max_concurrency:
                            if inline and i < n:
                                chunk = self._take_locked()
                            else:
                                self._cond.notify()
                    if chunk is None:
                        return
                    if chunk:
                        self._run(chunk, wake=False)
                except BaseException as exc:
                    while chunk and chunk[0].slot:  # _unrun itself may be interrupted: again
                        try:  # noqa: SIM105 (no suppress(): a plain try is cheaper and has no call to interrupt)
                            self._unrun(chunk, exc)
                        except BaseException:
                            pass
                    raise
        finally:
            entries, chunk = [], None  # see _DROP_ENTRIES

    def _company_locked(self, tid: int) -> bool:
        """Return True when the open window should wait: someone may still add keys to it.

        THE DISPATCH RULE. A queued key is worth holding back only while somebody who could
        still add keys to its call is running (PostgreSQL's commit_delay waits only while
        commit_siblings other transactions are active). So when a caller blocks on keys
        whose window is open, the window is held only while there is company:

        - a request in progress: an outermost ``batchsync.scope()`` (the Flask and Django
          integrations open one per request) whose thread is not blocked in a batchsync
          wait; when the last of them blocks or ends, every held window is dispatched
          (_activity pokes the holding cores);
        - a request to come: a threaded server accepts and parses concurrent requests
          one after the other, so while they keep arriving close together (three of the
          latest gaps between requests of different threads fit in the window), the window
          is held until the next one is due: three such gaps after the latest start;
        - a call of this Batcher in flight: its callers come back with their next keys
          as soon as it returns (the next level of their trees), so the window waits for
          them; under load this turns the callers into one convoy, one call per level.
          When it returns, _finish applies the rule again: a get_many caller counts as
          running from the moment its answer is published (not when its thread wakes),
          and with nobody to come back (the call's callers wait on the held keys
          themselves) the held keys go at once;
        - a thread likely to come back: another thread that loaded from this Batcher, or
          was answered by it, within the last window and is not blocked on it now (a
          pool's thread between two requests, or any thread outside a scope); when it
          blocks here too, it dispatches for both.

        Otherwise (a lone request, or everybody waits) the keys are dispatched at once. The
        window is thus an upper bound on the wait: the worker still dispatches when it
        closes, when max_batch_size keys wait, on flush() and on close(). With eager=True
        there is never company: a blocking caller always dispatches at once.

        Called under the core's lock; takes _activity's lock inside it.
        """
        if self.eager:
            return False
        queue = self._queue
        with _activity.lock:  # critical section: read the count and register atomically
            if _activity.running() > 0:
                _activity.holding.add(self)
                queue.hold_until(math.inf)
                return True
            coming = _activity.next_arrival(tid, self.window)
        now = time.monotonic()
        horizon = now - self.window
        waiting = self._waiting
        if self._active or any(
            seen > horizon and other != tid and other not in waiting
            for other, seen in self._recent.items()
        ):
            queue.hold_until(math.inf)
            return True
        if coming > now:  # only requests to come: close the window when the next is due
            queue.hold_until(coming)
            self._cond.notify()  # a worker times the earlier close
            return True
        return False

    def poke(self) -> None:
        """Dispatch a held window if its company is gone (_activity calls it, unlocked)."""
        with self._lock:  # critical section: the dispatch rule again
            if self._queue.held and not self._company_locked(0):
                self._queue.make_due()
                self._cond.notify()
            if not self._queue.held:
                with _activity.lock:
                    _activity.holding.discard(self)

    def _help(self, entries: list[_Entry], done: Callable[[], bool]) -> None:
        """Run queued chunks on this (worker) thread until done() or nothing is left to run.

        A batch function that loads from its own Batcher, or a chain of Batchers, would
        otherwise wait for a worker slot that it occupies itself (with max_concurrency=1,
        for ever). What remains after this runs on other threads, so the caller may wait.
        """
        me = threading.current_thread()
        chunk: list[_Entry] | None = None
        try:
            while not done():
                if _too_deep():
                    raise RecursionError(
                        f"batchsync: nested loads of {self.name!r} too deep to run another call"
                    )
                chunk = None
                try:
                    with self._lock:  # critical section: take a chunk to run on this thread
                        self._queue.make_due()
                        # A call nested in one of this Batcher's own calls (or on its own worker)
                        # borrows the slot of the call it runs in; nested in another Batcher's
                        # call it takes a free slot like anyone, so max_concurrency holds.
                        if self._queue.due and (
                            self._active < self.max_concurrency
                            or me in self._workers
                            or self._runs_here_locked()
                        ):
                            chunk = self._take_locked()
                        elif self._queue.due:
                            self._cond.notify()
                    if chunk is not None and chunk:
                        self._run(chunk)
                except BaseException as exc:
                    while chunk and chunk[0].slot:  # _unrun itself may be interrupted: again
                        try:  # noqa: SIM105 (no suppress(): a plain try is cheaper and has no call to interrupt)
                            self._unrun(chunk, exc)
                        except BaseException:
                            pass
                    raise
                if chunk is not None:
                    continue
                self._refuse_cycle(entries)
                return  # what is left runs on other threads: the caller waits for it
        finally:
            entries, chunk = [], None  # see _DROP_ENTRIES

    def _refuse_cycle(self, entries: list[_Entry]) -> None:
        """Raise BatchCycleError if this thread's own running call computes one of entries."""
        mine = _tls.running or []
        for entry in entries:
            if entry.state == _RUNNING and any(entry in chunk for chunk in mine):
                raise BatchCycleError(
                    f"batchsync: the batch function of {self.name!r} waited on key "
                    f"{entry.key!r}, which its own running call is computing"
                )

    def _runs_here_locked(self) -> bool:
        """Return True when this thread is computing one of this core's chunks right now."""
        entries = self._entries
        return any(chunk and entries.get(chunk[0].mkey) is chunk[0] for chunk in _tls.running or ())

    def _unrun(self, chunk: list[_Entry] | None, exc: BaseException) -> None:
        """Fail a chunk taken but not run (an interrupt came in between): free its slot."""
        tries = 0
        while tries < _FINISH_ATTEMPTS and chunk and chunk[0].slot:
            tries += 1
            try:  # noqa: SIM105 (no suppress(): a plain try is cheaper and has no call to interrupt)
                self._finish_safely(chunk, (), exc, True)
            except BaseException:
                pass  # interrupted again; the caller raises the first interrupt

    # -- the worker loop ---------------------------------------------------------------------

    def _start_workers_locked(self) -> None:
        # Starting a thread under the lock is safe (the new thread only blocks on this lock
        # after Thread.start() has returned) and keeps close() from missing a worker.
        # A thread is a worker once started: one that failed to start is never joined.
        error: BaseException | None = None
        for i in range(self.max_concurrency - len(self._workers)):
            try:
                thread = threading.Thread(
                    target=self._worker, name=f"batchsync-{self.name}-{i}", daemon=True
                )
                thread.start()
            except Exception as exc:  # "can't start new thread": fewer workers, or none
                error = exc
                continue
            self._workers.append(thread)
        if error is not None and not self._workers:
            self._fail_queued_locked(error)

    def _fail_queued_locked(self, error: BaseException) -> None:
        """No worker could start: fail every queued key with the error (the next load retries).

        Only the calling load's keys can be queued here (any earlier ones were failed the
        same way), so their futures are fresh, with no callbacks: they are resolved under
        the lock, which is the only way to fail them before the call returns them.
        """
        futures: list[tuple[Future[Any], _Entry]] = []
        latches: list[_Latch] = []
        for entry in self._queue.clear():
            entry.value, entry.failed, entry.state = error, True, _DONE
            if self._entries.get(entry.mkey) is entry:
                del self._entries[entry.mkey]
            _collect(entry, futures, latches)
        _deliver(futures, latches)

    # -- the worker loop ---------------------------------------------------------------------

    def _worker(self) -> None:
        _tls.worker = True
        while True:
            try:
                with self._lock:  # critical section: wait for a due chunk and take it
                    chunk = self._wait_chunk_locked()
                if chunk is None:
                    return
                self._run(chunk)
                chunk = None  # an idle worker holds no finished chunk (its keys, its error)
            except BaseException:  # _run delivers every error; this is a bug: keep serving
                _last_resort(f"internal error in a worker of {self.name!r}")

    def _wait_chunk_locked(self) -> list[_Entry] | None:
        # The worker's part of the window: a key that arrives at an empty queue opens a
        # window of `window` seconds; keys that arrive while it is open join it. The queued
        # keys become *due* when the window closes, when max_batch_size keys wait, on flush()
        # and on close(), and earlier when a caller blocks on them with nobody left who could
        # add keys (the dispatch rule: _company_locked). A free worker takes due keys in
        # chunks of at most max_batch_size (one partition per chunk). While every slot is
        # busy, due keys pile up and the next free slot sends them together (group commit).
        #
        # With inline=True a waiting caller with no timeout runs the chunk itself, in its own
        # thread, when a slot (max_concurrency) is free: that saves the two thread switches
        # of a hand-over, most of the layer's cost for a lone request. It is opt-in because
        # the batch function then runs on a caller's thread, where thread-bound state (a
        # Django connection, a thread-local ORM session) belongs to that caller's request;
        # batchsync.pg turns it on, as its batch function borrows from a pool. Workers and
        # inline callers share the slots.
        queue = self._queue
        while True:
            if queue.due and self._active < self.max_concurrency:
                chunk = self._take_locked()
                if chunk:
                    return chunk
                continue
            if queue.due:
                self._cond.wait()  # every slot is busy: _finish notifies when one frees
            elif queue:
                if self._closing:
                    queue.make_due()
                    continue
                delay = queue.expire(time.monotonic())
                if delay is not None:
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
        chunk = self._queue.take()
        live: list[_Entry] = []
        counted = False
        shared = None  # the one waiters list of a get_many call's new entries: a latch only
        try:
            for entry in chunk:
                waiters = entry.waiters
                if waiters is shared:
                    entry.state = _RUNNING  # no call between this and append: see except
                    live.append(entry)
                    continue
                cancelled = False
                if len(waiters) == 1 and type(waiters[0]) is _Latch:
                    shared = waiters
                else:  # futures among the waiters
                    for w in waiters:
                        # Once running, a future can no longer be cancelled by its caller.
                        if type(w) is _Latch:
                            continue
                        if w.done() and not w.cancelled():
                            # Finished by its own caller: skip it, serve the rest. Not through
                            # set_running_or_notify_cancel, which would log CRITICAL first (a
                            # logging filter that raises there must not stop the take).
                            cancelled = True
                            continue
                        try:
                            if not w.set_running_or_notify_cancel():
                                cancelled = True
                        except RuntimeError:
                            # Completed by its own caller: skip it, serve the rest. (A future
                            # running already was set so by an interrupted take: keep it.)
                            if w.done():
                                cancelled = True
                if cancelled:
                    entry.waiters = waiters = [
                        w for w in waiters if type(w) is _Latch or not w.done()
                    ]
                if waiters:
                    entry.state = _RUNNING
                    live.append(entry)
                elif entry.state == _QUEUED:  # every caller of this key cancelled: skip it
                    entry.state = _DONE
                    entry.failed = True
                    if self._entries.get(entry.mkey) is entry:
                        del self._entries[entry.mkey]
            if live:
                n = len(live)
                self._active += 1
                self._batches += 1
                self._keys += n
                self._running += n
                counted = True
                live[0].slot = True  # the chunk's slot: freed once, by _finish
                if n > 1:
                    self._coalesced += n
                if n > self._largest:
                    self._largest = n
        except BaseException:
            # Interrupted (a signal handler raised): nothing is taken, the chunk is due again.
            if counted:
                self._active -= 1
                self._batches -= 1
                self._keys -= len(live)
                self._running -= len(live)
            for entry in live:
                entry.state, entry.slot = _QUEUED, False
            self._queue.untake([e for e in chunk if e.state == _QUEUED])
            if self._queue.due:
                self._cond.notify()  # a worker sends it: others may be blocked on these keys
            raise
        if self._queue.due and self._active < self.max_concurrency:
            self._cond.notify()  # more due chunks: another free worker may take one
        return live

    def _run(self, chunk: list[_Entry], wake: bool = True) -> None:
        """Call the batch function for one chunk and deliver its outcome; never raises.

        By construction: from here to delivery everything is inside try/finally, so whatever
        raises (the batch function, the result contract, a hostile container, logging, an
        internal bug) ends with the chunk's waiters failed with that error and the slot freed.
        """
        error: BaseException | None = None
        values: Sequence[Any] = ()
        try:
            started = time.perf_counter()
            values, error = self._call(chunk)
            self._log(chunk, error, time.perf_counter() - started)
        except BaseException as exc:
            if error is None:
                error, values = exc, ()
        finally:
            interrupt: BaseException | None = None
            tries = 0
            while tries < _FINISH_ATTEMPTS and (
                chunk[0].slot or chunk[-1].state != _DONE or chunk[-1].waiters
            ):
                tries += 1
                try:
                    self._finish_safely(chunk, values, error, wake)
                except BaseException as exc:  # an interrupt: finish (again), then let it go
                    if interrupt is None:
                        interrupt = exc
            try:
                if interrupt is not None:
                    raise interrupt
            finally:
                interrupt = None
                # Break the cycles error -> traceback -> these frames -> the chunk, its keys
                # and waiters, as concurrent.futures' worker does: a failed batch is freed
                # by reference counting, not left to the cyclic collector.
                if error is not None:
                    _clear_own_frames(error)
                chunk = values = error = None  # type: ignore[assignment]

    def _call(self, chunk: list[_Entry]) -> tuple[Sequence[Any], BaseException | None]:
        """Call the batch function for chunk: return (values, None) or ((), the error).

        A frame of its own, finished when the chunk is delivered: the error's traceback
        starts here, so _run can clear it (see _clear_own_frames) without losing the user's.
        """
        running = _tls.running
        if running is None:
            running = _tls.running = []
        try:
            running.append(chunk)  # inside the try: an interrupt here pops it again
            keys = [e.key for e in chunk]
            # A fresh, empty context: the call serves many callers, so it must see none
            # of their context variables (request scope, app context), wherever it runs.
            context = contextvars.Context()
            if self.partition_fn is not None:
                context.run(_partition.set, chunk[0].partition)
            fn = self.batch_fn
            if fn is None:
                fn = self._batch_fn_of_owner()
            # [hook call site 4 of 4] the batch call, wrapped with its callers' tokens.
            hook = _hooks.installed
            if hook is None:
                result = context.run(fn, keys)
            else:
                tokens = _tokens(chunk)
                part = chunk[0].partition
                result = context.run(hook.run_batch, self.name, keys, part, tokens, fn)
            return self._match(chunk, result), None
        except BaseException as exc:  # delivered to the chunk's callers, never fatal here
            return (), exc
        finally:
            if running and running[-1] is chunk:
                running.pop()

    def _batch_fn_of_owner(self) -> Callable[[list[K]], Any]:
        """The batch function, a bound method held weakly (see _Core.__init__)."""
        fn = None if self._fn_ref is None else self._fn_ref()
        if fn is None:
            raise BatcherClosed(
                f"batchsync: Batcher {self.name!r} was collected with the object of its "
                "batch method before this key was sent"
            )
        return fn

    def _log(self, chunk: list[_Entry], error: BaseException | None, elapsed: float) -> None:
        """Log one call; a logging filter or handler that raises is reported, never propagated."""
        try:
            if error is not None:
                # Once with its traceback, then at most once per interval (see _lograte).
                suppressed = self._failure_log.admit(time.monotonic())
                if suppressed is None:
                    logger.debug(
                        "batchsync %s: batch of %d keys failed after %.6f s (%s; ERROR record "
                        "left out by the rate limit)",
                        self.name,
                        len(chunk),
                        elapsed,
                        type(error).__name__,
                    )
                elif suppressed:
                    logger.error(
                        "batchsync %s: batch of %d keys failed after %.6f s (%d more failed "
                        "batches not logged since the previous record)",
                        self.name,
                        len(chunk),
                        elapsed,
                        suppressed,
                        exc_info=error,
                    )
                else:
                    logger.error(
                        "batchsync %s: batch of %d keys failed after %.6f s",
                        self.name,
                        len(chunk),
                        elapsed,
                        exc_info=error,
                    )
            elif logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "batchsync %s: batch of %d keys in %.6f s", self.name, len(chunk), elapsed
                )
        except BaseException:
            _last_resort(f"logging a batch of {self.name!r} raised")

    def _finish_safely(
        self, chunk: list[_Entry], values: Sequence[Any], error: BaseException | None, wake: bool
    ) -> None:
        """_finish, and if that raises, fail what it left and free the slot, then deliver.

        Both passes gather into the same lists, and _finish takes each entry's waiters as it
        gathers them, so what the first pass gathered before it raised is still delivered
        and nothing is counted twice. Only an interrupt (a signal handler raising) during
        the delivery itself gets through, after every waiter was served.
        """
        # The loops test plain attributes, no calls: an interrupt (a signal handler that
        # raises, which CPython runs at calls and loop back-edges) lands inside a try.
        futures: list[tuple[Future[Any], _Entry]] = []
        latches: list[_Latch] = []
        interrupt: BaseException | None = None
        tries = 0
        try:
            while tries < _FINISH_ATTEMPTS and (
                chunk[0].slot or chunk[-1].state != _DONE or chunk[-1].waiters
            ):
                tries += 1
                try:
                    self._finish(chunk, values, error, wake, futures, latches)
                except BaseException as exc:
                    # The rest of the chunk fails with what broke the pass; an interrupt
                    # (not an Exception: a signal handler raised) goes on once all is done.
                    if interrupt is None and not isinstance(exc, Exception):
                        interrupt = exc
                    if error is None:
                        error, values = exc, ()
                    if tries == _FINISH_ATTEMPTS:
                        _last_resort(f"delivering a batch of {self.name!r} failed")
        finally:
            tries = 0
            while tries < _FINISH_ATTEMPTS and (latches or futures):
                tries += 1
                try:
                    _deliver(futures, latches)
                except BaseException as exc:
                    if interrupt is None:
                        interrupt = exc
        if interrupt is not None:
            _reraise(interrupt)

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
            if type(result) is not list and type(result) is not tuple:
                # Any other Sequence (a list subclass too) is read here, inside the caller's
                # try: an item that raises fails the call instead of the delivery.
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
        futures: list[tuple[Future[Any], _Entry]],
        latches: list[_Latch],
    ) -> None:
        """Publish a chunk's outcome, free its slot, gather its waiters (for _deliver)."""
        with self._lock:  # critical section: publish outcomes, forget entries, collect waiters
            if error is not None:
                self._failed_batches += 1
            n = len(chunk)
            if chunk and chunk[0].slot:  # _finish_safely may call twice: free the slot once
                # No call among these three (an interrupt lands only at a call or a loop).
                self._running -= n
                self._active -= 1
                chunk[0].slot = False
            if self._closing and not self._active:
                self._cond.notify_all()  # the last call in flight: the workers may end
            elif wake and self._queue.due:
                self._cond.notify()  # a slot is free for the next due chunk
            entries, cache_all, failed_all = self._entries, self.cache_all, error is not None
            for i, entry in enumerate(chunk):
                # Each step is idempotent: a pass interrupted anywhere is done again.
                if entry.state != _DONE:  # DONE: abandoned by close(timeout=...), or published
                    value = error if failed_all else values[i]
                    entry.value = value
                    # type(), not isinstance(): see _is_error
                    entry.failed = failed_all or issubclass(type(value), BaseException)
                    entry.state = _DONE
                mkey = entry.mkey
                if entries.get(mkey) is entry:
                    del entries[mkey]
                if cache_all and not entry.failed and not entry.uncached:
                    # setdefault: a prime() during the flight wins over the older value
                    self._cache.setdefault(mkey, entry.value)
                waiters = entry.waiters
                if len(waiters) == 1 and type(waiters[0]) is _Latch:  # one get_many caller
                    latch = waiters[0]
                    latch.remaining -= 1
                    entry.waiters = _TAKEN  # taken: a second pass counts it no more
                    if not latch.remaining:
                        latches.append(latch)
                elif waiters:
                    _collect(entry, futures, latches)
            for latch in latches:
                if latch.tid:  # answered: it runs again (and may bring keys) from now on
                    self._unwait_locked(latch.tid)
                    latch.tid = 0
            if self._queue.held and not self._company_locked(0):
                # This call was the company of the held keys and nobody it answered runs
                # again (they may be the very callers waiting on the held keys): send them.
                self._queue.make_due()
                self._cond.notify()

    # -- control -----------------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:  # critical section: make everything queued due
            if self._queue.make_due():
                self._cond.notify()

    def flush_at_tick_end(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush once the callbacks already scheduled on loop have run (one per tick)."""
        with self._lock:  # critical section: one scheduled flush per loop and tick
            if loop in self._tick_loops:
                return
            self._tick_loops.add(loop)
        loop.call_soon(self._tick_flush, loop)

    def _tick_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:  # critical section: make everything queued due
            self._tick_loops.discard(loop)
            if self._queue.make_due():
                self._cond.notify()

    def close(self, timeout: float | None) -> None:
        workers = self.close_nowait()
        if _tls.running:
            # Called from inside a batch function: waiting would count the caller's own call
            # (inline, or nested) among those it waits for. The queue is still sent.
            return
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
            return self._close_locked()

    def _close_locked(self) -> list[threading.Thread]:
        self._closing = True
        self._queue.make_due()
        self._cond.notify_all()
        return list(self._workers)

    def collected(self) -> None:
        """The Batcher was collected: close_nowait, without ever blocking on the core's lock.

        The cyclic garbage collector may run this on any thread, also on a worker of this
        core that holds the (non-reentrant) lock: then the close is handed to a new thread.
        """
        if self._fn_ref is not None and self.batch_fn is None:
            self.batch_fn = self._fn_ref()  # keep the method for the queue still to send
        if self._lock.acquire(blocking=False):
            try:
                self._close_locked()
            finally:
                self._lock.release()
            return
        try:
            threading.Thread(
                target=self.close_nowait, name=f"batchsync-{self.name}-close", daemon=True
            ).start()
        except Exception:
            self._closing = True  # no thread: loads are refused; workers see it as they wake

    def _abandon(self) -> None:
        """Fail every key still queued or running with BatcherClosed (close timed out)."""
        futures: list[tuple[Future[Any], _Entry]] = []
        latches: list[_Latch] = []
        with self._lock:  # critical section: take every entry out
            entries = list(self._entries.values())
            self._entries.clear()
            self._queue.clear()
            for entry in entries:
                entry.state = _DONE
                entry.failed = True
                entry.value = BatcherClosed(_Abandoned(self.name, entry.key))  # no repr() here
                _collect(entry, futures, latches)
        _deliver(futures, latches)

    @property
    def closed(self) -> bool:
        return self._closing

    def prime(self, mkey: Hashable, value: Any) -> None:
        memo = self._scope_memo()
        failed = _is_error(value)
        with self._lock:  # critical section: the cache
            if self.cache_all:
                # Like the DataLoader peers: an existing key is left alone (clear() first).
                self._cache.setdefault(mkey, value)
            elif memo is not None:
                old = memo.get(mkey)
                if old is None or (old.state == _DONE and old.failed):
                    entry = _Entry(None, None, mkey, None)
                    entry.value, entry.state, entry.failed = value, _DONE, failed
                    memo[mkey] = entry

    def clear(self, mkey: Hashable) -> None:
        memo = self._scope_memo()
        with self._lock:  # critical section: the cache
            self._cache.pop(mkey, None)
            entry = self._entries.get(mkey)
            if entry is not None:  # in flight: its value is older than the clear
                entry.uncached = True
            if memo is not None:
                memo.pop(mkey, None)

    def clear_all(self) -> None:
        memo = self._scope_memo()
        with self._lock:  # critical section: the cache
            self._cache.clear()
            for entry in self._entries.values():  # in flight: values older than the clear
                entry.uncached = True
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
