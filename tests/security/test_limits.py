"""Limits on what one caller can make the server do: body size, list
lengths, per-key request rates, and leases never beyond the limits."""

import json
import threading
import uuid
from datetime import timedelta

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import connection, connections
from django.urls import reverse
from django.utils import timezone

from accounts.models import (
    MAX_PREFERENCE_ACCOUNTS,
    MAX_PREFERENCE_MODELS,
    ApiKey,
    RoutingIdentity,
    validate_model_preferences,
)
from core.rates import parse_rate
from routing.models import Lease
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory, api_key_admin_form
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db


def assert_error(response, status, kind):
    assert response.status_code == status, response.content
    assert response.json()["error"]["type"] == kind
    assert response.json()["error"]["message"]


@pytest.fixture
def key():
    AccountFactory(name="only", identity=RoutingIdentityFactory(max_concurrency=100))
    return ApiKeyFactory()


# --- request body size ------------------------------------------------------------


def test_an_oversized_body_is_413_before_any_parsing(key, settings):
    settings.KIROPOOL_MAX_BODY_BYTES = 1024
    gw = Gateway(key.plaintext)
    big = gw.dispatch(session_id="s" * 300, model="m" * 200, exclude_accounts=["x" * 150] * 5)
    assert_error(big, 413, "invalid_request_error")
    assert "limit of 1024 bytes" in big.json()["error"]["message"]
    assert Lease.objects.count() == 0
    assert gw.dispatch(exclude_accounts=["x" * 150] * 5).status_code == 200  # just under


def test_the_default_cap_admits_the_largest_valid_dispatch(key):
    body = {"session_id": "s" * 512, "model": "m" * 200, "exclude_accounts": ["x" * 200] * 256}
    assert Gateway(key.plaintext).dispatch(**body).status_code == 200


def test_the_cap_covers_every_endpoint(operator_api, settings, client):
    settings.KIROPOOL_MAX_BODY_BYTES = 100
    padding = {"name": "p" * 200}
    assert_error(operator_api.post("/api/v1/admin/identities/", padding, format="json"), 413, "invalid_request_error")
    assert_error(client.post(reverse("admin:login"), padding), 413, "invalid_request_error")


# --- list lengths -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"exclude_accounts": ["a"] * 257},
        {"exclude_accounts": [1, 2]},
        {"exclude_accounts": ["x" * 201]},
        {"exclude_accounts": [{"name": "a"}]},
        {"session_id": "s" * 513},
        {"model": "m" * 201},
        {"model": ["gpt"]},
        {"max_wait_ms": 300_001},
        {"max_wait_ms": -1},
    ],
)
def test_dispatch_and_explain_bound_their_input(key, body):
    gw = Gateway(key.plaintext)
    assert_error(gw.dispatch(**body), 400, "invalid_request_error")
    assert_error(gw.explain(**body), 400, "invalid_request_error")


TOO_MANY_MODELS = {f"model-{i}": [] for i in range(MAX_PREFERENCE_MODELS + 1)}
TOO_MANY_ACCOUNTS = {"m": [f"a{i}" for i in range(MAX_PREFERENCE_ACCOUNTS + 1)]}
BAD_PREFERENCES = [
    TOO_MANY_MODELS,
    TOO_MANY_ACCOUNTS,
    {"m": "only"},
    {"m": [1]},
    {"m": [""]},
    {"m": ["x" * 201]},
    {"": ["only"]},
    {"m" * 201: ["only"]},
    ["only"],
]


@pytest.mark.parametrize("value", BAD_PREFERENCES)
def test_model_preferences_are_bounded_on_the_model(value):
    with pytest.raises(ValidationError):
        validate_model_preferences(value)
    with pytest.raises(ValidationError) as raised:
        ApiKey(name="k", prefix="p", key_hash="h", model_preferences=value).full_clean()
    assert "model_preferences" in raised.value.message_dict


def test_model_preferences_within_bounds_are_fine():
    validate_model_preferences({f"model-{i}": ["only"] for i in range(MAX_PREFERENCE_MODELS)})
    validate_model_preferences({"m": [f"a{i}" for i in range(MAX_PREFERENCE_ACCOUNTS)]})


