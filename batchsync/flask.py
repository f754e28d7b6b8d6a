"""Flask integration: a batchsync scope per request, and Batchers owned by the extension.

::

    from flask import Flask, request
    from batchsync.flask import BatchSync

    batch = BatchSync()

    @batch.loader
    def customers(ids: list[int]) -> dict[int, Customer]:
        ...  # one query for every id

    def create_app() -> Flask:
        app = Flask(__name__)
        batch.init_app(app)
        return app

    # in a view: customers.get(42), customers.get_many(ids)

Every request runs inside ``batchsync.scope()``: a Batcher made with ``cache="scope"`` (the
default of ``BatchSync.loader``) memoizes what one request loaded and forgets it when the
request ends, while the keys of concurrent requests still share one batch call. The
extension closes its Batchers on ``close()`` and at interpreter exit.

A partition function may read Flask's ``request`` directly: it is called in the request's
thread when a key is loaded, e.g. ``partition=lambda: request.headers["X-Tenant"]``.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, overload

try:
    from flask import Flask, g
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchsync.flask needs Flask: pip install 'batchsync[flask]'"
    ) from exc

from batchsync import Batcher, BatcherClosed, scope
from batchsync._types import BatcherOptions, BatchResult, K, V

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["BatchSync"]

logger = logging.getLogger("batchsync")

# Where the open scope of the current request is kept on ``flask.g``.
_G_SCOPE = "_batchsync_scope"

# Extensions still open, closed by the exit hook (weakly held: a collected one drops out).
_live: weakref.WeakSet[BatchSync] = weakref.WeakSet()


class BatchSync:
    """The Flask extension: ``BatchSync(app)``, or ``BatchSync()`` then ``init_app(app)``.

    One extension may serve several apps (the application factory pattern); its Batchers
    are process-wide and shared by every request thread of every app it serves.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._lock = threading.Lock()
        self._batchers: list[Batcher[Any, Any]] = []
        self._closed = False
        _live.add(self)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Open a scope when each request of app starts and close it at its teardown.

        Register the extension as ``app.extensions["batchsync"]``. Raise RuntimeError when
        app already has a batchsync extension.
        """
        if "batchsync" in app.extensions:
            raise RuntimeError(
                f"batchsync: the app {app.name!r} already has a BatchSync extension"
            )
        app.extensions["batchsync"] = self
        # Run before the app's own before_request functions, which may load keys already.
        app.before_request_funcs.setdefault(None, []).insert(0, _open_scope)
        app.teardown_request(_close_scope)

    @overload
    def loader(self, batch_fn: Callable[[list[K]], BatchResult[V]], /) -> Batcher[K, V]: ...

    @overload
    def loader(
        self, /, **options: Unpack[BatcherOptions]
    ) -> Callable[[Callable[[list[K]], BatchResult[V]]], Batcher[K, V]]: ...

    def loader(
        self, batch_fn: Callable[[list[K]], BatchResult[V]] | None = None, /, **options: Any
    ) -> Batcher[K, V] | Callable[[Callable[[list[K]], BatchResult[V]]], Batcher[K, V]]:
        """Make a Batcher owned by the extension: ``@batch.loader`` or ``@batch.loader(...)``.

        Takes the options of ``batchsync.Batcher``; ``cache`` defaults to ``"scope"`` (a
        memo per request). The extension closes the Batcher in ``close()``.
        """
        options.setdefault("cache", "scope")
        if batch_fn is not None:
            return self.register(Batcher(batch_fn, **options))

        def decorate(fn: Callable[[list[K]], BatchResult[V]]) -> Batcher[K, V]:
            return self.register(Batcher(fn, **options))

        return decorate

    def register(self, batcher: Batcher[K, V]) -> Batcher[K, V]:
        """Hand a Batcher made elsewhere (``batchsync.pg.loader(...)``) to the extension.

        Return it unchanged, so ``orders = batch.register(pg.loader(...))`` reads well.
        Raise TypeError for anything but a Batcher, BatcherClosed after ``close()``.
        """
        if not isinstance(batcher, Batcher):
            raise TypeError(f"batchsync: register() takes a Batcher, not {batcher!r}")
        with self._lock:  # critical section: the list of owned Batchers
            if self._closed:
                raise BatcherClosed("batchsync: this BatchSync extension is closed")
            self._batchers.append(batcher)
        return batcher

    @property
    def batchers(self) -> list[Batcher[Any, Any]]:
        """The Batchers the extension owns, in the order they were registered."""
        with self._lock:  # critical section: the list of owned Batchers
            return list(self._batchers)

    def close(self, timeout: float | None = None) -> None:
        """Close every owned Batcher (queued keys are still sent); idempotent.

        With a timeout, return within it in all: keys still unanswered then fail with
        BatcherClosed. Called at interpreter exit for an extension not closed before.
        """
        with self._lock:  # critical section: take the Batchers out
            self._closed = True
            batchers, self._batchers = self._batchers, []
        _live.discard(self)
        if timeout is None:
            for batcher in batchers:
                batcher.close()
            return
        end = time.monotonic() + timeout
        for batcher in batchers:
            batcher.close(max(0.0, end - time.monotonic()))

    @property
    def closed(self) -> bool:
        """True once close() has been called."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._batchers)} batchers"
        return f"<batchsync.flask.BatchSync {state}>"


def _open_scope() -> None:
    cm = scope()
    cm.__enter__()
    setattr(g, _G_SCOPE, cm)


def _close_scope(exc: BaseException | None) -> None:
    # teardown_request runs for every request that was pushed, even one whose
    # before_request functions never ran (another extension's raised first).
    cm: AbstractContextManager[None] | None = g.pop(_G_SCOPE, None)
    if cm is None:
        return
    try:
        cm.__exit__(None, None, None)
    except ValueError:
        # The scope's context variable was set in another context (a server that runs
        # the teardown elsewhere); the request's context dies with it all the same.
        logger.warning("batchsync: the request scope was closed in another context")


@atexit.register
def _at_exit() -> None:
    for ext in list(_live):
        ext.close(timeout=10.0)
