"""The hot counters stay true: the reconcile task sets right whatever drifted
and reports it, and a write the database refuses on the hot path is a clean
503 that leaves nothing half done."""

from __future__ import annotations

import logging

import pytest
from django.utils import timezone

from accounts.models import Account, ApiKey, KeySlot, RoutingIdentity
from routing import maintenance
from routing.models import CounterDrift, Lease, SessionBinding
from tests.factories import AccountFactory, ApiKeyFactory, SessionBindingFactory
from tests.routing.gateway import Gateway
from tests.support import run_queued_behind

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("statements")]


def test_reconcile_finds_nothing_when_every_counter_is_true():
    account = AccountFactory()
    key = ApiKeyFactory(max_concurrency=5)
    Gateway(key.plaintext).dispatch()
    SessionBindingFactory(account=account)
    assert maintenance.counters_reconcile() == {
        name: 0 for name in ("identity_in_flight", "key_in_flight", "account_binding_rows", "identity_account_rows")
    }
    assert not CounterDrift.objects.filter(total__gt=0).exists()


def test_reconcile_sets_every_drifted_counter_right_and_reports_it(caplog):
    account = AccountFactory(identity__max_concurrency=2)
    key = ApiKeyFactory(max_concurrency=5)
    gw = Gateway(key.plaintext)
    leases = [gw.dispatch().json()["lease_id"] for _ in range(2)]
    SessionBindingFactory.create_batch(3, account=account)
    # Stale writes, as a whole-row save of an old copy would make them.
    RoutingIdentity.objects.filter(pk=account.identity_id).update(in_flight=7)
    KeySlot.objects.filter(api_key=key).update(taken=False)  # both leases' slots look free
    KeySlot.objects.filter(api_key=key, number=4).update(taken=True)  # and one no lease holds looks taken
    Account.objects.filter(pk=account.pk).update(binding_rows=1)
    RoutingIdentity.objects.filter(pk=account.identity_id).update(account_rows=3)

    with caplog.at_level(logging.WARNING, logger="routing.maintenance"):
        found = maintenance.counters_reconcile(now=timezone.now())

    assert found == {
        "identity_in_flight": 5,
        "key_in_flight": 3,
        "account_binding_rows": 2,
        "identity_account_rows": 2,
    }
    assert RoutingIdentity.objects.get(pk=account.identity_id).in_flight == 2
    assert ApiKey.objects.get(pk=key.pk).in_flight == 2
    assert Account.objects.get(pk=account.pk).binding_rows == 3
    assert RoutingIdentity.objects.get(pk=account.identity_id).account_rows == 1
    assert "identity_in_flight was off by 5 on 1 row(s)" in caplog.text
    assert dict(CounterDrift.objects.values_list("counter", "total")) == {
        "identity_in_flight": 5,
        "key_in_flight": 3,
        "account_binding_rows": 2,
        "identity_account_rows": 2,
    }
    # The leases complete normally afterwards, and a second run finds nothing.
    for lease in leases:
        assert gw.complete(lease, outcome="success").status_code == 200
    assert set(maintenance.counters_reconcile().values()) == {0}
    assert RoutingIdentity.objects.get(pk=account.identity_id).in_flight == 0


def test_drift_is_exported_on_metrics(client):
    account = AccountFactory()
    Account.objects.filter(pk=account.pk).update(binding_rows=4)
    maintenance.counters_reconcile()
    text = client.get("/metrics").content.decode()
    assert 'kiropool_counter_drift_total{counter="account_binding_rows"} 4.0' in text
    assert 'kiropool_counter_drift_total{counter="identity_in_flight"} 0.0' in text


def test_the_drift_of_every_counter_the_reconcile_recounts_is_exported_on_metrics(client):
    """An identity's alias count is recounted and set right like the others,
    and its drift is exported like theirs: /metrics is where an operator
    hears that something wrote a counter outside its owners."""
    account = AccountFactory()
    RoutingIdentity.objects.filter(pk=account.identity_id).update(account_rows=3)
    found = maintenance.counters_reconcile()
    assert found["identity_account_rows"] == 2
    text = client.get("/metrics").content.decode()
    assert 'kiropool_counter_drift_total{counter="identity_account_rows"} 2.0' in text
    for name in found:
        assert f'kiropool_counter_drift_total{{counter="{name}"}}' in text, name


# Outside a test transaction, as in production: a refused statement rolls
# back on its own (autocommit), and the connection serves the next request.
@pytest.mark.django_db(transaction=True)
def test_a_write_the_database_refuses_is_a_clean_503_and_changes_nothing():
    account = AccountFactory()
    gw = Gateway(ApiKeyFactory().plaintext)
    lease = gw.dispatch(session_id="conv").json()["lease_id"]
    # A corrupted counter: the release would take it below zero, which the
    # check constraint refuses.
    RoutingIdentity.objects.filter(pk=account.identity_id).update(in_flight=0)

    response = gw.complete(lease, outcome="success", first_token_ms=300)

    assert response.status_code == 503
    assert response.json()["error"]["type"] == "api_error"
    assert response["Retry-After"] == "1"
    assert Lease.objects.get(pk=lease).completed_at is None  # not half completed
    assert not SessionBinding.objects.exists()
    # Once the counter is set right, the same completion goes through.
    maintenance.counters_reconcile()
    assert gw.complete(lease, outcome="success", first_token_ms=300).status_code == 200
    assert SessionBinding.objects.get().account_id == account.pk


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_slot_set_right_while_its_lease_completes_is_set_from_what_committed():
    """A drifted slot (free under its open lease) whose lease completes while
    the reconcile waits for the slot's lock: once the lock is had, the slot
    is set from the database as the completion left it (its lease closed, so
    free), not as it was when the reconcile began waiting (taken, and no
    lease would ever have freed it)."""
    AccountFactory(identity__max_concurrency=2)
    key = ApiKeyFactory(max_concurrency=2)
    lease = Lease.objects.get(pk=Gateway(key.plaintext).dispatch().json()["lease_id"])
    KeySlot.objects.filter(pk=lease.key_slot_id).update(taken=False)  # the drift

    def completion(cursor) -> None:  # committed while the reconcile waits for the slot's row
        cursor.execute("UPDATE routing_lease SET completed_at = now(), outcome = 'success' WHERE id = %s", [lease.pk])
        cursor.execute("UPDATE accounts_keyslot SET taken = false WHERE id = %s", [lease.key_slot_id])
        cursor.execute(
            "UPDATE accounts_routingidentity SET in_flight = in_flight - 1 WHERE id = %s", [lease.identity_id]
        )

    found = run_queued_behind(completion, maintenance.counters_reconcile)
    assert found["key_in_flight"] == 0  # nothing was wrong by then
    assert not KeySlot.objects.get(pk=lease.key_slot_id).taken
    assert ApiKey.objects.get(pk=key.pk).in_flight == 0
