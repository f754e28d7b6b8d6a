"""Django integration: a batchsync scope per request, and Batchers over the ORM.

::

    # settings.py
    MIDDLEWARE = [
        "batchsync.django.BatchScopeMiddleware",
        ...
    ]

    # loaders.py
    from batchsync.django import model_loader

    customers = model_loader(Customer)                           # pk -> Customer | None
    orders = model_loader(Order, field="customer", many=True)    # customer id -> [Order]

    # in a view: customers.get(42), orders.get_many(ids)
    # in an async view: await batchsync.aload(customers, 42)

See ``BatchScopeMiddleware`` and ``model_loader`` for the contracts, and the README ("Django")
for how batch queries use database connections.
"""

from __future__ import annotations

try:
    import django  # type: ignore[import-untyped]  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchsync.django needs Django: pip install 'batchsync[django]'"
    ) from exc

from .loaders import model_loader, release_connections
from .middleware import BatchScopeMiddleware, current_request

__all__ = ["BatchScopeMiddleware", "current_request", "model_loader", "release_connections"]
