"""The same schema with graphene-django's own resolvers: the N+1, for comparison.

The reverse relations (``customer.orders``, ``order.items``) are resolved by
graphene-django, one query per customer and one per order: 1 + 50 + (number of orders)
queries for 50 customers. The types have a registry of their own, so that they do not
replace those of ``schema`` in graphene-django's global one.
"""

import graphene
from graphene_django import DjangoObjectType
from graphene_django.registry import Registry
from shop import models

registry = Registry()


class Item(DjangoObjectType):
    class Meta:
        model = models.OrderItem
        fields = ("id", "product", "quantity", "price_cents")
        registry = registry

    @classmethod
    def get_queryset(cls, queryset, info):
        return queryset.order_by("id")


class Order(DjangoObjectType):
    class Meta:
        model = models.Order
        fields = ("id", "placed_on", "status", "items", "customer")
        registry = registry

    @classmethod
    def get_queryset(cls, queryset, info):
        return queryset.order_by("id")


class Customer(DjangoObjectType):
    class Meta:
        model = models.Customer
        fields = ("id", "name", "email", "city", "orders")
        registry = registry


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
        return models.Customer.objects.filter(id=id).first()


schema = graphene.Schema(query=Query)
