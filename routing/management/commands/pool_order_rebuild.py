"""``manage.py pool_order_rebuild``: write the order table afresh.

Database triggers keep ``PoolOrder`` in step with the accounts, identities,
memberships and bindings. A database restored or loaded with triggers off
(``pg_restore --disable-triggers``, ``session_replication_role = replica``)
can leave it behind: this puts it right, and says how many rows were wrong.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from routing.pool_order import pool_order_rebuild


class Command(BaseCommand):
    help = "Rebuild the dispatch order table (PoolOrder) from the accounts, identities, groups and bindings."

    def handle(self, *args, **options):
        wrong = pool_order_rebuild()
        self.stdout.write(f"pool order: {wrong} row(s) were wrong" + ("; rebuilt" if wrong else ""))