# Model names (object keys) are bounded too, but OpenAPI 3.0 cannot say so:
# a request the schema allows, refused by a rule, is a 422.
KEY_RULES = ({"": ["only"]}, {"m" * 201: ["only"]}, {"m\x00": ["only"]})


@pytest.mark.parametrize("value", [v for v in BAD_PREFERENCES if isinstance(v, dict)] + list(KEY_RULES))
def test_model_preferences_are_bounded_on_the_operator_api(operator_api, key, value, django_assert_max_num_queries):
    # The token, the caller's permissions (own and group's) and the key: refused
    # before the account names are looked up.
    with django_assert_max_num_queries(4):
        response = operator_api.patch(f"/api/v1/admin/keys/{key.pk}/", {"model_preferences": value}, format="json")
    assert_error(response, 422 if value in KEY_RULES else 400, "invalid_request_error")
    assert "model_preferences" in response.json()["error"]["message"]
    key.refresh_from_db()
    assert key.model_preferences == {}


@pytest.mark.parametrize("value", [TOO_MANY_MODELS, TOO_MANY_ACCOUNTS, {"m": [1]}, {"m\x00": []}])
def test_model_preferences_are_bounded_in_the_admin(staff_client, value):
    response = staff_client.post(
        reverse("admin:accounts_apikey_add"),
        api_key_admin_form(model_preferences=json.dumps(value)),
    )
    assert response.status_code == 200  # the form again, with the error
    assert "model_preferences" in response.context["adminform"].form.errors
    assert not ApiKey.objects.filter(name="from-admin").exists()


# --- per-key request rates ----------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "parsed"),
    [("60/min", (60, 60)), ("10/s", (10, 1)), ("1000/h", (1000, 3600)), ("5/day", (5, 86400)), ("", None)],
)
def test_rates_parse(rate, parsed):
    assert parse_rate(rate) == parsed


@pytest.mark.parametrize("rate", ["abc", "10", "0/min", "-1/s", "10/fortnight", "x/min"])
def test_bad_rates_are_refused(rate):
    with pytest.raises(ImproperlyConfigured):
        parse_rate(rate)


def test_explain_is_rate_limited_per_key(key, settings):
    settings.KIROPOOL_EXPLAIN_RATE = "3/d"  # a day's window: the test never straddles two
    gw, other = Gateway(key.plaintext), Gateway(ApiKeyFactory().plaintext)
    assert [gw.explain().status_code for _ in range(3)] == [200, 200, 200]
    limited = gw.explain()
    assert_error(limited, 429, "rate_limit_error")
    assert 1 <= int(limited["Retry-After"]) <= 86400
    assert other.explain().status_code == 200  # another key has its own budget


def test_dispatch_is_not_rate_limited_by_default(key, settings):
    assert settings.KIROPOOL_DISPATCH_RATE == ""
    # The key's concurrency cap is another limit (tests/security/test_key_isolation.py).
    settings.KIROPOOL_KEY_MAX_CONCURRENCY = 0
    gw = Gateway(key.plaintext)
    for _ in range(70):
        assert gw.dispatch(max_wait_ms=0).status_code == 200


def test_dispatch_rate_limit_when_configured(key, settings):
    settings.KIROPOOL_DISPATCH_RATE = "2/s"
    gw = Gateway(key.plaintext)
    results = [gw.dispatch().status_code for _ in range(3)]
    assert results[:2] == [200, 200]
    if results[2] == 429:  # unless the one-second window rolled over in between
        assert Lease.objects.count() == 2  # a throttled dispatch acquires nothing
    complete = gw.complete(uuid.uuid4(), outcome="success")
    assert complete.status_code == 404  # completion is never rate limited


def test_a_cache_outage_lets_requests_through(key, settings, monkeypatch):
    settings.KIROPOOL_EXPLAIN_RATE = "1/min"

    def down(*args, **kwargs):
        raise ConnectionError("cache down")

    monkeypatch.setattr(caches["default"], "add", down)
    gw = Gateway(key.plaintext)
    assert [gw.explain().status_code for _ in range(3)] == [200, 200, 200]


