"""On PostgreSQL a statement deleting session bindings moves each account's
``binding_rows`` (and so its order rows) once, by its count (migration
0015): the purge's batches hold an account's rows for one update, not one
per binding. The counts stay exact, and two such statements over the same
accounts never wait on each other in a cycle."""

from __future__ import annotations

import threading
from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models import Count, F
from django.utils import timezone

from accounts.models import Account
from routing.models import PoolOrder, SessionBinding
from routing.sessions import binding_purge
from tests.accounts.test_migrations import migrate
from tests.factories import AccountFactory, ApiKeyFactory, SessionBindingFactory
from tests.support import test_database_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only")]


def _bindings(accounts: list[Account], per_account: int, *, expired: bool = False) -> None:
    key, earlier = ApiKeyFactory(), timezone.now() - timedelta(hours=1)
    expires = earlier + timedelta(minutes=1) if expired else timezone.now() + timedelta(hours=1)
    for account in accounts:
        for _ in range(per_account):
            SessionBindingFactory(
                api_key=key, account=account, created_at=earlier, updated_at=earlier, expires_at=expires
            )


def _counts_exact() -> bool:
    drifted = Account.objects.annotate(n=Count("bindings")).exclude(binding_rows=F("n"))
    copies = PoolOrder.objects.exclude(binding_rows=F("account__binding_rows"))
    return not drifted.exists() and not copies.exists()


def test_a_purge_moves_each_accounts_counter_once_by_its_count():
    accounts = AccountFactory.create_batch(3)
    _bindings(accounts, 4, expired=True)
    _bindings(accounts[:1], 2)  # live: stays

    # Every update of an account row, whatever fired it: this backend's
    # counts, not yet flushed to the statistics (read in one transaction).
    updated = "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'accounts_account'"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(updated)
        (before,) = cursor.fetchone()
        assert binding_purge() == (12, 0)
        cursor.execute(updated)
        (after,) = cursor.fetchone()
    updates = after - before

    assert updates == 3  # once per account, not once per binding (12)
    counts = dict(Account.objects.values_list("pk", "binding_rows"))
    assert counts == {accounts[0].pk: 2, accounts[1].pk: 0, accounts[2].pk: 0}
    assert _counts_exact()


def test_inserts_and_moves_still_count_one_by_one():
    first, second = AccountFactory.create_batch(2)
    _bindings([first], 3)
    SessionBinding.objects.filter(pk=SessionBinding.objects.first().pk).update(account=second)
    assert dict(Account.objects.values_list("pk", "binding_rows")) == {first.pk: 2, second.pk: 1}
    assert _counts_exact()


def test_two_deletes_over_the_same_accounts_never_deadlock_and_keep_the_counts():
    """Each statement takes its bindings in its own order (one ascending, one
    descending); its trigger locks their accounts in id order. 20 rounds of
    both at once, each holding its locks a moment before committing."""
    accounts = AccountFactory.create_batch(6)
    _bindings(accounts, 40)
    pks = list(SessionBinding.objects.order_by("pk").values_list("pk", flat=True))
    rounds = [(pks[n * 8 : n * 8 + 8 : 2], pks[n * 8 + 1 : n * 8 + 8 : 2][::-1]) for n in range(20)]
    errors: list[Exception] = []
    barrier = threading.Barrier(2)

    def deleter(side: int) -> None:
        with psycopg.connect(test_database_url()) as conn:
            for batch in (pair[side] for pair in rounds):
                barrier.wait(timeout=30)
                try:
                    with conn.transaction():
                        conn.execute("SET LOCAL lock_timeout = '5s'")
                        conn.execute(
                            "DELETE FROM routing_sessionbinding WHERE id IN"
                            " (SELECT unnest(%s::bigint[]) ORDER BY 1 " + ("ASC" if side == 0 else "DESC") + ")",
                            [batch],
                        )
                        conn.execute("SELECT pg_sleep(0.005)")
                except psycopg.Error as error:
                    errors.append(error)

    threads = [threading.Thread(target=deleter, args=(side,)) for side in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    assert SessionBinding.objects.count() == 240 - 20 * 8
    assert _counts_exact()


def test_the_migration_reverses_to_the_row_trigger_and_both_keep_the_counts():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    accounts = AccountFactory.create_batch(2)
    try:
        migrate([("routing", "0014_wait_ticket")])
        _bindings(accounts, 3)
        SessionBinding.objects.filter(pk__in=SessionBinding.objects.order_by("pk").values("pk")[:4]).delete()
        assert _counts_exact()
    finally:
        migrate(latest)
    _bindings(accounts, 2)
    SessionBinding.objects.filter(pk__in=SessionBinding.objects.order_by("pk").values("pk")[:3]).delete()
    assert SessionBinding.objects.count() == 6 - 4 + 4 - 3
    assert _counts_exact()
