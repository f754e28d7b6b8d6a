"""Settings of the shop example: PostgreSQL through psycopg 3, one app, batchsync's scope.

The database is the DSN in $DJANGO_SHOP_DSN (else $BATCHSYNC_PG_DSN), for example
``postgresql://shop:secret@localhost/shop``. $DJANGO_CONN_MAX_AGE sets CONN_MAX_AGE (0).
"""

import os

from psycopg.conninfo import conninfo_to_dict

_dsn = os.environ.get("DJANGO_SHOP_DSN") or os.environ.get("BATCHSYNC_PG_DSN")
if not _dsn:
    raise RuntimeError("set DJANGO_SHOP_DSN (or BATCHSYNC_PG_DSN) to a PostgreSQL DSN")
_params = conninfo_to_dict(_dsn)
SHOP_DSN = _dsn

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
        "OPTIONS": {"application_name": "django_shop", "options": "-c TimeZone=UTC"},
    }
}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
