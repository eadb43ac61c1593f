"""A key that may no longer be used gives back what its open leases hold.
Its gateway could not complete them (a disabled, expired or deleted key is
refused 401), so each kept its identity's slot, and its key's, until its
TTL (15 minutes by default): disabling one misbehaving key starved every
other key of those identities. Disabling (the admin's form and bulk
action, the operator API, the ORM) or deleting a key now closes its open
leases as ``expired`` in the same transaction; a lease ends by its key's
expiry at the latest."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts.models import ApiKey, KeySlot, RoutingIdentity
from routing import maintenance, tasks
from routing.models import Lease, LeaseOutcome
from tests.factories import AccountFactory, ApiKeyFactory, LeaseFactory
from tests.routing.gateway import Gateway
from tests.support import lease_row_insert, run_queued_behind

pytestmark = pytest.mark.django_db

BASE = "/api/v1/admin"


def disable_with_the_admin_form(client, key: ApiKey) -> None:
    url = reverse("admin:accounts_apikey_change", args=[key.pk])
    form = {
        "name": key.name,
        "route_strategy": "auto",
        "preferred_pool": "balanced",
        "latency_routing_enabled": "on",
        "max_concurrency": str(key.max_concurrency),
        "min_start_interval_ms": "0",
        "model_preferences": "{}",
    }  # "enabled" unticked
    assert client.post(url, form).status_code == 302


def disable_with_the_admin_action(client, key: ApiKey) -> None:
    changelist = reverse("admin:accounts_apikey_changelist")
    assert client.post(changelist, {"action": "disable", "_selected_action": [key.pk]}).status_code == 302


def disable_over_the_api(client, key: ApiKey) -> None:
    assert client.patch(f"{BASE}/keys/{key.pk}/", {"enabled": False}, format="json").status_code == 200


def disable_in_the_orm(client, key: ApiKey) -> None:
    key.enabled = False
    key.save()


def expire_in_the_orm(client, key: ApiKey) -> None:
    key.expires_at = timezone.now() - timedelta(seconds=1)
    key.save()


def delete_over_the_api(client, key: ApiKey) -> None:
    assert client.delete(f"{BASE}/keys/{key.pk}/").status_code == 204


def delete_in_the_orm(client, key: ApiKey) -> None:
    ApiKey.objects.filter(pk=key.pk).delete()


def delete_in_the_admin(client, key: ApiKey) -> None:
    url = reverse("admin:accounts_apikey_delete", args=[key.pk])
    assert client.post(url, {"post": "yes"}).status_code == 302


REVOKES = [
    disable_with_the_admin_form,
    disable_with_the_admin_action,
    disable_over_the_api,
    disable_in_the_orm,
    expire_in_the_orm,
    delete_over_the_api,
    delete_in_the_orm,
    delete_in_the_admin,
]


def client_for(revoke, staff_client, operator_api):
    return operator_api if "api" in revoke.__name__ else staff_client


@pytest.mark.usefixtures("statements")
@pytest.mark.parametrize("revoke", REVOKES, ids=[r.__name__ for r in REVOKES])
def test_a_revoked_key_gives_back_the_slots_of_its_open_leases(revoke, staff_client, operator_api):
    key = ApiKeyFactory(max_concurrency=5)
    other = ApiKeyFactory()
    AccountFactory(identity__max_concurrency=1)
    lease_id = Gateway(key.plaintext).dispatch().json()["lease_id"]
    assert Gateway(other.plaintext).dispatch(max_wait_ms=0).status_code == 429  # the identity is full

    revoke(client_for(revoke, staff_client, operator_api), key)

    lease = Lease.objects.get(pk=lease_id)
    assert lease.outcome == LeaseOutcome.EXPIRED and lease.completed_at is not None
    assert RoutingIdentity.objects.get(pk=lease.identity_id).in_flight == 0
    assert not KeySlot.objects.filter(api_key_id=key.pk, taken=True).exists()
    assert Gateway(other.plaintext).dispatch(max_wait_ms=0).status_code == 200  # at once, not after the TTL
    assert Gateway(key.plaintext).complete(lease_id, outcome="success").status_code == 401
    drift = maintenance.counters_reconcile()
    assert drift["key_in_flight"] == 0 and drift["identity_in_flight"] == 0


@pytest.mark.usefixtures("statements")
def test_the_lease_of_a_key_disabled_then_enabled_again_is_closed():
    """Re-enabling the key gives nothing back: the gateway's completion of
    the closed lease is the 409 of any closed lease, and changes nothing."""
    key = ApiKeyFactory(max_concurrency=1)
    AccountFactory(identity__max_concurrency=2)
    gateway = Gateway(key.plaintext)
    lease_id = gateway.dispatch().json()["lease_id"]
    disable_in_the_orm(None, key)
    key.enabled = True
    key.save()
    assert gateway.complete(lease_id, outcome="rate_limited").status_code == 409
    identity = RoutingIdentity.objects.get(pk=Lease.objects.get(pk=lease_id).identity_id)
    assert identity.in_flight == 0 and identity.cooldown_until is None
    assert gateway.dispatch().status_code == 200  # its one slot is free


@pytest.mark.usefixtures("statements")
def test_a_lease_ends_by_its_keys_expiry():
    expiry = timezone.now() + timedelta(seconds=60)
    key = ApiKeyFactory(expires_at=expiry)
    AccountFactory()
    body = Gateway(key.plaintext).dispatch().json()
    assert Lease.objects.get(pk=body["lease_id"]).expires_at == expiry


def test_an_expiry_moved_earlier_shortens_the_keys_open_leases():
    key = ApiKeyFactory()
    lease = LeaseFactory(api_key=key)
    done = LeaseFactory(api_key=key, completed_at=timezone.now(), outcome=LeaseOutcome.SUCCESS)
    key.expires_at = timezone.now() + timedelta(seconds=30)
    key.save()
    assert Lease.objects.get(pk=lease.pk).expires_at == key.expires_at
    assert Lease.objects.get(pk=done.pk).expires_at == done.expires_at  # history stays as it was


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_lease_completed_while_its_key_is_disabled_keeps_its_outcome():
    """The disable waits for a completion that holds the lease, and leaves
    it alone: its slot was freed by the completion, and another lease of
    the key holds it by now."""
    key = ApiKeyFactory(max_concurrency=1)
    AccountFactory(identity__max_concurrency=2)
    lease = Lease.objects.get(pk=Gateway(key.plaintext).dispatch().json()["lease_id"])
    other = LeaseFactory(api_key=ApiKeyFactory(), key_slot=None)
    RoutingIdentity.objects.filter(pk=other.identity_id).update(in_flight=1)

    def complete_and_take(cursor) -> None:  # the completion, and the next claim of the slot
        cursor.execute("UPDATE routing_lease SET completed_at = now(), outcome = 'success' WHERE id = %s", [lease.pk])
        cursor.execute(
            "UPDATE accounts_routingidentity SET in_flight = in_flight - 1 WHERE id = %s", [lease.identity_id]
        )
        cursor.execute("UPDATE routing_lease SET key_slot_id = %s WHERE id = %s", [lease.key_slot_id, other.pk])

    run_queued_behind(complete_and_take, lambda: disable_in_the_orm(None, key))
    assert Lease.objects.get(pk=lease.pk).outcome == LeaseOutcome.SUCCESS
    assert KeySlot.objects.get(pk=lease.key_slot_id).taken  # the other lease holds it
    assert RoutingIdentity.objects.get(pk=lease.identity_id).in_flight == 0


@pytest.mark.parametrize("revoked", [{"enabled": False}, {"expires_at": timezone.now() - timedelta(seconds=1)}])
def test_the_reaper_closes_the_leases_of_a_key_revoked_without_a_save(revoked):
    """A key disabled in SQL (or a lease claimed after the disable by a
    dispatch that read its key before): the next reaper run closes it."""
    key = ApiKeyFactory(max_concurrency=1)
    AccountFactory(identity__max_concurrency=1)
    lease_id = Gateway(key.plaintext).dispatch().json()["lease_id"]
    live = LeaseFactory(api_key=ApiKeyFactory())
    RoutingIdentity.objects.filter(pk=live.identity_id).update(in_flight=1)
    ApiKey.objects.filter(pk=key.pk).update(**revoked)  # no signal

    assert tasks.lease_reap() == 1
    lease = Lease.objects.get(pk=lease_id)
    assert lease.outcome == LeaseOutcome.EXPIRED
    assert RoutingIdentity.objects.get(pk=lease.identity_id).in_flight == 0
    assert not KeySlot.objects.filter(api_key_id=key.pk, taken=True).exists()
    assert not Lease.objects.get(pk=live.pk).outcome  # a usable key's lease is left alone


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_lease_started_while_the_admin_deletes_its_key_keeps_the_key(staff_client):
    """A claim of a paced key that read the key before the delete holds its
    row and has inserted its lease; the delete queues behind it, and the
    lease's foreign key refuses it at commit: a message and nothing
    deleted, not a server error."""
    key = ApiKeyFactory(min_start_interval_ms=10)
    identity = AccountFactory().identity
    url = reverse("admin:accounts_apikey_delete", args=[key.pk])

    def claim(cursor) -> None:  # slots.key_slot_claim's pacing, then the identity and the lease
        cursor.execute("UPDATE accounts_apikey SET last_started_at = now() WHERE id = %s", [key.pk])
        cursor.execute("UPDATE accounts_routingidentity SET in_flight = in_flight + 1 WHERE id = %s", [identity.pk])
        lease_row_insert(cursor, identity_id=identity.pk, api_key_id=key.pk)

    answer = run_queued_behind(claim, lambda: staff_client.post(url, {"post": "yes"}))
    assert answer.status_code == 302
    assert ApiKey.objects.filter(pk=key.pk).exists()
    assert Lease.objects.filter(api_key_id=key.pk).count() == 1
