"""Settings of the GraphQL shop: the Django example's settings and shop app, plus graphene.

The models and loaders are those of examples/django_shop (its ``shop`` app), so this
directory's sibling must be on the path; the database is $DJANGO_SHOP_DSN, as there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "django_shop"))

from shopsite.settings import *  # noqa: F403

ROOT_URLCONF = "graphqlsite.urls"
WSGI_APPLICATION = "graphqlsite.wsgi.application"
INSTALLED_APPS = ["shop", "graphene_django"]
DATABASES["default"]["OPTIONS"]["application_name"] = "graphql_shop"  # noqa: F405
