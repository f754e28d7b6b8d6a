"""The demo's shop tables (created by batchsync.demo, hence managed = False)."""

from django.db import models


class Customer(models.Model):
    id = models.IntegerField(primary_key=True)
    name = models.TextField()
    email = models.TextField()
    city = models.TextField()

    class Meta:
        db_table = "customers"
        managed = False


class Order(models.Model):
    id = models.IntegerField(primary_key=True)
    customer = models.ForeignKey(Customer, models.DO_NOTHING, related_name="orders")
    placed_on = models.DateField()
    status = models.TextField()

    class Meta:
        db_table = "orders"
        managed = False


class OrderItem(models.Model):
    id = models.IntegerField(primary_key=True)
    order = models.ForeignKey(Order, models.DO_NOTHING, related_name="items")
    product = models.TextField()
    quantity = models.IntegerField()
    price_cents = models.IntegerField()

    class Meta:
        db_table = "order_items"
        managed = False
