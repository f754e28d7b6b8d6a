#!/usr/bin/env python
"""Django's command-line utility for the shop example.

    waitress-serve --threads 16 --port 8000 shopsite.wsgi:application
    # no DSN: a private PostgreSQL with a fresh shop, stopped on exit; or your own:
    export DJANGO_SHOP_DSN=postgresql:///shop       # or BATCHSYNC_PG_DSN
    python manage.py create_shop                    # the demo's tables and rows (once)
    python manage.py runserver                      # then open /page/0/batched
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
