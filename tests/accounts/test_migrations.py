"""Upgrading a database that already holds accounts: the migration that adds
``RoutingIdentity.account_rows`` counts them, and its triggers keep counting."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

BEFORE = [("accounts", "0005_outlier_ejection_quota_reset_patience")]
AFTER = [("accounts", "0006_identity_account_rows")]


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def account_rows() -> dict[str, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, account_rows FROM accounts_routingidentity ORDER BY name")
        return dict(cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_the_upgrade_counts_the_accounts_already_there():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    try:
        old = migrate(BEFORE)
        identity = old.get_model("accounts", "RoutingIdentity")
        account = old.get_model("accounts", "Account")
        aliased, single, empty = (identity.objects.create(name=n) for n in ("aliased", "single", "empty"))
        for i, owner in enumerate((aliased, aliased, aliased, single)):
            account.objects.create(name=f"account-{i}", identity=owner, credentials={})
        migrate(AFTER)
        assert account_rows() == {"aliased": 3, "empty": 0, "single": 1}
        # and the triggers count from there on
        with connection.cursor() as cursor:
            cursor.execute("UPDATE accounts_account SET identity_id = %s WHERE name = %s", [empty.pk, "account-0"])
        assert account_rows() == {"aliased": 2, "empty": 1, "single": 1}
    finally:
        migrate(latest)


def _key_triggers() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'accounts_apikey'::regclass AND NOT tgisinternal")
        return {name for (name,) in cursor.fetchall()}


@pytest.mark.django_db(transaction=True)
def test_the_key_change_notices_reverse_and_apply_again(postgres_only):
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    assert _key_triggers() == {"accounts_api_key_changed", "accounts_api_key_deleted"}
    try:
        migrate([("accounts", "0007_keyslot")])
        assert _key_triggers() == set()
    finally:
        migrate(latest)
    assert _key_triggers() == {"accounts_api_key_changed", "accounts_api_key_deleted"}
