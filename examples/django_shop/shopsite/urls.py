from django.urls import path
from shop import views

urlpatterns = [
    path("page/<int:number>/naive", views.page_naive),
    path("page/<int:number>/batched", views.page_batched),
    path("customers/<int:cid>", views.customer),
    path("async/customers/<int:cid>", views.customer_async),
]
