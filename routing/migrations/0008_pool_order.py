"""``routing_poolorder``: each account's columns of the dispatch order, once
for every account (scope 0) and once per group it belongs to, in two indexes
that hold a scope's plain accounts in SPEC §2's order (``PoolOrder``,
``routing/selectors/walk.py``).

Database triggers keep the rows, like the counters of 0002 and
accounts/0006, whatever writes the sources:

- an account inserted, deleted, or changed in a column the order reads
  (identity, enabled, pool, binding counter, credits, name);
- an identity's last start, or its number of accounts (which decides
  whether its accounts are plain);
- a group membership added or removed.

A lease start (the identity's last start) and a binding (the account's
counter) each change one or two rows, in the transaction that changes the
source. The name column sorts bytes on PostgreSQL (collation "C"), as the
dispatch order compares names; SQLite's default collation already does.
"""

from django.db import migrations, models

from core.migration_sql import vendor_statements

_COLUMNS = "scope_id, account_id, enabled, plain, binding_rows, last_started_at, credits_sort, name"

# One account's row in one scope, from the account and its identity.
_ROW = """SELECT {scope}, a.id, a.enabled, a.pool = 'balanced' AND i.account_rows <= 1, a.binding_rows,
       i.last_started_at, - COALESCE(a.remaining_credits, -1.0), a.name
  FROM accounts_account a JOIN accounts_routingidentity i ON i.id = a.identity_id WHERE a.id = {account}"""

_ACCOUNT_COLUMNS = ("identity_id", "enabled", "pool", "binding_rows", "remaining_credits", "name")
_CHANGED = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in _ACCOUNT_COLUMNS)

POSTGRES_UP = [
    'ALTER TABLE routing_poolorder ALTER COLUMN name TYPE varchar(200) COLLATE "C"',
    f"""
CREATE FUNCTION routing_pool_order_account() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM routing_poolorder WHERE account_id = OLD.id;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO routing_poolorder ({_COLUMNS}) {_ROW.format(scope=0, account="NEW.id")};
    ELSIF ROW(OLD.identity_id, OLD.enabled, OLD.pool, OLD.remaining_credits, OLD.name)
            IS NOT DISTINCT FROM ROW(NEW.identity_id, NEW.enabled, NEW.pool, NEW.remaining_credits, NEW.name) THEN
        -- a binding came or went: the hot path, one column
        UPDATE routing_poolorder SET binding_rows = NEW.binding_rows WHERE account_id = NEW.id;
    ELSE
        UPDATE routing_poolorder o SET enabled = r.enabled, plain = r.plain, binding_rows = r.binding_rows,
               last_started_at = r.last_started_at, credits_sort = r.credits_sort, name = r.name
          FROM ({_ROW.format(scope=0, account="NEW.id")}) AS r (scope_id, account_id, enabled, plain, binding_rows,
               last_started_at, credits_sort, name)
         WHERE o.account_id = NEW.id;
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql""",
    """
CREATE TRIGGER routing_pool_order_account_insert_delete
    AFTER INSERT OR DELETE ON accounts_account
    FOR EACH ROW EXECUTE FUNCTION routing_pool_order_account()""",
    f"""
CREATE TRIGGER routing_pool_order_account_update
    AFTER UPDATE OF {", ".join(_ACCOUNT_COLUMNS)} ON accounts_account
    FOR EACH ROW WHEN ({_CHANGED})
    EXECUTE FUNCTION routing_pool_order_account()""",
    """
CREATE FUNCTION routing_pool_order_identity() RETURNS trigger AS $$
BEGIN
    UPDATE routing_poolorder o SET last_started_at = NEW.last_started_at,
           plain = a.pool = 'balanced' AND NEW.account_rows <= 1
      FROM accounts_account a
     WHERE a.identity_id = NEW.id AND o.account_id = a.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql""",
    """
CREATE TRIGGER routing_pool_order_identity
    AFTER UPDATE OF last_started_at, account_rows ON accounts_routingidentity
    FOR EACH ROW WHEN (OLD.last_started_at IS DISTINCT FROM NEW.last_started_at
                       OR OLD.account_rows IS DISTINCT FROM NEW.account_rows)
    EXECUTE FUNCTION routing_pool_order_identity()""",
    f"""
CREATE FUNCTION routing_pool_order_member() RETURNS trigger AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        DELETE FROM routing_poolorder WHERE scope_id = OLD.accountgroup_id AND account_id = OLD.account_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO routing_poolorder ({_COLUMNS}) {_ROW.format(scope="NEW.accountgroup_id", account="NEW.account_id")};
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql""",
    """
CREATE TRIGGER routing_pool_order_member
    AFTER INSERT OR UPDATE OR DELETE ON accounts_accountgroup_accounts
    FOR EACH ROW EXECUTE FUNCTION routing_pool_order_member()""",
    # New sessions (SPEC §2 key 3 active): fewest sessions first.
    """
CREATE INDEX pool_order_spread_idx ON routing_poolorder
    (scope_id, enabled, plain, binding_rows, last_started_at NULLS FIRST, credits_sort, name)""",
    # Requests without a session id.
    """
CREATE INDEX pool_order_idx ON routing_poolorder
    (scope_id, enabled, plain, last_started_at NULLS FIRST, credits_sort, name)""",
]

