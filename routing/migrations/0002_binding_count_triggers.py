"""Keep ``accounts_account.binding_rows`` equal to the number of session
binding rows that point at each account, whatever deletes or moves them (the
services, a cascade from a deleted key, an admin bulk delete, the purge task).
The dispatcher reads this count instead of counting 65 536 bindings per call.
"""

from django.db import migrations

POSTGRES_UP = """
CREATE FUNCTION routing_binding_rows_sync() RETURNS trigger AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE accounts_account SET binding_rows = binding_rows - 1 WHERE id = OLD.account_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE accounts_account SET binding_rows = binding_rows + 1 WHERE id = NEW.account_id;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER routing_binding_rows_insert_delete
    AFTER INSERT OR DELETE ON routing_sessionbinding
    FOR EACH ROW EXECUTE FUNCTION routing_binding_rows_sync();
CREATE TRIGGER routing_binding_rows_move
    AFTER UPDATE OF account_id ON routing_sessionbinding
    FOR EACH ROW WHEN (OLD.account_id IS DISTINCT FROM NEW.account_id)
    EXECUTE FUNCTION routing_binding_rows_sync();
"""

POSTGRES_DOWN = """
DROP TRIGGER IF EXISTS routing_binding_rows_move ON routing_sessionbinding;
DROP TRIGGER IF EXISTS routing_binding_rows_insert_delete ON routing_sessionbinding;
DROP FUNCTION IF EXISTS routing_binding_rows_sync();
"""

SQLITE_UP = [
    """CREATE TRIGGER routing_binding_rows_insert AFTER INSERT ON routing_sessionbinding
    BEGIN UPDATE accounts_account SET binding_rows = binding_rows + 1 WHERE id = NEW.account_id; END""",
    """CREATE TRIGGER routing_binding_rows_delete AFTER DELETE ON routing_sessionbinding
    BEGIN UPDATE accounts_account SET binding_rows = binding_rows - 1 WHERE id = OLD.account_id; END""",
    """CREATE TRIGGER routing_binding_rows_move AFTER UPDATE OF account_id ON routing_sessionbinding
    WHEN OLD.account_id IS NOT NEW.account_id
    BEGIN
        UPDATE accounts_account SET binding_rows = binding_rows - 1 WHERE id = OLD.account_id;
        UPDATE accounts_account SET binding_rows = binding_rows + 1 WHERE id = NEW.account_id;
    END""",
]

SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS routing_binding_rows_insert",
    "DROP TRIGGER IF EXISTS routing_binding_rows_delete",
    "DROP TRIGGER IF EXISTS routing_binding_rows_move",
]


def _run(statements_by_vendor):
    def run(apps, schema_editor):
        statements = statements_by_vendor.get(schema_editor.connection.vendor)
        if statements is None:
            raise RuntimeError(f"no binding-count triggers for {schema_editor.connection.vendor}")
        for sql in [statements] if isinstance(statements, str) else statements:
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("routing", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(
            _run({"postgresql": POSTGRES_UP, "sqlite": SQLITE_UP}),
            _run({"postgresql": POSTGRES_DOWN, "sqlite": SQLITE_DOWN}),
        ),
    ]
