"""The open leases by identity and by key hold only rows that name it.

With ``IS NOT NULL`` on their column in their conditions, the probe for
unreaped leases (which names no identity or key) can only take the index
of open leases by expiry, the one the reap mark bounds (README, Decisions).

As in ``0007``: plain SQL, and ``CONCURRENTLY`` on PostgreSQL, so building
over a long lease history does not stop dispatches writing leases
meanwhile. Each index is built under a temporary name, the old one dropped,
and the new one renamed; a build that failed half-way leaves an invalid
index behind, which the next run drops before building it again. SQLite
drops and builds in place.
"""

from django.db import migrations, models

# (name, columns, the condition before, the condition after)
INDEXES = (
    (
        "lease_live_identity_idx",
        '"identity_id", "expires_at"',
        '"completed_at" IS NULL',
        '"completed_at" IS NULL AND "identity_id" IS NOT NULL',
    ),
    (
        "lease_live_key_idx",
        '"api_key_id", "expires_at"',
        '"completed_at" IS NULL',
        '"api_key_id" IS NOT NULL AND "completed_at" IS NULL',
    ),
)


def _rebuild(schema_editor, *, after: bool) -> None:
    postgres = schema_editor.connection.vendor == "postgresql"
    for name, columns, before_condition, after_condition in INDEXES:
        condition = after_condition if after else before_condition
        if not postgres:
            schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"')
            schema_editor.execute(f'CREATE INDEX "{name}" ON "routing_lease" ({columns}) WHERE {condition}')
            continue
        building = f"{name}_new"
        schema_editor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{building}"')
        schema_editor.execute(
            f'CREATE INDEX CONCURRENTLY "{building}" ON "routing_lease" ({columns}) WHERE {condition}'
        )
        schema_editor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
        schema_editor.execute(f'ALTER INDEX "{building}" RENAME TO "{name}"')


def indexes_rebuild(apps, schema_editor):
    _rebuild(schema_editor, after=True)


def indexes_restore(apps, schema_editor):
    _rebuild(schema_editor, after=False)


class Migration(migrations.Migration):
    atomic = False  # CREATE/DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("accounts", "0007_keyslot"),
        ("routing", "0012_lease_reap_mark"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(indexes_rebuild, indexes_restore)],
            state_operations=[
                migrations.RemoveIndex(model_name="lease", name="lease_live_identity_idx"),
                migrations.RemoveIndex(model_name="lease", name="lease_live_key_idx"),
                migrations.AddIndex(
                    model_name="lease",
                    index=models.Index(
                        condition=models.Q(("completed_at__isnull", True), ("identity__isnull", False)),
                        fields=["identity", "expires_at"],
                        name="lease_live_identity_idx",
                    ),
                ),
                migrations.AddIndex(
                    model_name="lease",
                    index=models.Index(
                        condition=models.Q(("api_key__isnull", False), ("completed_at__isnull", True)),
                        fields=["api_key", "expires_at"],
                        name="lease_live_key_idx",
                    ),
                ),
            ],
        ),
    ]
