#!/usr/bin/env python
"""Django's command-line utility for the GraphQL shop example.

export DJANGO_SHOP_DSN=postgresql:///shop       # or BATCHSYNC_PG_DSN
python manage.py create_shop                    # the demo's tables and rows
python manage.py runserver                      # then POST a query to /graphql
# or under a production server, from this directory:
waitress-serve --threads 16 --port 8000 graphqlsite.wsgi:application
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "graphqlsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
