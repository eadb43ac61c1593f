"""Latency bands in ``routing_poolorder``: each row's band under one
snapshot, so a dispatch with a usable latency snapshot reads the head of a
large pool through an index too (``routing/selectors/walk.py``).

- ``band`` and ``band_snapshot_id`` are written by the snapshot refresh
  (``pool_order.pool_order_bands_write``), in the snapshot's transaction.
- A band depends on the snapshot and on the account's proxy (its URL keys
  the proxy's samples). A trigger clears the band when an account's proxy
  changes, or a proxy's URL; the row is then a special account of the walk
  until the next refresh.
- Two indexes, partial (``band_snapshot_id IS NOT NULL``, so they cost
  writes only where latency orders), hold a scope's plain rows by snapshot
  and band, sessions first or not; a third finds a scope's rows under
  another snapshot, or none.
"""

from django.db import migrations, models

from core.migration_sql import vendor_statements

_CLEAR = "UPDATE routing_poolorder SET band = NULL, band_snapshot_id = NULL WHERE band_snapshot_id IS NOT NULL"
# (trigger, table, column whose change clears the bands, the order rows it clears)
_CLEARED_BY = [
    ("routing_pool_order_band_account", "accounts_account", "proxy_id", "account_id = NEW.id"),
    (
        "routing_pool_order_band_proxy",
        "accounts_proxy",
        "url",
        "account_id IN (SELECT id FROM accounts_account WHERE proxy_id = NEW.id)",
    ),
]


def _postgres_trigger(name: str, table: str, column: str, rows: str) -> list[str]:
    return [
        f"""
CREATE FUNCTION {name}() RETURNS trigger AS $$
BEGIN
    {_CLEAR} AND {rows};
    RETURN NULL;
END
$$ LANGUAGE plpgsql""",
        f"""
CREATE TRIGGER {name} AFTER UPDATE OF {column} ON {table}
    FOR EACH ROW WHEN (OLD.{column} IS DISTINCT FROM NEW.{column})
    EXECUTE FUNCTION {name}()""",
    ]


def _sqlite_trigger(name: str, table: str, column: str, rows: str) -> str:
    return f"""CREATE TRIGGER {name} AFTER UPDATE OF {column} ON {table}
    WHEN OLD.{column} IS NOT NEW.{column}
    BEGIN {_CLEAR} AND {rows}; END"""


POSTGRES_UP = [
    *(sql for trigger in _CLEARED_BY for sql in _postgres_trigger(*trigger)),
    # New sessions with latency bands: fewest sessions first, then the band.
    """
CREATE INDEX pool_order_band_spread_idx ON routing_poolorder
    (scope_id, enabled, plain, band_snapshot_id, binding_rows, band, last_started_at NULLS FIRST, credits_sort, name)
    WHERE band_snapshot_id IS NOT NULL""",
    """
CREATE INDEX pool_order_band_idx ON routing_poolorder
    (scope_id, enabled, plain, band_snapshot_id, band, last_started_at NULLS FIRST, credits_sort, name)
    WHERE band_snapshot_id IS NOT NULL""",
    "CREATE INDEX pool_order_band_stale_idx ON routing_poolorder (scope_id, band_snapshot_id)",
]

POSTGRES_DOWN = [
    "DROP INDEX IF EXISTS pool_order_band_stale_idx",
    "DROP INDEX IF EXISTS pool_order_band_idx",
    "DROP INDEX IF EXISTS pool_order_band_spread_idx",
    "DROP TRIGGER IF EXISTS routing_pool_order_band_proxy ON accounts_proxy",
    "DROP FUNCTION IF EXISTS routing_pool_order_band_proxy()",
    "DROP TRIGGER IF EXISTS routing_pool_order_band_account ON accounts_account",
    "DROP FUNCTION IF EXISTS routing_pool_order_band_account()",
]

SQLITE_UP = [
    *(_sqlite_trigger(*trigger) for trigger in _CLEARED_BY),
    """CREATE INDEX pool_order_band_spread_idx ON routing_poolorder
    (scope_id, enabled, plain, band_snapshot_id, binding_rows, band, last_started_at, credits_sort, name)
    WHERE band_snapshot_id IS NOT NULL""",
    """CREATE INDEX pool_order_band_idx ON routing_poolorder
    (scope_id, enabled, plain, band_snapshot_id, band, last_started_at, credits_sort, name)
    WHERE band_snapshot_id IS NOT NULL""",
    "CREATE INDEX pool_order_band_stale_idx ON routing_poolorder (scope_id, band_snapshot_id)",
]

SQLITE_DOWN = [
    "DROP INDEX IF EXISTS pool_order_band_stale_idx",
    "DROP INDEX IF EXISTS pool_order_band_idx",
    "DROP INDEX IF EXISTS pool_order_band_spread_idx",
    "DROP TRIGGER IF EXISTS routing_pool_order_band_proxy",
    "DROP TRIGGER IF EXISTS routing_pool_order_band_account",
]


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0006_identity_account_rows"),
        ("routing", "0008_pool_order"),
    ]

    operations = [
        migrations.AddField(model_name="poolorder", name="band", field=models.IntegerField(null=True)),
        migrations.AddField(model_name="poolorder", name="band_snapshot_id", field=models.BigIntegerField(null=True)),
        migrations.RunPython(
            vendor_statements({"postgresql": POSTGRES_UP, "sqlite": SQLITE_UP}, what="pool-order band triggers"),
            vendor_statements({"postgresql": POSTGRES_DOWN, "sqlite": SQLITE_DOWN}, what="pool-order band triggers"),
        ),
    ]
