"""Batcher: the public face of the batching engine, and the ``batched`` decorator."""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, overload

from . import _lifecycle
from ._core import _Core, check_timeout
from ._scope import in_scope
from ._stats import Stats
from ._types import BatcherOptions, BatchResult, CacheMode, K, MissingMode, V

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Batcher", "aload", "batched"]


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"batchsync: {name} must be an int >= 1, not {value!r}")
    if value < 1:
        raise ValueError(f"batchsync: {name} must be an int >= 1, not {value!r}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"batchsync: {name} must be True or False, not {value!r}")
    return value


class Batcher(Generic[K, V]):
    """Gather single-key loads from many threads into bulk calls of ``batch_fn``.

    ``batch_fn(keys)`` gets a list of unique keys and returns either a Mapping from key (its
    ``key_fn`` identity) to value, or a Sequence with one item per key, in order. A key absent
    from a Mapping resolves to None (or fails with KeyError with ``missing="raise"``); an
    exception instance as a value fails that key alone; an exception raised by ``batch_fn``
    fails every key of that call; any other result fails the call with BatchError.

    Options:
        window: the most seconds a key waits for company before its batch is sent. A
            caller that blocks (get, get_many, Future.result) while other requests are
            running waits up to this long for their keys to join its call; with nobody else
            running it is dispatched at once (see the README, "Choosing the window").
            Futures nobody blocks on yet wait out the whole window. 0 = send at once.
        max_batch_size: the most keys in one call; a full queue is sent at once.
        max_concurrency: how many calls of ``batch_fn`` may run at the same time.
        cache: False; True to memoize values (not errors) until clear(); "scope" to memoize
            only inside a ``batchsync.scope()``.
        key_fn: maps a key to the hashable identity used for de-duplication and the cache.
        partition: called at load time in the caller's thread; keys with different
            partitions never share a call (see ``batchsync.current_partition()``).
        missing: "none" or "raise", for keys a Mapping result leaves out.
        eager: when True, a caller that blocks on a key sends the queue at once, never
            waiting for company: the lowest latency, the least coalescing of blocking
            callers. Default False.
        inline: when True, a caller that blocks with no timeout and finds a free slot runs
            the batch function in its own thread instead of handing it to a worker. Only
            for batch functions that use no thread-bound state (a pool, not a thread-local
            connection or session): the call also serves other threads' keys.
        name: for thread names and logs; defaults to the batch function's name.

    Thread-safe: every method may be called from any thread. The batch function runs on the
    Batcher's worker threads (started on the first load), or with inline=True on a waiting
    caller's thread, always in a fresh contextvars context and never under a batchsync lock.
    """

    def __init__(
        self,
        batch_fn: Callable[[list[K]], BatchResult[V]],
        *,
        window: float = 0.005,
        max_batch_size: int = 500,
        max_concurrency: int = 1,
        cache: CacheMode = False,
        key_fn: Callable[[K], Hashable] | None = None,
        partition: Callable[[], Hashable] | None = None,
        missing: MissingMode = "none",
        eager: bool = False,
        inline: bool = False,
        name: str | None = None,
    ) -> None:
        if not callable(batch_fn):
            raise TypeError(f"batchsync: batch_fn must be callable, not {batch_fn!r}")
        if isinstance(window, bool) or not isinstance(window, (int, float)):
            raise TypeError(f"batchsync: window must be a number of seconds, not {window!r}")
        if math.isnan(window) or math.isinf(window) or window < 0:
            raise ValueError(f"batchsync: window must be a finite number >= 0, not {window!r}")
        _check_int("max_batch_size", max_batch_size)
        _check_int("max_concurrency", max_concurrency)
        if cache not in (False, True, "scope") or not isinstance(cache, (bool, str)):
            raise ValueError(f"batchsync: cache must be False, True or 'scope', not {cache!r}")
        if key_fn is not None and not callable(key_fn):
            raise TypeError(f"batchsync: key_fn must be callable or None, not {key_fn!r}")
        if partition is not None and not callable(partition):
            raise TypeError(f"batchsync: partition must be callable or None, not {partition!r}")
        if missing not in ("none", "raise"):
            raise ValueError(f"batchsync: missing must be 'none' or 'raise', not {missing!r}")
        if name is None:
            name = getattr(batch_fn, "__qualname__", None) or type(batch_fn).__name__
        elif not isinstance(name, str):
            raise TypeError(f"batchsync: name must be a str or None, not {name!r}")
        self._core: _Core[K, V] = _Core(
            batch_fn,
            window=float(window),
            max_batch_size=max_batch_size,
            max_concurrency=max_concurrency,
            cache=cache,
            key_fn=key_fn,
            partition=partition,
            missing=missing,
            eager=_check_bool("eager", eager),
            inline=_check_bool("inline", inline),
            name=name,
        )
        # The core holds a bound method weakly (so that an object owning a Batcher of its
        # own method can be collected); this reference keeps it alive as long as the Batcher.
        self._batch_fn = batch_fn
        _lifecycle.register(self._core)
        # Worker threads hold the core, not the Batcher: when the Batcher is collected, its
        # queue is sent and its workers end. The exit hook closes live cores itself.
        weakref.finalize(self, self._core.collected).atexit = False

    @property
    def name(self) -> str:
        """The name used for worker threads and log records."""
        return self._core.name

    @property
    def closed(self) -> bool:
        """True once close() has been called."""
        return self._core.closed

    def load(self, key: K) -> Future[V | None]:
        """Queue key and return a Future of its value; never blocks on I/O.

        Raises TypeError at once for an unhashable key (without key_fn) and BatcherClosed
        after close(). Cancelling the future while the key is queued drops the key from its
        batch when no other caller waits on it.
        """
        return self._core.load_many((key,))[0]  # type: ignore[return-value]

    def load_many(self, keys: Iterable[K]) -> list[Future[V | None]]:
        """Queue keys and return one Future per key, in the same order (duplicates included)."""
        return self._core.load_many(_as_seq(keys))  # type: ignore[return-value]

    def get(self, key: K, timeout: float | None = None) -> V | None:
        """Return the value of key, waiting at most timeout seconds (TimeoutError after)."""
        return self._core.get_many((key,), check_timeout(timeout))[0]

    def get_many(self, keys: Iterable[K], timeout: float | None = None) -> list[V | None]:
        """Return the values of keys in order: all are queued first, so they share batches.

        Raises the first failed key's exception (in key order), or TimeoutError when the
        values are not all there within timeout seconds.
        """
        return self._core.get_many(_as_seq(keys), check_timeout(timeout))

    def flush(self) -> None:
        """Send what is queued now, without waiting for the window to close."""
        self._core.flush()

    def prime(self, key: K, value: V) -> None:
        """Put a value in the cache for key (the current scope's, with cache="scope").

        Raise ValueError without a cache, or with cache="scope" outside a scope (where
        nothing is cached, so the value would be dropped unseen).
        """
        self._need_cache("prime")
        if self._core.cache_scope and not in_scope():
            raise ValueError(
                "batchsync: prime() on a Batcher with cache='scope' needs an open "
                "batchsync.scope()"
            )
        self._core.prime(self._core.identities((key,))[0][1], value)

    def clear(self, key: K) -> None:
        """Forget the cached value of key, so the next load calls the batch function."""
        self._need_cache("clear")
        self._core.clear(self._core.identities((key,))[0][1])

    def clear_all(self) -> None:
        """Forget every cached value (with cache="scope", those of the current scope)."""
        self._need_cache("clear_all")
        self._core.clear_all()

    def _need_cache(self, method: str) -> None:
        if not (self._core.cache_all or self._core.cache_scope):
            raise ValueError(
                f"batchsync: {method}() needs a Batcher made with cache=True or 'scope'"
            )

    def close(self, timeout: float | None = None) -> None:
        """Stop taking loads, send every queued key, wait for the batches in flight.

        Idempotent. With a timeout, return within it: keys still queued or in flight by then
        fail with BatcherClosed. After close(), load and get raise BatcherClosed.
        """
        self._core.close(check_timeout(timeout))

    def stats(self) -> Stats:
        """Return a frozen snapshot of the counters."""
        return self._core.stats()

    def __enter__(self) -> Batcher[K, V]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else "open"
        return f"<batchsync.Batcher {self._core.name!r} {state}>"


def _as_seq(keys: Iterable[Any]) -> Sequence[Any]:
    if isinstance(keys, (list, tuple)):
        return keys
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise TypeError(f"batchsync: keys must be an iterable of keys, not {keys!r}")
    return list(keys)


@overload
def batched(fn: Callable[[list[K]], BatchResult[V]], /) -> Batcher[K, V]: ...


@overload
def batched(
    **options: Unpack[BatcherOptions],
) -> Callable[[Callable[[list[K]], BatchResult[V]]], Batcher[K, V]]: ...


def batched(
    fn: Callable[[list[K]], BatchResult[V]] | None = None, /, **options: Any
) -> Batcher[K, V] | Callable[[Callable[[list[K]], BatchResult[V]]], Batcher[K, V]]:
    """Turn a batch function into a Batcher: ``@batched`` or ``@batched(window=0.002)``."""
    if fn is not None:
        return Batcher(fn, **options)

    def decorate(f: Callable[[list[K]], BatchResult[V]]) -> Batcher[K, V]:
        return Batcher(f, **options)

    return decorate


async def aload(batcher: Batcher[K, V], key: K) -> V | None:
    """Await the value of key from an asyncio task without blocking the event loop.

    The key is queued and the queue is sent at the end of the event loop's current tick:
    sibling ``aload`` calls started in one tick (``asyncio.gather``) share one call, and the
    task never waits out the window. The batch runs on the Batcher's worker thread.
    """
    if not isinstance(batcher, Batcher):
        raise TypeError(f"batchsync: aload() takes a Batcher, not {batcher!r}")
    fut = batcher.load(key)
    batcher._core.flush_at_tick_end(asyncio.get_running_loop())
    return await asyncio.wrap_future(fut)
