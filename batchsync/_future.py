"""The Future that ``load`` returns: a real ``concurrent.futures.Future`` without a Condition each.

A stdlib Future builds a ``threading.Condition`` (an RLock, a deque and five bound methods)
in ``__init__``; for ``load_many`` of many keys that is most of the cost, and 100,000 of them
keep the garbage collector busy. ``LoadFuture`` keeps the stdlib's states and fields (its
``_state``, ``_result`` and ``_exception`` are the ones ``wait`` and ``as_completed`` read)
but creates its ``_condition`` and ``_waiters`` only when something needs them: a caller
that blocks on a pending future, ``concurrent.futures.wait``/``as_completed`` (they lock
``_condition`` and append to ``_waiters``), or ``repr``.

The one rule that makes this safe: until a future has its Condition, its state is guarded
by the module's ``_lock``, shared by all such futures and held only for a state change; the
Condition is created under ``_lock``, so a state change either completes before it exists
or runs under it (and then notifies its waiters, as the stdlib does). Once created, it is
the future's lock for good, exactly as in the stdlib. ``_lock`` is a leaf: nothing else is
acquired while it is held, so it cannot take part in a deadlock.

Callbacks run after the lock is released, as in the stdlib. ``done()``, ``running()``,
``cancelled()`` and the fast path of ``result()`` read the state without a lock: a finished
future never changes again, and (with the GIL) a single attribute read is atomic and the
outcome is stored before the state says FINISHED.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures._base import (  # the stdlib's own state names and logger
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    LOGGER,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._core import _Core
    from ._queue import Entry

__all__ = ["LoadFuture"]

V = TypeVar("V")

# Guards the state of every LoadFuture that has no Condition yet, and the creation of one.
_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); the child has no such thread.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)

# Without the GIL (a free-threaded build) two attribute reads are not ordered with respect
# to another thread's stores, so result() then reads state and outcome under the lock.
_UNLOCKED_READS = getattr(sys, "_is_gil_enabled", lambda: True)()

_DONE_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_CANCELLED_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED)


class LoadFuture(Future[V]):
    """A ``concurrent.futures.Future`` that builds its Condition only when one is needed.

    For ``load``: waiting on it (``result()``, ``exception()``) first tells the batcher that
    somebody now waits for the key, so a lone caller does not sit out the window, and, on a
    batchsync worker thread, runs the batch inline rather than wait for a worker that may be
    this very thread. In every other respect it behaves as the stdlib Future.
    """

    __slots__ = (
        "_callbacks",
        "_cond",
        "_core",
        "_entry",
        "_exception",
        "_result",
        "_state",
        "_token",
        "_waiter_list",
    )

    _core: _Core[Any, V] | None
    _entry: Entry | None
    _token: object  # the observer hook's token of this caller (_hooks)

    def __init__(self, core: _Core[Any, V] | None = None) -> None:
        # No super().__init__(): it builds the Condition this class exists to avoid.
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Future[V]], object]] | None = None
        self._cond: threading.Condition | None = None
        self._waiter_list: list[Any] | None = None  # made with the Condition
        self._core = core
        self._entry = None
        self._token = None

    # -- the stdlib's fields, created on first use -------------------------------------------

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        return self._make_condition() if cond is None else cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        # wait() and as_completed() append under _condition, so it exists by then; make
        # sure of it for any other reader.
        if self._cond is None:
            self._make_condition()
        assert self._waiter_list is not None
        return self._waiter_list

    def _make_condition(self) -> threading.Condition:
        with _lock:  # critical section: create it once; no state change runs meanwhile
            cond = self._cond
            if cond is None:
                self._waiter_list = []  # before the Condition is published: see _set
                cond = self._cond = threading.Condition()
        return cond

    @property
    def _done_callbacks(self) -> list[Callable[[Future[V]], object]]:
        lock = self._locked()
        try:
            if self._callbacks is None:
                self._callbacks = []
            return self._callbacks
        finally:
            lock.release()

    def _locked(self) -> threading.Lock | threading.Condition:
        """Acquire and return what guards this future's state now: _lock or its Condition."""
        _lock.acquire()
        cond = self._cond
        if cond is None:
            return _lock
        _lock.release()  # a Condition, once made, is for good: take it instead
        cond.acquire()
        return cond

    # -- reading -----------------------------------------------------------------------------

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def result(self, timeout: float | None = None) -> V:
        if _UNLOCKED_READS and self._state == FINISHED and self._exception is None:
            return self._result  # type: ignore[no-any-return]
        core, entry = self._core, self._entry
        if core is not None and entry is not None and not self.done():
            return core.block_on([entry], self.done, timeout, lambda: self._wait_result(timeout))
        return self._wait_result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if _UNLOCKED_READS and self._state == FINISHED:
            return self._exception
        core, entry = self._core, self._entry
        if core is not None and entry is not None and not self.done():
            return core.block_on([entry], self.done, timeout, lambda: self._wait_exception(timeout))
        return self._wait_exception(timeout)

    def _wait_result(self, timeout: float | None) -> V:
        """The stdlib's result(): waits on the Condition (creating it) while pending."""
        self._await(timeout)
        exc = self._exception
        if exc is None:
            return self._result  # type: ignore[no-any-return]
        try:
            raise exc
        finally:
            del self  # the stdlib's care: no cycle through this frame in the traceback

    def _wait_exception(self, timeout: float | None) -> BaseException | None:
        self._await(timeout)
        return self._exception

    def _await(self, timeout: float | None) -> None:
        """Return once finished; raise CancelledError or the futures TimeoutError otherwise."""
        if _UNLOCKED_READS and self._state == FINISHED:
            return  # finished for good: no Condition needed
        with self._condition:
            if self._state not in _DONE_STATES:
                self._condition.wait(timeout)
            state = self._state
        if state in _CANCELLED_STATES:
            raise CancelledError()
        if state != FINISHED:
            raise FutureTimeoutError()

    def add_done_callback(self, fn: Callable[[Future[V]], object]) -> None:
        lock = self._locked()
        try:
            if self._state not in _DONE_STATES:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        finally:
            lock.release()
        try:
            fn(self)
        except Exception:
            LOGGER.exception("exception calling callback for %r", self)

    # -- changing state ----------------------------------------------------------------------

    def cancel(self) -> bool:
        lock = self._locked()
        try:
            state = self._state
            if state in (RUNNING, FINISHED):
                return False
            if state in _CANCELLED_STATES:
                return True
            self._state = CANCELLED
            if lock is not _lock:
                lock.notify_all()  # type: ignore[union-attr]
        finally:
            lock.release()
        self._invoke_callbacks()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        lock = self._locked()
        try:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiter_list or ():  # wait() and as_completed()
                    waiter.add_cancelled(self)
                return False
        finally:
            lock.release()
        LOGGER.critical("Future %s in unexpected state: %s", id(self), state)
        raise RuntimeError("Future in unexpected state")

    def set_result(self, result: V) -> None:
        self._set(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._set(None, exception)

    def _set(self, result: Any, exception: BaseException | None) -> None:
        lock = self._locked()
        try:
            state = self._state
            if state not in _DONE_STATES:
                self._result = result
                self._exception = exception
                self._state = FINISHED
                # Resolved for good: let go of the queue's entry and the core (the entry's
                # waiters hold this future: no cycle left for the garbage collector).
                self._core = self._entry = None
                if lock is not _lock:
                    for waiter in self._waiter_list or ():  # wait() and as_completed()
                        if exception is None:
                            waiter.add_result(self)
                        else:
                            waiter.add_exception(self)
                    lock.notify_all()  # type: ignore[union-attr]
        finally:
            lock.release()
        if state in _DONE_STATES:
            raise InvalidStateError(f"{state}: {self!r}")
        self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        callbacks = self._callbacks
        if callbacks is None:
            return
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                LOGGER.exception("exception calling callback for %r", self)


def resolved(value: Any, failed: bool) -> LoadFuture[Any]:
    """Return a LoadFuture that is already finished with value (raised if failed)."""
    fut: LoadFuture[Any] = LoadFuture()
    if failed:
        fut._exception = value
    else:
        fut._result = value
    fut._state = FINISHED
    return fut
