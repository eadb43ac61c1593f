"""The lease's key indexed with the lease's id, instead of alone.

A completion looks its lease up by (id, key). With statistics taken before
the key's leases existed, PostgreSQL chose the key's one-column index for that
and would filter every lease the key ever had; with both columns in one index
either choice finds the one row. The key still leads, so deleting a key
(``SET_NULL`` on its leases) stays an index lookup. As in ``0006``, the old
index is dropped with plain SQL rather than by rebuilding the table on SQLite.
"""

import django.db.models.deletion
from django.db import migrations, models

OLD_INDEX = "routing_lease_api_key_id_31a219d4"


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0006_identity_account_rows"),
        ("routing", "0006_drop_redundant_indexes"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="lease",
            index=models.Index(fields=["api_key", "id"], name="lease_key_idx"),
        ),
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f'DROP INDEX IF EXISTS "{OLD_INDEX}"',
                    reverse_sql=f'CREATE INDEX "{OLD_INDEX}" ON "routing_lease" ("api_key_id")',
                )
            ],
            state_operations=[
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
