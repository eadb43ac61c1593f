"""Keep ``accounts_routingidentity.account_rows`` equal to the number of
accounts on each identity, whatever creates, deletes or moves them (the admin,
the operator API, bulk onboarding, a cascade). The dispatch read asks it which
identities have aliases instead of counting the account table on every call.

On SQLite, a later migration that rebuilds either table must put these
triggers aside and back, as ``SQLiteTriggersKept`` in 0002 does.
"""

from django.db import migrations, models

POSTGRES_UP = """
CREATE FUNCTION accounts_identity_account_rows_sync() RETURNS trigger AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE accounts_routingidentity SET account_rows = account_rows - 1 WHERE id = OLD.identity_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE accounts_routingidentity SET account_rows = account_rows + 1 WHERE id = NEW.identity_id;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER accounts_identity_account_rows_insert_delete
    AFTER INSERT OR DELETE ON accounts_account
    FOR EACH ROW EXECUTE FUNCTION accounts_identity_account_rows_sync();
CREATE TRIGGER accounts_identity_account_rows_move
    AFTER UPDATE OF identity_id ON accounts_account
    FOR EACH ROW WHEN (OLD.identity_id IS DISTINCT FROM NEW.identity_id)
    EXECUTE FUNCTION accounts_identity_account_rows_sync();
"""

POSTGRES_DOWN = """
DROP TRIGGER IF EXISTS accounts_identity_account_rows_move ON accounts_account;
DROP TRIGGER IF EXISTS accounts_identity_account_rows_insert_delete ON accounts_account;
DROP FUNCTION IF EXISTS accounts_identity_account_rows_sync();
"""

SQLITE_UP = [
    """CREATE TRIGGER accounts_identity_account_rows_insert AFTER INSERT ON accounts_account
    BEGIN UPDATE accounts_routingidentity SET account_rows = account_rows + 1 WHERE id = NEW.identity_id; END""",
    """CREATE TRIGGER accounts_identity_account_rows_delete AFTER DELETE ON accounts_account
    BEGIN UPDATE accounts_routingidentity SET account_rows = account_rows - 1 WHERE id = OLD.identity_id; END""",
    """CREATE TRIGGER accounts_identity_account_rows_move AFTER UPDATE OF identity_id ON accounts_account
    WHEN OLD.identity_id IS NOT NEW.identity_id
    BEGIN
        UPDATE accounts_routingidentity SET account_rows = account_rows - 1 WHERE id = OLD.identity_id;
        UPDATE accounts_routingidentity SET account_rows = account_rows + 1 WHERE id = NEW.identity_id;
    END""",
]

SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS accounts_identity_account_rows_insert",
    "DROP TRIGGER IF EXISTS accounts_identity_account_rows_delete",
    "DROP TRIGGER IF EXISTS accounts_identity_account_rows_move",
]

# The accounts already there, counted once.
BACKFILL = """
UPDATE accounts_routingidentity SET account_rows = (
    SELECT count(*) FROM accounts_account WHERE accounts_account.identity_id = accounts_routingidentity.id
)
"""


def _run(statements_by_vendor):
    def run(apps, schema_editor):
        statements = statements_by_vendor.get(schema_editor.connection.vendor)
        if statements is None:
            raise RuntimeError(f"no account-count triggers for {schema_editor.connection.vendor}")
        for sql in [statements] if isinstance(statements, str) else statements:
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0005_outlier_ejection_quota_reset_patience"),
    ]

    operations = [
        migrations.AddField(
            model_name="routingidentity",
            name="account_rows",
            field=models.PositiveIntegerField(db_default=0, default=0, editable=False),
        ),
        migrations.RunPython(
            _run({"postgresql": [BACKFILL, POSTGRES_UP], "sqlite": [BACKFILL, *SQLITE_UP]}),
            _run({"postgresql": POSTGRES_DOWN, "sqlite": SQLITE_DOWN}),
        ),
    ]