POSTGRES_DOWN = [
    "DROP TRIGGER IF EXISTS routing_pool_order_member ON accounts_accountgroup_accounts",
    "DROP FUNCTION IF EXISTS routing_pool_order_member()",
    "DROP TRIGGER IF EXISTS routing_pool_order_identity ON accounts_routingidentity",
    "DROP FUNCTION IF EXISTS routing_pool_order_identity()",
    "DROP TRIGGER IF EXISTS routing_pool_order_account_update ON accounts_account",
    "DROP TRIGGER IF EXISTS routing_pool_order_account_insert_delete ON accounts_account",
    "DROP FUNCTION IF EXISTS routing_pool_order_account()",
]

# SQLite has no UPDATE ... FROM before 3.33 and no trigger functions: each
# event has its trigger, and a row is refreshed column by column (when its
# account and identity are both there: Django's flush of a test database
# deletes table by table, with the triggers on).
_REFRESH_SQLITE = """UPDATE routing_poolorder SET
    enabled = (SELECT enabled FROM accounts_account WHERE id = {account}),
    plain = (SELECT a.pool = 'balanced' AND i.account_rows <= 1 FROM accounts_account a
             JOIN accounts_routingidentity i ON i.id = a.identity_id WHERE a.id = {account}),
    binding_rows = (SELECT binding_rows FROM accounts_account WHERE id = {account}),
    last_started_at = (SELECT i.last_started_at FROM accounts_account a
                       JOIN accounts_routingidentity i ON i.id = a.identity_id WHERE a.id = {account}),
    credits_sort = (SELECT - COALESCE(remaining_credits, -1.0) FROM accounts_account WHERE id = {account}),
    name = (SELECT name FROM accounts_account WHERE id = {account})
    WHERE account_id = {account} AND EXISTS (SELECT 1 FROM accounts_account a
          JOIN accounts_routingidentity i ON i.id = a.identity_id WHERE a.id = {account})"""

