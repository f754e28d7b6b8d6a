from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from graphene_django.views import GraphQLView

from batchsync.graphql import DeferredExecutionContext

from . import plain, schema

urlpatterns = [
    # The resolvers return batchsync futures; the execution context waits once per level.
    path(
        "graphql",
        csrf_exempt(
            GraphQLView.as_view(
                schema=schema.schema, execution_context_class=DeferredExecutionContext
            )
        ),
    ),
    # graphene-django's own resolvers, one query per customer and per order: the N+1.
    path("graphql/plain", csrf_exempt(GraphQLView.as_view(schema=plain.schema))),
]
