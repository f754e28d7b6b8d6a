"""Settings of the shop example: PostgreSQL through psycopg 3, one app, batchsync's scope.

The database is the DSN in $DJANGO_SHOP_DSN (else $BATCHSYNC_PG_DSN), for example
``postgresql://shop:secret@localhost/shop``; its connection is checked once, here. Without
either, each process that loads these settings starts a private PostgreSQL with a fresh
shop (as ``python -m batchsync.demo`` does) and stops it when it exits, SIGTERM included:
``waitress-serve`` then just works, and ``runserver`` wants ``--noreload`` (its reloader
would start a second process, with a second server). $DJANGO_CONN_MAX_AGE sets
CONN_MAX_AGE (0).
"""

import os
import sys

from psycopg.conninfo import conninfo_to_dict

from batchsync.demo._examples import ShopUnavailable, process_shop_dsn

try:
    SHOP_DSN = process_shop_dsn(os.environ.get("DJANGO_SHOP_DSN"))
except ShopUnavailable as _exc:
    # One line, not a settings traceback: manage.py and waitress-serve both end here.
    sys.exit(f"django_shop: {_exc}")
_params = conninfo_to_dict(SHOP_DSN)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "not-a-secret: the shop example only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "shopsite.urls"
WSGI_APPLICATION = "shopsite.wsgi.application"
INSTALLED_APPS = ["shop"]
MIDDLEWARE = [
    # First, so that everything below it and the view run inside a batchsync.scope().
    "batchsync.django.BatchScopeMiddleware",
    "django.middleware.common.CommonMiddleware",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3 when it is installed
        "NAME": _params.get("dbname", ""),
        "USER": _params.get("user", ""),
        "PASSWORD": _params.get("password", ""),
        "HOST": _params.get("host", ""),
        "PORT": _params.get("port", ""),
        "CONN_MAX_AGE": int(os.environ.get("DJANGO_CONN_MAX_AGE", "0")),
        # Start sessions in UTC, so Django need not run SET TIME ZONE on each new connection.
        "OPTIONS": {
            "application_name": "django_shop",
            "options": "-c TimeZone=UTC",
            "connect_timeout": int(_params.get("connect_timeout") or 10),
        },
    }
}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
