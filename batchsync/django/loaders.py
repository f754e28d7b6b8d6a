"""model_loader: a Batcher over the Django ORM, and the connection hygiene its batches need."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from django.core.exceptions import FieldDoesNotExist  # type: ignore[import-untyped]
from django.db import connections, reset_queries, transaction  # type: ignore[import-untyped]
from django.db.models import Model, QuerySet  # type: ignore[import-untyped]

from batchsync import Batcher, current_partition
from batchsync._scope import SET_PARTITION_SQL, check_partition_setting

__all__ = ["model_loader", "release_connections"]


def release_connections() -> None:
    """Treat the end of a batch like the end of a request, for this thread's connections.

    Django opens one connection per thread and per database, and closes or keeps it at the
    end of each request (``close_old_connections``: closed when ``CONN_MAX_AGE`` has run
    out, always with the default 0, or when it is unusable after an error). A batch
    function runs on a batchsync worker thread that no request cycle ever touches, so it
    calls this before and after its queries. A connection inside ``transaction.atomic``
    is left alone. ``model_loader`` does it for you; call it in your own batch functions
    that use the ORM.
    """
    reset_queries()
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()




class _ModelQuery:
    """The batch function of a model_loader: one ``<field>__in`` query per batch."""

    def __init__(
        self, queryset: Any, field: Any, lookup: str, many: bool, setting: str | None
    ) -> None:
        self._queryset = queryset
        self._setting = setting
        self._attname: str = field.attname
        self._to_python = field.to_python
        self._lookup = lookup
        self._many = many
        self._model = queryset.model

    def __repr__(self) -> str:
        return f"<batchsync.django query {self._model.__name__}.{self._lookup} many={self._many}>"

    def __call__(self, keys: list[Any]) -> dict[Any, Any] | list[Any]:
        release_connections()
        try:
            queryset = self._queryset.filter(**{self._lookup: keys})
            if self._setting is None:
                objects = list(queryset)
            else:
                # set_config(..., true) lasts until the end of the transaction, so the
                # setting and the query must share one.
                with transaction.atomic(using=queryset.db), connections[
                    queryset.db
                ].cursor() as cursor:
                    cursor.execute(SET_PARTITION_SQL, [self._setting, str(current_partition())])
                    objects = list(queryset)
        finally:
            release_connections()
        attname = self._attname
        if self._many:
            groups: dict[Hashable, list[Any]] = {}
            for obj in objects:
                groups.setdefault(getattr(obj, attname), []).append(obj)
            return [groups.get(self._to_python(k), []) for k in keys]
        # A mapping, so that the Batcher's `missing` option decides what an absent key gets.
        found: dict[Hashable, Any] = {}
        for obj in objects:
            value = getattr(obj, attname)
            if value in found:
                found[value] = self._model.MultipleObjectsReturned(
                    f"batchsync: more than one {self._model.__name__} has "
                    f"{attname}={value!r}; use many=True for a one-to-many loader"
                )
            else:
                found[value] = obj
        return found


def model_loader(
    model: type[Model] | QuerySet,
    field: str = "pk",
    many: bool = False,
    using: str | None = None,
    *,
    partition_setting: str | None = None,
    **batcher_options: Any,
) -> Batcher[Any, Any]:
    """Return a Batcher that loads model instances by the value of one field.

    Each batch runs ``<model>.objects.filter(<field>__in=keys)`` (the default manager, or
    the QuerySet given as ``model``, so ``Order.objects.order_by("id")`` or
    ``.select_related(...)`` shape the query) on the database ``using`` (else the router's
    choice). With ``many=False`` a key gets its instance or None (a KeyError with
    ``missing="raise"``; ``Model.MultipleObjectsReturned`` when two rows match). With
    ``many=True`` a key gets the list of its instances in the QuerySet's order, ``[]`` when
    there are none. ``field`` is a concrete field name or "pk"; a foreign key is matched on
    its id (``field="customer"`` takes customer ids). Keys go through the field's
    ``to_python``, so "42" and 42 are the same key of an integer field.

    Row-level security: with ``partition=`` (called in the request's thread, e.g.
    ``lambda: current_request().user.tenant_id``) and ``partition_setting="app.tenant"``,
    each batch runs ``SELECT set_config('app.tenant', <partition>, true)`` in the same
    transaction as its query, on PostgreSQL. Keys of different partitions never share a
    batch.

    ``batcher_options`` go to ``batchsync.Batcher``; ``cache`` defaults to ``"scope"``
    (a memo per request under ``BatchScopeMiddleware``). The query runs on a batchsync
    worker thread with its own connection: it sees committed data only, not the
    uncommitted writes of the request's transaction. Raise TypeError or ValueError for a
    bad argument; the database is not contacted.
    """
    queryset: Any
    if isinstance(model, QuerySet):
        queryset = model
    elif isinstance(model, type) and issubclass(model, Model):
        untyped: Any = model  # Django has no type hints
        queryset = untyped._default_manager.all()
    else:
        raise TypeError(
            f"batchsync: model_loader() takes a Django model class or QuerySet, not {model!r}"
        )
    if not isinstance(field, str) or not field:
        raise TypeError(f"batchsync: field must be a field name or 'pk', not {field!r}")
    if not isinstance(many, bool):
        raise TypeError(f"batchsync: many must be a bool, not {many!r}")
    if using is not None:
        if not isinstance(using, str) or using not in connections:
            raise ValueError(
                f"batchsync: using={using!r} names no database; DATABASES has "
                f"{', '.join(repr(a) for a in connections)}"
            )
        queryset = queryset.using(using)
    meta = queryset.model._meta
    try:
        target = meta.pk if field == "pk" else meta.get_field(field)
    except FieldDoesNotExist:
        raise ValueError(
            f"batchsync: {queryset.model.__name__} has no field {field!r}"
        ) from None
    if not getattr(target, "concrete", False) or getattr(target, "many_to_many", False):
        raise ValueError(
            f"batchsync: field {field!r} of {queryset.model.__name__} is not a concrete "
            "column; name a field stored in the model's own table"
        )
    check_partition_setting(partition_setting, batcher_options)
    batcher_options.setdefault("cache", "scope")
    batcher_options.setdefault("key_fn", target.to_python)
    batcher_options.setdefault("name", f"{queryset.model.__name__}.{field}")
    query = _ModelQuery(queryset, target, f"{field}__in", many, partition_setting)
    return Batcher(query, **batcher_options)
