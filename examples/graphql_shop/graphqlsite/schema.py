"""The shop as a graphene-django schema whose resolvers return batchsync futures.

    { customers(first: 50) { name orders { status items { product } } } }

costs 3 queries: the customers, then all their orders in one query, then all the orders'
items in one more, whatever the number of customers and orders.
"""

import graphene
from graphene_django import DjangoObjectType
from shop import models

from . import loaders


class Item(DjangoObjectType):
    class Meta:
        model = models.OrderItem
        fields = ("id", "product", "quantity", "price_cents")


class Order(DjangoObjectType):
    items = graphene.List(graphene.NonNull(Item), required=True)
    customer = graphene.Field(graphene.NonNull(lambda: Customer))

    class Meta:
        model = models.Order
        fields = ("id", "placed_on", "status")

    def resolve_items(order, info):
        return loaders.items_of.load(order.id)  # a Future: sent with its siblings' keys

    def resolve_customer(order, info):
        return loaders.customers.load(order.customer_id)


class Customer(DjangoObjectType):
    orders = graphene.List(graphene.NonNull(Order), required=True)

    class Meta:
        model = models.Customer
        fields = ("id", "name", "email", "city")

    def resolve_orders(customer, info):
        return loaders.orders_of.load(customer.id)


class Query(graphene.ObjectType):
    customers = graphene.List(
        graphene.NonNull(Customer), first=graphene.Int(default_value=50), required=True
    )
    customer = graphene.Field(Customer, id=graphene.Int(required=True))
    orders = graphene.List(
        graphene.NonNull(Order), first=graphene.Int(default_value=50), required=True
    )

    def resolve_customers(root, info, first):
        return models.Customer.objects.order_by("id")[:first]

    def resolve_orders(root, info, first):
        return models.Order.objects.order_by("id")[:first]

    def resolve_customer(root, info, id):
        return loaders.customers.load(id)


schema = graphene.Schema(query=Query)