SQLITE_UP = [
    f"""CREATE TRIGGER routing_pool_order_account_insert AFTER INSERT ON accounts_account
    BEGIN INSERT INTO routing_poolorder ({_COLUMNS}) {_ROW.format(scope=0, account="NEW.id")}; END""",
    """CREATE TRIGGER routing_pool_order_account_delete AFTER DELETE ON accounts_account
    BEGIN DELETE FROM routing_poolorder WHERE account_id = OLD.id; END""",
    # A binding came or went: the hot path, one column.
    """CREATE TRIGGER routing_pool_order_account_counter AFTER UPDATE OF binding_rows ON accounts_account
    WHEN OLD.binding_rows IS NOT NEW.binding_rows
    BEGIN UPDATE routing_poolorder SET binding_rows = NEW.binding_rows WHERE account_id = NEW.id; END""",
    f"""CREATE TRIGGER routing_pool_order_account_update
    AFTER UPDATE OF {", ".join(c for c in _ACCOUNT_COLUMNS if c != "binding_rows")} ON accounts_account
    WHEN {" OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in _ACCOUNT_COLUMNS if c != "binding_rows")}
    BEGIN {_REFRESH_SQLITE.format(account="NEW.id")}; END""",
    """CREATE TRIGGER routing_pool_order_identity
    AFTER UPDATE OF last_started_at, account_rows ON accounts_routingidentity
    WHEN OLD.last_started_at IS NOT NEW.last_started_at OR OLD.account_rows IS NOT NEW.account_rows
    BEGIN
        UPDATE routing_poolorder SET last_started_at = NEW.last_started_at,
            plain = (SELECT a.pool = 'balanced' AND NEW.account_rows <= 1 FROM accounts_account a
                     WHERE a.id = routing_poolorder.account_id)
        WHERE account_id IN (SELECT id FROM accounts_account WHERE identity_id = NEW.id);
    END""",
    f"""CREATE TRIGGER routing_pool_order_member_insert AFTER INSERT ON accounts_accountgroup_accounts
    BEGIN
        INSERT INTO routing_poolorder ({_COLUMNS})
        {_ROW.format(scope="NEW.accountgroup_id", account="NEW.account_id")};
    END""",
    """CREATE TRIGGER routing_pool_order_member_delete AFTER DELETE ON accounts_accountgroup_accounts
    BEGIN
        DELETE FROM routing_poolorder WHERE scope_id = OLD.accountgroup_id AND account_id = OLD.account_id;
    END""",
    """CREATE INDEX pool_order_spread_idx ON routing_poolorder
    (scope_id, enabled, plain, binding_rows, last_started_at, credits_sort, name)""",
    """CREATE INDEX pool_order_idx ON routing_poolorder
    (scope_id, enabled, plain, last_started_at, credits_sort, name)""",
]

SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS routing_pool_order_account_insert",
    "DROP TRIGGER IF EXISTS routing_pool_order_account_delete",
    "DROP TRIGGER IF EXISTS routing_pool_order_account_counter",
    "DROP TRIGGER IF EXISTS routing_pool_order_account_update",
    "DROP TRIGGER IF EXISTS routing_pool_order_identity",
    "DROP TRIGGER IF EXISTS routing_pool_order_member_insert",
    "DROP TRIGGER IF EXISTS routing_pool_order_member_delete",
]

# The accounts and memberships already there, copied once.
BACKFILL = [
    f"""INSERT INTO routing_poolorder ({_COLUMNS})
    SELECT 0, a.id, a.enabled, a.pool = 'balanced' AND i.account_rows <= 1, a.binding_rows,
           i.last_started_at, - COALESCE(a.remaining_credits, -1.0), a.name
      FROM accounts_account a JOIN accounts_routingidentity i ON i.id = a.identity_id""",
    f"""INSERT INTO routing_poolorder ({_COLUMNS})
    SELECT m.accountgroup_id, a.id, a.enabled, a.pool = 'balanced' AND i.account_rows <= 1, a.binding_rows,
           i.last_started_at, - COALESCE(a.remaining_credits, -1.0), a.name
      FROM accounts_accountgroup_accounts m JOIN accounts_account a ON a.id = m.account_id
      JOIN accounts_routingidentity i ON i.id = a.identity_id""",
]



class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0006_identity_account_rows"),
        ("routing", "0007_lease_key_index"),
    ]

    operations = [
        migrations.CreateModel(
            name="PoolOrder",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("scope_id", models.BigIntegerField()),
                ("enabled", models.BooleanField()),
                ("plain", models.BooleanField()),
                ("binding_rows", models.PositiveIntegerField()),
                ("last_started_at", models.DateTimeField(null=True)),
                ("credits_sort", models.FloatField()),
                ("name", models.CharField(max_length=200)),
                (
                    "account",
                    models.ForeignKey(
                        db_constraint=False,
                        on_delete=models.deletion.DO_NOTHING,
                        related_name="order_rows",
                        to="accounts.account",
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(fields=("scope_id", "account"), name="pool_order_unique_scope_account")
                ],
            },
        ),
        migrations.RunPython(
            vendor_statements({"postgresql": [POSTGRES_UP[0], *BACKFILL, *POSTGRES_UP[1:]], "sqlite": [*BACKFILL, *SQLITE_UP]}, what="pool-order triggers"),
            vendor_statements({"postgresql": POSTGRES_DOWN, "sqlite": SQLITE_DOWN}, what="pool-order triggers"),
        ),
    ]