# --- leases never beyond the limits ----------------------------------------------


def live_leases(**filters) -> int:
    return Lease.objects.filter(completed_at__isnull=True, expires_at__gt=timezone.now(), **filters).count()


def test_a_key_never_holds_more_leases_than_its_limit():
    for i in range(4):
        AccountFactory(name=f"wide-{i}", identity=RoutingIdentityFactory(max_concurrency=10))
    key = ApiKeyFactory(max_concurrency=2)
    gw = Gateway(key.plaintext)
    held = [gw.dispatch().json()["lease_id"] for _ in range(2)]
    for _ in range(3):
        assert_error(gw.dispatch(max_wait_ms=5000), 429, "rate_limit_error")  # at once, no wait
    assert live_leases(api_key=key) == 2 == ApiKey.objects.get(pk=key.pk).in_flight
    assert gw.complete(held[0], outcome="success").status_code == 200
    assert gw.dispatch().status_code == 200
    assert live_leases(api_key=key) == 2


def test_an_identity_never_serves_more_leases_than_its_limit():
    identity = RoutingIdentityFactory(max_concurrency=2)
    AccountFactory(name="alias-1", identity=identity)
    AccountFactory(name="alias-2", identity=identity)
    keys = [ApiKeyFactory() for _ in range(3)]
    granted = [Gateway(k.plaintext).dispatch(max_wait_ms=0).status_code for k in keys for _ in range(2)]
    assert granted.count(200) == 2 and set(granted) == {200, 429}
    assert live_leases(identity=identity) == 2 == RoutingIdentity.objects.get(pk=identity.pk).in_flight


def test_an_expired_lease_stops_counting_and_is_not_completable_twice(settings):
    identity = RoutingIdentityFactory(max_concurrency=1)
    AccountFactory(identity=identity)
    gw = Gateway(ApiKeyFactory().plaintext)
    first = gw.dispatch().json()["lease_id"]
    Lease.objects.filter(pk=first).update(expires_at=timezone.now() - timedelta(seconds=1))
    second = gw.dispatch(max_wait_ms=0)
    assert second.status_code == 200
    assert live_leases(identity=identity) == 1 == RoutingIdentity.objects.get(pk=identity.pk).in_flight
    assert_error(gw.complete(first, outcome="success"), 409, "conflict_error")
    assert RoutingIdentity.objects.get(pk=identity.pk).in_flight == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_concurrent_dispatches_never_exceed_the_key_or_identity_limits():
    for i in range(3):
        AccountFactory(name=f"conc-{i}", identity=RoutingIdentityFactory(max_concurrency=2))
    limited = ApiKeyFactory(max_concurrency=3)
    unlimited = ApiKeyFactory()
    statuses: dict[str, list[int]] = {"limited": [], "unlimited": []}
    barrier = threading.Barrier(12)

    def hammer(name, plaintext):
        try:
            gw = Gateway(plaintext)
            barrier.wait(timeout=30)
            statuses[name].append(gw.dispatch(max_wait_ms=0).status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=hammer, args=("limited", limited.plaintext)) for _ in range(6)]
    threads += [threading.Thread(target=hammer, args=("unlimited", unlimited.plaintext)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Every dispatch was answered: a thread whose dispatch raised appends
    # nothing, and every bound below holds of no answers at all.
    assert not any(thread.is_alive() for thread in threads)
    assert (len(statuses["limited"]), len(statuses["unlimited"])) == (6, 6), statuses
    assert set(statuses["limited"] + statuses["unlimited"]) <= {200, 429}
    assert statuses["limited"].count(200) <= 3
    assert live_leases(api_key=limited) == statuses["limited"].count(200) == ApiKey.objects.get(pk=limited.pk).in_flight
    assert live_leases() == statuses["limited"].count(200) + statuses["unlimited"].count(200) <= 6
    for identity in RoutingIdentity.objects.all():
        assert identity.in_flight == live_leases(identity=identity) <= identity.max_concurrency
    assert connection.vendor == "postgresql"
