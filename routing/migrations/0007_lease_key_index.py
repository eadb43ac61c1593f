"""The lease's key indexed with the lease's id, instead of alone.

A completion looks its lease up by (id, key). With statistics taken before
the key's leases existed, PostgreSQL chose the key's one-column index for that
and would filter every lease the key ever had; with both columns in one index
either choice finds the one row. The key still leads, so deleting a key
(``SET_NULL`` on its leases) stays an index lookup.

As in ``0006``: plain SQL, so SQLite does not rebuild the table, and
``CONCURRENTLY`` on PostgreSQL, so building the index over a long lease
history does not stop dispatches writing leases meanwhile. A build that
failed half-way leaves an invalid index behind, which the next run drops
before building it again.
"""

import django.db.models.deletion
from django.db import migrations, models

NEW_INDEX, OLD_INDEX = "lease_key_idx", "routing_lease_api_key_id_31a219d4"


def _concurrently(schema_editor) -> str:
    return " CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""


def index_swap(apps, schema_editor):
    how = _concurrently(schema_editor)
    schema_editor.execute(f'DROP INDEX{how} IF EXISTS "{NEW_INDEX}"')
    schema_editor.execute(f'CREATE INDEX{how} "{NEW_INDEX}" ON "routing_lease" ("api_key_id", "id")')
    schema_editor.execute(f'DROP INDEX{how} IF EXISTS "{OLD_INDEX}"')


def index_unswap(apps, schema_editor):
    how = _concurrently(schema_editor)
    schema_editor.execute(f'DROP INDEX{how} IF EXISTS "{OLD_INDEX}"')
    schema_editor.execute(f'CREATE INDEX{how} "{OLD_INDEX}" ON "routing_lease" ("api_key_id")')
    schema_editor.execute(f'DROP INDEX{how} IF EXISTS "{NEW_INDEX}"')


class Migration(migrations.Migration):
    atomic = False  # CREATE/DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("accounts", "0006_identity_account_rows"),
        ("routing", "0006_drop_redundant_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(index_swap, index_unswap)],
            state_operations=[
                migrations.AddIndex(
                    model_name="lease",
                    index=models.Index(fields=["api_key", "id"], name=NEW_INDEX),
                ),
                migrations.AlterField(
                    model_name="lease",
                    name="api_key",
                    field=models.ForeignKey(
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="leases",
                        to="accounts.apikey",
                    ),
                ),
            ],
        ),
    ]
