"""An operator's delete never leaves a counter or a key slot behind. A
routing identity deleted with leases still open takes them with it
(``Lease.identity`` cascades); the key slots they held are given back in
the same transaction, in the admin, over the operator API or in the ORM,
so their key is not refused at its limit until the reconcile task runs (or
for good, without one)."""

from __future__ import annotations

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts.models import ApiKey, KeySlot, RoutingIdentity
from routing import maintenance
from routing.models import Lease
from tests.factories import AccountFactory, ApiKeyFactory, LeaseFactory
from tests.routing.gateway import Gateway
from tests.support import lease_row_insert, run_queued_behind

pytestmark = pytest.mark.django_db

BASE = "/api/v1/admin"


def delete_over_the_api(client, identity: RoutingIdentity) -> None:
    assert client.delete(f"{BASE}/identities/{identity.name}/").status_code == 204


def delete_in_the_orm(client, identity: RoutingIdentity) -> None:
    RoutingIdentity.objects.filter(pk=identity.pk).delete()


DELETES = [delete_over_the_api, delete_in_the_orm]


@pytest.fixture
def leased_identity():
    """An identity whose only account was deleted while its lease was out
    (allowed: the lease stays, on the identity), the lease holding the only
    slot of its key; and another account the key could use."""
    key = ApiKeyFactory(max_concurrency=1)
    account = AccountFactory(identity__max_concurrency=2)
    lease = Lease.objects.get(pk=Gateway(key.plaintext).dispatch().json()["lease_id"])
    account.delete()
    AccountFactory()
    assert KeySlot.objects.get(pk=lease.key_slot_id).taken
    return key, RoutingIdentity.objects.get(pk=lease.identity_id)


@pytest.mark.usefixtures("statements")
@pytest.mark.parametrize("delete", DELETES, ids=[d.__name__ for d in DELETES])
def test_deleting_an_identity_gives_back_the_key_slots_of_its_open_leases(operator_api, leased_identity, delete):
    key, identity = leased_identity
    delete(operator_api, identity)
    assert not RoutingIdentity.objects.filter(pk=identity.pk).exists()
    assert ApiKey.objects.get(pk=key.pk).in_flight == 0
    assert Gateway(key.plaintext).dispatch().status_code == 200  # not refused at its limit
    assert maintenance.counters_reconcile()["key_in_flight"] == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_lease_completed_while_its_identity_is_deleted_leaves_its_slot_to_the_next_lease():
    """The delete waits for a completion that holds the lease: the slot it
    freed was taken by another lease of the key before it committed, and the
    delete, which read the lease open before it waited, must not free it."""
    key = ApiKeyFactory(max_concurrency=1)
    account = AccountFactory(identity__max_concurrency=2)
    lease = Lease.objects.get(pk=Gateway(key.plaintext).dispatch().json()["lease_id"])
    account.delete()
    identity = RoutingIdentity.objects.get(pk=lease.identity_id)
    other = LeaseFactory(api_key=key, account=AccountFactory(), key_slot=None)
    RoutingIdentity.objects.filter(pk=other.identity_id).update(in_flight=1)

    def complete_and_take(cursor) -> None:  # the completion, and the next claim of the slot
        cursor.execute("UPDATE routing_lease SET completed_at = now(), outcome = 'success' WHERE id = %s", [lease.pk])
        cursor.execute("UPDATE routing_lease SET key_slot_id = %s WHERE id = %s", [lease.key_slot_id, other.pk])

    run_queued_behind(complete_and_take, lambda: RoutingIdentity.objects.filter(pk=identity.pk).delete())
    assert not RoutingIdentity.objects.filter(pk=identity.pk).exists()
    assert KeySlot.objects.get(pk=lease.key_slot_id).taken  # the other lease holds it
    assert maintenance.counters_reconcile()["key_in_flight"] == 0


def test_the_admin_deletes_an_identity_with_its_lease_history(staff_client, leased_identity):
    """Its leases, open or completed, go with it, as over the operator API:
    the admin refused before, saying no one had permission to delete leases
    (none has: they are history), which left the operator nothing to do."""
    key, identity = leased_identity
    LeaseFactory(identity=identity, account=None, account_name="gone", completed_at=timezone.now(), outcome="success")
    url = reverse("admin:accounts_routingidentity_delete", args=[identity.pk])
    page = staff_client.get(url)
    assert page.status_code == 200 and not page.context["perms_lacking"]
    assert staff_client.post(url, {"post": "yes"}).status_code == 302
    assert not RoutingIdentity.objects.filter(pk=identity.pk).exists()
    assert not Lease.objects.filter(identity_id=identity.pk).exists()
    assert ApiKey.objects.get(pk=key.pk).in_flight == 0
    assert maintenance.counters_reconcile()["key_in_flight"] == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_lease_started_while_the_admin_deletes_its_identity_keeps_the_identity(staff_client):
    """A claim that holds the identity's row has inserted its lease; the
    admin's delete queues behind it, and the lease's foreign key refuses it
    at commit: a message and nothing deleted, not a server error."""
    identity = AccountFactory().identity
    identity.accounts.all().delete()
    url = reverse("admin:accounts_routingidentity_delete", args=[identity.pk])

    def claim(cursor) -> None:  # a claim's statements, as routing/pg.py sends them
        cursor.execute("SELECT id FROM accounts_routingidentity WHERE id = %s FOR NO KEY UPDATE", [identity.pk])
        cursor.execute("UPDATE accounts_routingidentity SET in_flight = in_flight + 1 WHERE id = %s", [identity.pk])
        lease_row_insert(cursor, identity_id=identity.pk)

    answer = run_queued_behind(claim, lambda: staff_client.post(url, {"post": "yes"}))
    assert answer.status_code == 302
    assert RoutingIdentity.objects.get(pk=identity.pk).in_flight == 1
    assert Lease.objects.filter(identity_id=identity.pk).count() == 1
