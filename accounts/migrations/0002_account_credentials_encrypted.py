"""Account credentials: from a JSON column to a Fernet token in a text column.

The column type changes first (PostgreSQL: jsonb → text, keeping the JSON
text), then every row still holding plaintext JSON is encrypted under the
first key of KIROPOOL_FERNET_KEYS (or the key derived from SECRET_KEY). Rows
are read and written as raw text, so the field's own decryption never sees
plaintext. Reversible: the reverse decrypts back to JSON before the column
becomes JSON again."""

import json

from django.db import migrations

import accounts.fields

BATCH = 500


def _rows(schema_editor, table):
    quote = schema_editor.connection.ops.quote_name
    last = 0
    while True:
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id, {quote('credentials')} FROM {quote(table)} WHERE id > %s ORDER BY id LIMIT {BATCH}",
                [last],
            )
            rows = cursor.fetchall()
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


def _write(schema_editor, table, pk, value):
    quote = schema_editor.connection.ops.quote_name
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"UPDATE {quote(table)} SET {quote('credentials')} = %s WHERE id = %s", [value, pk])


def encrypt_plaintext(apps, schema_editor):
    table = apps.get_model("accounts", "Account")._meta.db_table
    for pk, stored in list(_rows(schema_editor, table)):
        if stored is None:
            _write(schema_editor, table, pk, "")
            continue
        if isinstance(stored, (dict, list)):  # a driver that still hands back decoded JSON
            value = stored
        elif stored == "" or accounts.fields.is_token(stored):
            continue
        else:
            value = json.loads(stored)
        if value is not None and not isinstance(value, dict):
            value = {"value": value}
        _write(schema_editor, table, pk, accounts.fields.encrypt(value or {}))


def decrypt_to_plaintext(apps, schema_editor):
    table = apps.get_model("accounts", "Account")._meta.db_table
    for pk, stored in list(_rows(schema_editor, table)):
        if not stored:
            _write(schema_editor, table, pk, "{}")
        elif accounts.fields.is_token(stored):
            _write(schema_editor, table, pk, json.dumps(dict(accounts.fields.decrypt(stored))))


class SQLiteTriggersKept(migrations.AlterField):
    """AlterField that survives SQLite's table rebuild.

    SQLite changes a column by rebuilding the table (create a copy, drop the
    original, rename the copy); the rename fails while another table's trigger
    (routing's binding counters) names the dropped table. The triggers that
    mention the table are put aside and re-created around the rebuild."""

    def _without_triggers(self, schema_editor, alter) -> None:
        if schema_editor.connection.vendor != "sqlite":
            alter()
            return
        with schema_editor.connection.cursor() as cursor:
            cursor.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND sql LIKE %s", ["%accounts_account%"])
            triggers = cursor.fetchall()
            for name, _ in triggers:
                cursor.execute(f"DROP TRIGGER {schema_editor.quote_name(name)}")
        alter()
        with schema_editor.connection.cursor() as cursor:
            for _, sql in triggers:
                cursor.execute(sql)

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        forwards = super().database_forwards
        self._without_triggers(schema_editor, lambda: forwards(app_label, schema_editor, from_state, to_state))

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        backwards = super().database_backwards
        self._without_triggers(schema_editor, lambda: backwards(app_label, schema_editor, from_state, to_state))


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
    ]

    operations = [
        SQLiteTriggersKept(
            model_name="account",
            name="credentials",
            field=accounts.fields.EncryptedJSONField(blank=True, default=dict),
        ),
        migrations.RunPython(encrypt_plaintext, decrypt_to_plaintext),
    ]
