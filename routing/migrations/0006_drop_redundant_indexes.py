"""Drop the one-column foreign-key indexes another index already leads with.

Every write paid for them, and one misled the planner: with statistics taken
before a key's sessions arrived, PostgreSQL looked a (key, session id) up
through ``routing_sessionbinding``'s ``api_key_id`` index and filtered every
binding of the key (1 ms at 3,000 bindings, growing with each new session),
instead of through ``binding_unique_key_session``.

The state changes are Django's (``db_index=False``); the database changes are
plain ``DROP INDEX``, because SQLite's schema editor would rebuild the tables
for them, and a rebuilt ``routing_sessionbinding`` loses the triggers that
keep ``Account.binding_rows`` exact. On PostgreSQL they run ``CONCURRENTLY``
(outside a transaction), so a live pool's dispatches are not held behind
the lock while the migration waits for it.
"""

import django.db.models.deletion
from django.db import migrations, models

# (index, table, column), as Django named them when it created them.
REDUNDANT = (
    ("routing_accountlatency_snapshot_id_e04d783a", "routing_accountlatency", "snapshot_id"),
    ("routing_lease_account_id_d60f0b7b", "routing_lease", "account_id"),
    ("routing_proxylatency_snapshot_id_04d4fb73", "routing_proxylatency", "snapshot_id"),
    ("routing_sessionbinding_account_id_8038a1be", "routing_sessionbinding", "account_id"),
    ("routing_sessionbinding_api_key_id_eded7c24", "routing_sessionbinding", "api_key_id"),
)


def _concurrently(schema_editor) -> str:
    return " CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""


def indexes_drop(apps, schema_editor):
    for index, _, _ in REDUNDANT:
        schema_editor.execute(f'DROP INDEX{_concurrently(schema_editor)} IF EXISTS "{index}"')


def indexes_create(apps, schema_editor):
    for index, table, column in REDUNDANT:
        schema_editor.execute(f'CREATE INDEX{_concurrently(schema_editor)} "{index}" ON "{table}" ("{column}")')


class Migration(migrations.Migration):
    atomic = False  # CREATE/DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("accounts", "0006_identity_account_rows"),
        ("routing", "0005_lease_sticky_quota_probe"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(indexes_drop, indexes_create)],
            state_operations=[
                migrations.AlterField(
                    model_name="accountlatency",
                    name="snapshot",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="account_stats",
                        to="routing.latencysnapshot",
                    ),
                ),
                migrations.AlterField(
                    model_name="lease",
                    name="account",
                    field=models.ForeignKey(
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="leases",
                        to="accounts.account",
                    ),
                ),
                migrations.AlterField(
                    model_name="proxylatency",
                    name="snapshot",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="proxy_stats",
                        to="routing.latencysnapshot",
                    ),
                ),
                migrations.AlterField(
                    model_name="sessionbinding",
                    name="account",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="bindings",
                        to="accounts.account",
                    ),
                ),
                migrations.AlterField(
                    model_name="sessionbinding",
                    name="api_key",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="bindings",
                        to="accounts.apikey",
                    ),
                ),
            ],
        ),
    ]
