"""GraphQL on threads: resolvers return ``Batcher.load`` futures, one wait per level.

graphql-core runs resolvers depth first, one after the other: a resolver that blocks on its
key (``loader.get(id)``) is sent alone, so the N+1 stays. `DeferredExecutionContext` lets
a resolver return the ``concurrent.futures.Future`` of ``loader.load(id)`` instead (also as
items of a list, or as a future of a list)::

    from batchsync.graphql import DeferredExecutionContext

    def resolve_orders(customer, info):
        return orders_of.load(customer.id)          # a Future, not a value

    graphql_sync(schema, query, execution_context_class=DeferredExecutionContext)

The whole operation runs in the calling (request) thread: each pass resolves every field it
can and collects the futures still pending; then the context waits for all of them (one wait
per level, so a loader has seen every sibling key before its batch is sent), completes their
values in this thread (never on a batchsync worker: graphql-core, Django's ORM and the
request's state stay in the request thread), and repeats until the result is complete.

Errors follow the GraphQL rules as graphql-core applies them to resolvers that raise: a
failed future is a field error at its path, with ``null`` there; a non-null field's error
nulls the nearest nullable parent; sibling fields are unaffected. Mutation fields run one
after the other, each complete (its loads included) before the next starts.

For graphql-core 3.2 (graphene 3, graphene-django 3) and 3.3 (strawberry, ariadne), with
synchronous execution (``graphql_sync``, ``execute_sync``, ``schema.execute_sync``). The
``@defer`` and ``@stream`` directives are not supported: graphql-core's base executor, which
this one extends, ignores them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from types import GeneratorType
from typing import Any

try:
    import graphql
    import graphql.execution as _execution
    from graphql import version_info
    from graphql.error import located_error
    from graphql.pyutils.is_awaitable import is_awaitable as _default_is_awaitable
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchsync.graphql needs graphql-core 3.2 or 3.3: pip install 'batchsync[graphql]'"
    ) from exc

__all__ = ["DeferredExecutionContext"]

logger = logging.getLogger("batchsync")

_GRAPHQL_3_3 = version_info >= (3, 3)
if not (3, 2, 14) <= version_info < (3, 4):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"batchsync.graphql needs graphql-core >= 3.2.14, < 3.4, not {graphql.version}: "
        "pip install 'batchsync[graphql]'"
    )

# graphql-core 3.3 renamed ExecutionContext to Executor and gave its methods a few more
# arguments; the overrides below pass arguments through positionally, so that one class
# serves both. Typed as Any: mypy checks this module against one version only.
_Base: Any = getattr(_execution, "Executor", None) or _execution.ExecutionContext


# Whether values of a type are awaitable, by type: graphql-core asks for every value it
# completes, and its own answer costs an attribute lookup that fails for most values. A
# generator is asked each time (a generator-based coroutine is one by its code's flags).
_AWAITABLE_BY_TYPE: dict[type, bool] = {}


def _is_awaitable(value: Any) -> bool:
    """graphql-core's is_awaitable, with its answer kept per type."""
    cls = type(value)
    known = _AWAITABLE_BY_TYPE.get(cls)
    if known is not None:
        return known
    answer = bool(_default_is_awaitable(value))
    if cls is not GeneratorType and len(_AWAITABLE_BY_TYPE) < 10_000:
        _AWAITABLE_BY_TYPE[cls] = answer
    return answer


