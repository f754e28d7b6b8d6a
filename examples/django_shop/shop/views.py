"""The shop page, naive (1 + 50 + orders queries) and batched (3 queries)."""

import json
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse

import batchsync

from . import loaders
from .models import Customer, Order, OrderItem

PAGE_SIZE = 50


def page_ids(number: int) -> list[int]:
    start = number * PAGE_SIZE
    return list(range(start + 1, start + PAGE_SIZE + 1))


def customer_dict(c: Customer) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "email": c.email, "city": c.city}


def order_dict(o: Order) -> dict[str, Any]:
    return {"id": o.id, "customer_id": o.customer_id, "placed_on": o.placed_on, "status": o.status}


def item_dict(i: OrderItem) -> dict[str, Any]:
    return {
        "id": i.id,
        "order_id": i.order_id,
        "product": i.product,
        "quantity": i.quantity,
        "price_cents": i.price_cents,
    }


def to_json(page: list[dict[str, Any]]) -> HttpResponse:
    # The same bytes as the Flask example: dates as ISO strings.
    return HttpResponse(json.dumps(page, default=str), content_type="application/json")


def page_naive(request: HttpRequest, number: int) -> HttpResponse:
    page = []
    for c in Customer.objects.filter(id__in=page_ids(number)).order_by("id"):
        orders = []
        for o in Order.objects.filter(customer_id=c.id).order_by("id"):
            items = [item_dict(i) for i in OrderItem.objects.filter(order_id=o.id).order_by("id")]
            orders.append({**order_dict(o), "items": items})
        page.append({**customer_dict(c), "orders": orders})
    return to_json(page)


def page_batched(request: HttpRequest, number: int) -> HttpResponse:
    ids = page_ids(number)
    found = loaders.customers.get_many(ids)  # one query for the 50 customers
    by_customer = loaders.orders_of.get_many(ids)  # one for all their orders
    order_ids = [o.id for orders in by_customer for o in orders]
    by_order = dict(zip(order_ids, loaders.items_of.get_many(order_ids), strict=True))  # one more
    page = []
    for c, orders in zip(found, by_customer, strict=True):
        if c is not None:
            its = [
                {**order_dict(o), "items": [item_dict(i) for i in by_order[o.id]]} for o in orders
            ]
            page.append({**customer_dict(c), "orders": its})
    return to_json(page)


def customer(request: HttpRequest, cid: int) -> HttpResponse:
    found = loaders.customers.get(cid)
    if found is None:
        raise Http404
    return to_json([customer_dict(found)])


async def customer_async(request: HttpRequest, cid: int) -> HttpResponse:
    # The key is queued and the event loop stays free while the batch runs on
    # batchsync's worker thread (its ORM query is ordinary sync code there).
    found = await batchsync.aload(loaders.customers, cid)
    if found is None:
        raise Http404
    return to_json([customer_dict(found)])
