"""The loaders: made once per process, shared by every request thread.

cache="scope" (model_loader's default) memoizes per request under BatchScopeMiddleware.
A request blocking in get_many sends its keys at once when no other request runs;
otherwise it waits up to the window for theirs to join the query.
"""

from batchsync.django import model_loader

from .models import Customer, Order, OrderItem

OPTIONS = {"window": 0.002, "max_concurrency": 2}

customers = model_loader(Customer, **OPTIONS)
orders_of = model_loader(Order.objects.order_by("id"), field="customer", many=True, **OPTIONS)
items_of = model_loader(OrderItem.objects.order_by("id"), field="order", many=True, **OPTIONS)
