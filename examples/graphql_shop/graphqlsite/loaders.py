"""The loaders: made once per process, shared by every request thread.

The same as the Django example's, with a longer window. A level's keys are loaded while
graphql-core walks the level, which can take longer than a few milliseconds for a long
list; the execution context then waits on them, and a waiting caller sends the queue at
once (eager, the default). So the window only bounds how long keys wait for company when
nobody waits on them: made longer than one pass, it never splits a level in two batches.
"""

from shop.models import Customer, Order, OrderItem

from batchsync.django import model_loader

OPTIONS = {"window": 0.05, "max_concurrency": 2}

customers = model_loader(Customer, **OPTIONS)
orders_of = model_loader(Order.objects.order_by("id"), field="customer", many=True, **OPTIONS)
items_of = model_loader(OrderItem.objects.order_by("id"), field="order", many=True, **OPTIONS)
