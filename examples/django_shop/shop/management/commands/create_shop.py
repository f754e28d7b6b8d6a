"""manage.py create_shop: create and fill the demo's shop tables, unless they are there."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create and fill the shop tables of batchsync's demo in the shop database."

    def handle(self, *args: Any, **options: Any) -> None:
        from batchsync.demo._shop import ensure_shop

        counts, created = ensure_shop(settings.SHOP_DSN)
        self.stdout.write(f"{'created' if created else 'already there'}: {counts}")
