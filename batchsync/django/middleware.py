"""BatchScopeMiddleware: every request, sync or async, runs inside ``batchsync.scope()``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from batchsync import scope

__all__ = ["BatchScopeMiddleware", "current_request"]

_request: ContextVar[Any] = ContextVar("batchsync_django_request", default=None)


def current_request() -> Any:
    """Return the HttpRequest that the calling thread (or task) is serving.

    Meant for partition functions: ``partition=lambda: current_request().user.pk``. It is
    set by ``BatchScopeMiddleware`` for the time the view and the middleware below it run.
    Raise LookupError outside a request.
    """
    request = _request.get()
    if request is None:
        raise LookupError(
            "batchsync: no current request; is batchsync.django.BatchScopeMiddleware "
            "in MIDDLEWARE, and is this called while a request is served?"
        )
    return request


class BatchScopeMiddleware:
    """Open a ``batchsync.scope()`` around the rest of the middleware chain and the view.

    Batchers made with ``cache="scope"`` memoize per request, and ``current_request()``
    returns the request. Works under WSGI and ASGI, with sync and async views: Django
    picks the matching path (the middleware is sync and async capable). Place it above
    any middleware that loads keys. A streaming response's content is produced after the
    scope has ended: loads made then still batch, without the per-request memo.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self.__acall__(request)
        token = _request.set(request)
        try:
            with scope():
                return self.get_response(request)
        finally:
            _request.reset(token)

    async def __acall__(self, request: Any) -> Any:
        token = _request.set(request)
        try:
            with scope():
                response: Awaitable[Any] = self.get_response(request)
                return await response
        finally:
            _request.reset(token)
