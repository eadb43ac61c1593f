"""The hot counters stay true while operators edit (issue 10): gateways
dispatch and complete against one identity from several threads while
another thread edits the identity, its account and the key over the
operator API and in the admin. Nothing gets a 500, no counter drifts, and
the identity can again take exactly its limit of leases.

On PostgreSQL (real row locks and concurrent transactions), with the fast
statements on and off."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import ApiKey, RoutingIdentity
from routing import maintenance
from routing.models import Lease
from tests.accounts.test_counters import change_form
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory
from tests.routing.gateway import Gateway

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only", "statements")]

LIMIT = 3
GATEWAYS = 4
CYCLES = 12


def test_operator_edits_during_traffic_leave_every_counter_true():
    identity = RoutingIdentityFactory(name="busy", max_concurrency=LIMIT)
    account = AccountFactory(name="busy-account", identity=identity)
    key = ApiKeyFactory(name="gateway")
    user = get_user_model().objects.create_superuser("editor", password="pw")
    token = Token.objects.create(user=user).key
    statuses: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def record(kind: str, status: int, body: bytes = b"") -> None:
        with lock:
            statuses[(kind, status)] += 1
            if status >= 500 or (kind == "dispatch" and status == 429):
                errors.append(f"{kind} {status}: {body[:300]!r}")

    def gateway(n: int) -> None:
        gw = Gateway(key.plaintext)
        try:
            for i in range(CYCLES):
                session = {"session_id": f"g{n}-{i % 3}"} if i % 2 else {}
                response = gw.dispatch(max_wait_ms=20_000, **session)
                record("dispatch", response.status_code, response.content)
                if response.status_code != 200:
                    continue
                time.sleep(0.01)
                done = gw.complete(response.json()["lease_id"], outcome="success", first_token_ms=300)
                record("complete", done.status_code, done.content)
        finally:
            connection.close()

    def editor() -> None:
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        admin = Client()
        admin.force_login(user)
        edits = 0
        try:
            while not stop.is_set():
                flip = edits % 2
                for path, body in (
                    (f"/api/v1/admin/identities/{identity.name}/", {"min_start_interval_ms": flip}),
                    (f"/api/v1/admin/accounts/{account.name}/", {"region": f"region-{flip}"}),
                    (f"/api/v1/admin/keys/{key.pk}/", {"preferred_pool": ["balanced", "credit_first"][flip]}),
                ):
                    response = api.patch(path, body, format="json")
                    record("patch", response.status_code, response.content)
                for admin_name, pk, change in (
                    ("routingidentity", identity.pk, {"min_start_interval_ms": str(1 - flip)}),
                    ("account", account.pk, {"profile_arn": f"arn:{edits}"}),
                    ("apikey", key.pk, {"min_start_interval_ms": "0", "name": f"gateway-{flip}"}),
                ):
                    url = reverse(f"admin:accounts_{admin_name}_change", args=[pk])
                    response = admin.post(url, {**change_form(admin, url), **change})
                    record("admin", response.status_code, response.content)
                edits += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=gateway, args=(n,)) for n in range(GATEWAYS)]
    edit = threading.Thread(target=editor)
    edit.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    stop.set()
    edit.join(timeout=60)

    assert not errors, errors
    assert statuses[("dispatch", 200)] == GATEWAYS * CYCLES  # every cycle got its lease
    assert statuses[("complete", 200)] == GATEWAYS * CYCLES
    assert statuses[("patch", 200)] >= 3 and statuses[("admin", 302)] >= 3  # the edits did happen
    # The counters match the rows they count: the reconcile task finds nothing.
    assert set(maintenance.counters_reconcile().values()) == {0}
    identity.refresh_from_db()
    assert identity.in_flight == Lease.objects.filter(identity=identity, completed_at__isnull=True).count() == 0
    assert ApiKey.objects.get(pk=key.pk).in_flight == 0
    # And the identity takes exactly its limit again.
    RoutingIdentity.objects.filter(pk=identity.pk).update(min_start_interval_ms=0)
    gw = Gateway(key.plaintext)
    assert [gw.dispatch(max_wait_ms=0).status_code for _ in range(LIMIT + 1)] == [200] * LIMIT + [429]
