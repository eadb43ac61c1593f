"""On PostgreSQL, the database sends a key's change to every process's key
cache, however it was made.

Until now the ORM's save and delete signals sent the notice
(``accounts/signals.py``), so a change made without them (a queryset
``update``, SQL in a shell, a restore script) was served by other processes
for up to ``KIROPOOL_KEY_CACHE_SECONDS``. Two triggers on ``accounts_apikey``
now send the key's prefix on the key channel (``kiropool_keys``, the
listener's; a notice is delivered when its transaction commits):

- after a delete;
- after an update that changed anything but the two columns the gateway path
  writes (``last_started_at``, a key's pacing at each lease start, and
  ``last_used_at``): those stay quiet, or every dispatch would empty every
  process's cache of its key.

SQLite has no notifications: its other processes still see a change within
the cache's lifetime.
"""

from django.db import migrations

from core.migration_sql import vendor_statements

# The channel of accounts.authentication.KEY_CHANNEL, as it was when this was written.
_CHANNEL = "kiropool_keys"
_QUIET = "- 'last_started_at' - 'last_used_at'"

POSTGRES_UP = [
    f"""
CREATE FUNCTION accounts_api_key_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{_CHANNEL}', OLD.prefix);
    IF TG_OP = 'UPDATE' AND NEW.prefix IS DISTINCT FROM OLD.prefix THEN
        PERFORM pg_notify('{_CHANNEL}', NEW.prefix);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql""",
    f"""
CREATE TRIGGER accounts_api_key_changed AFTER UPDATE ON accounts_apikey
    FOR EACH ROW WHEN ((to_jsonb(OLD) {_QUIET}) IS DISTINCT FROM (to_jsonb(NEW) {_QUIET}))
    EXECUTE FUNCTION accounts_api_key_notify()""",
    """
CREATE TRIGGER accounts_api_key_deleted AFTER DELETE ON accounts_apikey
    FOR EACH ROW EXECUTE FUNCTION accounts_api_key_notify()""",
]

POSTGRES_DOWN = [
    "DROP TRIGGER accounts_api_key_deleted ON accounts_apikey",
    "DROP TRIGGER accounts_api_key_changed ON accounts_apikey",
    "DROP FUNCTION accounts_api_key_notify()",
]


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0007_keyslot"),
    ]

    operations = [
        migrations.RunPython(
            vendor_statements({"postgresql": POSTGRES_UP, "sqlite": []}, what="key-change notices"),
            vendor_statements({"postgresql": POSTGRES_DOWN, "sqlite": []}, what="key-change notices"),
        ),
    ]