class _Deferred:
    """A value still being completed in the request thread: settled once, then its callbacks.

    Not thread-safe, and needs no lock: only the thread running the operation touches it.
    """

    __slots__ = ("_callbacks", "done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Exception | None = None
        self._callbacks: list[tuple[Callable[[Any], None], Callable[[Exception], None]]] = []

    def then(self, on_value: Callable[[Any], None], on_error: Callable[[Exception], None]) -> None:
        if not self.done:
            self._callbacks.append((on_value, on_error))
        elif self.error is None:
            on_value(self.value)
        else:
            on_error(self.error)

    def resolve(self, value: Any) -> None:
        if self.done:
            return
        self.done, self.value = True, value
        callbacks, self._callbacks = self._callbacks, []
        for on_value, _ in callbacks:
            on_value(value)

    def reject(self, error: Exception) -> None:
        if self.done:
            return
        self.done, self.error = True, error
        callbacks, self._callbacks = self._callbacks, []
        for _, on_error in callbacks:
            on_error(error)


def _gather(container: Any, pending: list[tuple[Any, _Deferred]]) -> _Deferred:
    """Fill container[key] as each deferred settles; resolve to container, or fail at once."""
    out = _Deferred()
    remaining = len(pending)

    def setter(key: Any) -> Callable[[Any], None]:
        def on_value(value: Any) -> None:
            nonlocal remaining
            container[key] = value
            remaining -= 1
            if not remaining:
                out.resolve(container)

        return on_value

    for key, deferred in pending:
        deferred.then(setter(key), out.reject)
    return out


class _Waiting:
    """A pending future and what to do with its value once it is there."""

    __slots__ = ("complete", "deferred", "future", "path")

    def __init__(
        self, future: Future[Any], complete: Callable[[Any], Any], deferred: _Deferred, path: Any
    ) -> None:
        self.future = future
        self.complete = complete
        self.deferred = deferred
        self.path = path


class DeferredExecutionContext(_Base):  # type: ignore[misc]
    """A graphql-core execution context whose resolvers may return concurrent futures.

    Pass it as ``execution_context_class`` (graphql-core 3.2, graphene, graphene-django,
    ariadne) or ``executor_class`` (graphql-core 3.3). A resolver's result, or an item of a
    list it returns, may be a ``concurrent.futures.Future`` such as ``Batcher.load``
    returns; the future's value is completed as the resolver's result would have been, and
    its exception is a field error at that path.

    ``timeout`` (a class attribute, None by default: wait as long as it takes, which
    batchsync bounds by its own guarantees) is the most seconds one operation waits for
    its futures in all; a future not done by then is a ``TimeoutError`` field error.
    Subclass to set it: ``class Ctx(DeferredExecutionContext): timeout = 10.0``.
    """

    timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        this: Any = self  # the base class is typed Any (see _Base)
        if this.is_awaitable is _default_is_awaitable:  # not one the caller chose
            this.is_awaitable = _is_awaitable
        self._waiting: list[_Waiting] = []
        self._nulled: set[Any] = set()  # paths where a field error has put a null
        self._serially = False
        self._deadline: float | None = None

    # -- where futures come in, and where their errors are caught ----------------------------

    def complete_value(
        self, return_type: Any, nodes: Any, info: Any, path: Any, result: Any, *rest: Any
    ) -> Any:
        if isinstance(result, Future):
            if result.done():
                result = result.result()  # a failed future raises here, as a resolver would
            else:
                deferred = _Deferred()

                def complete(value: Any) -> Any:
                    return self.complete_value(return_type, nodes, info, path, value, *rest)

                self._waiting.append(_Waiting(result, complete, deferred, path))
                return deferred
        return super().complete_value(return_type, nodes, info, path, result, *rest)

    def execute_field(
        self, parent_type: Any, source: Any, nodes: Any, path: Any, *rest: Any
    ) -> Any:
        completed = super().execute_field(parent_type, source, nodes, path, *rest)
        if type(completed) is not _Deferred:
            return completed
        node = getattr(nodes[0], "node", nodes[0])  # 3.3 passes FieldDetails, 3.2 FieldNodes
        return_type = parent_type.fields[node.name.value].type
        guarded = self._catch(completed, return_type, nodes, path)
        if self._serially and path.prev is None:
            # A root field of a mutation: complete it, loads and all, before the next one.
            return self._settle(guarded)
        return guarded

    def complete_list_value(
        self, return_type: Any, nodes: Any, info: Any, path: Any, result: Any, *rest: Any
    ) -> Any:
        completed = super().complete_list_value(return_type, nodes, info, path, result, *rest)
        if not isinstance(completed, list):
            return completed
        pending = [
            (index, self._catch(item, return_type.of_type, nodes, path.add_key(index, None)))
            for index, item in enumerate(completed)
            if type(item) is _Deferred
        ]
        return _gather(completed, pending) if pending else completed

    def execute_fields(self, parent_type: Any, source: Any, path: Any, *rest: Any) -> Any:
        results = super().execute_fields(parent_type, source, path, *rest)
        if not isinstance(results, dict):
            return results
        pending = [(name, value) for name, value in results.items() if type(value) is _Deferred]
        return _gather(results, pending) if pending else results

    def execute_fields_serially(self, *args: Any) -> Any:
        self._serially = True
        return super().execute_fields_serially(*args)

    def handle_field_error(self, *args: Any) -> None:
        super().handle_field_error(*args)  # raises for a non-null field: its parent is nulled
        self._nulled.add(args[-1])  # the field's path is null now, with what lies under it

    if _GRAPHQL_3_3:

        def execute_root_grouped_field_set(self, *args: Any) -> Any:
            return self._settle(super().execute_root_grouped_field_set(*args))

        def _field_error(self, error: Exception, return_type: Any, nodes: Any, path: Any) -> None:
            self.handle_field_error(error, return_type, nodes, path)

    else:

        def execute_operation(self, operation: Any, root_value: Any) -> Any:
            return self._settle(super().execute_operation(operation, root_value))

        def _field_error(self, error: Exception, return_type: Any, nodes: Any, path: Any) -> None:
            self.handle_field_error(located_error(error, nodes, path.as_list()), return_type, path)

    def _catch(self, deferred: _Deferred, return_type: Any, nodes: Any, path: Any) -> _Deferred:
        """Handle a failure of what lies under path as graphql-core does at a field or item.

        A nullable position takes the error and becomes null; a non-null one passes it on
        to its parent, which is what handle_field_error raising means.
        """
        out = _Deferred()

        def on_error(error: Exception) -> None:
            try:
                self._field_error(error, return_type, nodes, path)
            except Exception as propagated:
                out.reject(propagated)
            else:
                out.resolve(None)

        deferred.then(out.resolve, on_error)
        return out

    # -- the loop: one wait per level, completion in this thread -----------------------------

    def _settle(self, result: Any) -> Any:
        """Run passes until result is complete; return its value or raise its error."""
        if type(result) is not _Deferred:
            return result
        level = 0
        while not result.done and self._waiting:
            level += 1
            waiting, self._waiting = self._waiting, []
            waiting = [w for w in waiting if not self._under_null(w.path)]
            logger.debug("batchsync.graphql: level %d waits on %d futures", level, len(waiting))
            # First wait for every future of this level: waiting on a batchsync future
            # closes its Batcher's window, so each Batcher sends all the level's keys in one
            # call. Then complete the values, which loads the keys of the next level.
            outcomes = [self._wait(w.future) for w in waiting]
            for w, (value, error) in zip(waiting, outcomes, strict=True):
                if self._under_null(w.path):
                    continue  # an error nulled a parent meanwhile: nobody will read this
                self._complete(w, value, error)
        if not result.done:
            raise RuntimeError("batchsync.graphql: the operation ended with values missing")
        if result.error is not None:
            raise result.error
        return result.value

    def _wait(self, future: Future[Any]) -> tuple[Any, Exception | None]:
        """Wait for future (within the operation's timeout); return (value, None) or (None, error).

        A BaseException other than an Exception (KeyboardInterrupt) is raised, not returned.
        """
        timeout = None
        if self.timeout is not None:
            now = time.monotonic()
            if self._deadline is None:
                self._deadline = now + self.timeout
            timeout = max(0.0, self._deadline - now)
        try:
            return future.result(timeout), None
        except Exception as error:  # the future's own, a CancelledError, or our timeout
            # On Python 3.10 Future.result raises concurrent.futures.TimeoutError, which is
            # the built-in TimeoutError only from 3.11 on.
            if isinstance(error, (TimeoutError, FutureTimeoutError)) and not future.done():
                return None, TimeoutError(
                    "batchsync.graphql: no value within the operation's timeout of "
                    f"{self.timeout} s"
                )
            return None, error

    def _complete(self, w: _Waiting, value: Any, error: Exception | None) -> None:
        deferred = w.deferred
        try:
            if error is not None:
                raise error
            completed = w.complete(value)
        except Exception as failure:
            deferred.reject(failure)
            return
        if type(completed) is _Deferred:
            completed.then(deferred.resolve, deferred.reject)
        else:
            deferred.resolve(completed)

    def _under_null(self, path: Any) -> bool:
        nulled = self._nulled
        if not nulled:
            return False
        while path is not None:
            if path in nulled:
                return True
            path = path.prev
        return False
