"""On PostgreSQL, a statement that deletes session bindings moves each
account's ``binding_rows`` once, by how many of its bindings it deleted,
instead of once per binding (migration 0002's row trigger).

Each change of an account's counter also moves its order rows (migration
0008), and the rows it changed stay locked until the transaction commits.
The purge deletes up to 1,000 expired bindings a transaction: on a pool of
50 accounts that was 1,000 updates of each account row and of its order
rows, and a lease start, which moves its identity's order rows, waited up
to 239 ms for each batch (bench/HISTORY.md). Now it is one update per
account the statement touched. The accounts are locked in id order first,
as the purge locks them, so two deletes never wait on each other in a cycle.

Inserts and moves keep the row trigger: the hot path binds one session at
a time. SQLite has no statement triggers and keeps its row triggers.
"""

from django.db import migrations

from core.migration_sql import vendor_statements

POSTGRES_UP = [
    "DROP TRIGGER routing_binding_rows_insert_delete ON routing_sessionbinding",
    """CREATE TRIGGER routing_binding_rows_insert
    AFTER INSERT ON routing_sessionbinding
    FOR EACH ROW EXECUTE FUNCTION routing_binding_rows_sync()""",
    """CREATE FUNCTION routing_binding_rows_deleted() RETURNS trigger AS $$
BEGIN
    PERFORM 1 FROM accounts_account WHERE id IN (SELECT account_id FROM gone) ORDER BY id FOR UPDATE;
    UPDATE accounts_account a SET binding_rows = a.binding_rows - g.n
      FROM (SELECT account_id, count(*) AS n FROM gone GROUP BY account_id) g
     WHERE a.id = g.account_id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql""",
    """CREATE TRIGGER routing_binding_rows_delete
    AFTER DELETE ON routing_sessionbinding
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION routing_binding_rows_deleted()""",
]

POSTGRES_DOWN = [
    "DROP TRIGGER routing_binding_rows_delete ON routing_sessionbinding",
    "DROP FUNCTION routing_binding_rows_deleted()",
    "DROP TRIGGER routing_binding_rows_insert ON routing_sessionbinding",
    """CREATE TRIGGER routing_binding_rows_insert_delete
    AFTER INSERT OR DELETE ON routing_sessionbinding
    FOR EACH ROW EXECUTE FUNCTION routing_binding_rows_sync()""",
]


class Migration(migrations.Migration):
    dependencies = [
        ("routing", "0014_wait_ticket"),
    ]

    operations = [
        migrations.RunPython(
            vendor_statements({"postgresql": POSTGRES_UP, "sqlite": []}, what="binding-count triggers"),
            vendor_statements({"postgresql": POSTGRES_DOWN, "sqlite": []}, what="binding-count triggers"),
        ),
    ]
