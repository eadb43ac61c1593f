"""Re-encrypt every account's credentials under the first key of
``KIROPOOL_FERNET_KEYS``.

Key rotation: put the new key first (``KIROPOOL_FERNET_KEYS=new,old``) on every
host, run this once, then drop the old key. Tokens are rotated as tokens
(``MultiFernet.rotate``): nothing is decoded into Python objects, printed or
logged. Rows are done in small transactions, each re-reading its rows under a
lock, so it can run while the pool is serving and be interrupted and re-run
at any point."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction

from accounts import fields
from accounts.models import Account

BATCH = 200


class Command(BaseCommand):
    help = "Re-encrypt all account credentials under the first (newest) key of KIROPOOL_FERNET_KEYS."

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=BATCH, help="accounts per transaction")
        parser.add_argument(
            "--from-development-key",
            action="store_true",
            help="also decrypt with the key derived from SECRET_KEY (credentials written while no key was set)",
        )

    def handle(self, *args, batch_size: int, from_development_key: bool, **options):
        if batch_size < 1:
            raise CommandError(f"--batch-size must be at least 1, not {batch_size}")
        if not fields.configured_keys():
            self.stderr.write(
                self.style.WARNING(
                    "KIROPOOL_FERNET_KEYS is not set: re-encrypting under the key derived from SECRET_KEY."
                )
            )
        fields.fernet()  # a malformed key fails here, before any row is touched
        table = connection.ops.quote_name(Account._meta.db_table)
        column = connection.ops.quote_name(Account._meta.get_field("credentials").column)
        lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
        rotated = empty = 0
        failed: list[str] = []
        last = 0
        while True:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT id, name, {column} FROM {table} WHERE id > %s ORDER BY id LIMIT %s{lock}",
                    [last, batch_size],
                )
                rows = cursor.fetchall()
                for pk, name, token in rows:
                    if not token:
                        empty += 1
                        continue
                    try:
                        new = fields.rotate(token, also_development_key=from_development_key)
                    except fields.CredentialsKeyError:
                        failed.append(name)
                        continue
                    cursor.execute(f"UPDATE {table} SET {column} = %s WHERE id = %s", [new, pk])
                    rotated += 1
            if len(rows) < batch_size:
                break
            last = rows[-1][0]
        self.stdout.write(f"re-encrypted {rotated} account(s); {empty} without credentials")
        if failed:
            shown = ", ".join(failed[:20]) + (f" and {len(failed) - 20} more" if len(failed) > 20 else "")
            raise CommandError(
                f"{len(failed)} account(s) could not be decrypted with any configured key and were left as they "
                f"were: {shown}. Add the key that encrypted them to KIROPOOL_FERNET_KEYS and run this again."
            )
