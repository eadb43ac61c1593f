"""Who can reach what. A gateway key opens the three gateway endpoints and
nothing else: no operator API, dashboard or admin page, and none of another
key's leases or session bindings. Staff pages need a staff login."""

import re

import pytest
from django.contrib import admin
from django.urls import URLResolver, get_resolver, reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from routing.models import SessionBinding
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory, SessionBindingFactory
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db

GATEWAY = re.compile(r"^api/v1/(dispatch|dispatch/explain|leases/<uuid:lease_id>/complete)$")
# Open on purpose: probes, the scraper (KIROPOOL_METRICS_TOKEN closes it) and the API description.
PUBLIC = {"healthz", "readyz", "metrics", "api/schema/", "api/docs/"}
# Only redirect: the site root sends staff to the dashboard and anyone else to the login.
REDIRECTS = {""}
STAFF_PREFIXES = ("admin/", "api/v1/admin/", "dashboard/")


def every_route(patterns=None, prefix=""):
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(pattern, URLResolver):
            yield from every_route(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern)


def test_every_route_is_gateway_public_or_staff_only():
    """A new URL has to be put in one of the three on purpose."""
    unclassified = [
        route
        for route in every_route()
        if not GATEWAY.match(route) and route not in PUBLIC | REDIRECTS and not route.startswith(STAFF_PREFIXES)
    ]
    assert unclassified == []


@pytest.fixture
def pool():
    account = AccountFactory(name="acct", identity=RoutingIdentityFactory(name="ident", max_concurrency=5))
    binding = SessionBindingFactory(account=account, session_id="conv-a")
    return {"account": account, "binding": binding, "key": binding.api_key}


def operator_paths(pool) -> list[str]:
    base = "/api/v1/admin"
    return [
        f"{base}/identities/",
        f"{base}/identities/ident/",
        f"{base}/identities/ident/clear-cooldown/",
        f"{base}/accounts/",
        f"{base}/accounts/acct/",
        f"{base}/accounts/acct/reset-quota/",
        f"{base}/proxies/",
        f"{base}/groups/",
        f"{base}/keys/",
        f"{base}/keys/{pool['key'].pk}/",
        f"{base}/bindings/",
        f"{base}/bindings/{pool['binding'].pk}/",
        f"{base}/latency/",
        f"{base}/latency/refresh/",
    ]


@pytest.mark.parametrize("header", ["HTTP_AUTHORIZATION", "HTTP_X_API_KEY"])
def test_a_gateway_key_cannot_reach_the_operator_api(pool, header):
    key = pool["key"]
    client = APIClient()
    client.credentials(**{header: f"Bearer {key.plaintext}" if header == "HTTP_AUTHORIZATION" else key.plaintext})
    for path in operator_paths(pool):
        for method in ("get", "post", "patch", "delete"):
            response = getattr(client, method)(path, {}, format="json")
            # Refused before the method is looked at (DRF authenticates
            # first): a 405 would mean the key got past authentication.
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.json()["error"]["type"] == "authentication_error"
    assert SessionBinding.objects.filter(pk=pool["binding"].pk).exists()


def test_a_gateway_key_cannot_open_the_dashboards_or_the_admin(pool, client):
    key = pool["key"]
    pages = [
        reverse("dashboard:index"),
        reverse("dashboard:account", args=["acct"]),
        reverse("admin:index"),
        reverse("admin:accounts_account_changelist"),
        reverse("admin:accounts_apikey_change", args=[key.pk]),
    ]
    for page in pages:
        for headers in ({"HTTP_AUTHORIZATION": f"Bearer {key.plaintext}"}, {"HTTP_X_API_KEY": key.plaintext}):
            response = client.get(page, **headers)
            assert response.status_code == 302, page
            assert response.url.startswith(reverse("admin:login"))
    unbind = client.post(reverse("dashboard:binding-unbind", args=[pool["binding"].pk]), HTTP_X_API_KEY=key.plaintext)
    assert unbind.status_code == 302
    assert SessionBinding.objects.filter(pk=pool["binding"].pk).exists()


def test_a_key_cannot_complete_another_keys_lease(pool):
    mine, theirs = Gateway(pool["key"].plaintext), Gateway(ApiKeyFactory().plaintext)
    lease = mine.dispatch().json()["lease_id"]
    for outcome in ("success", "rate_limited", "quota_exhausted", "fatal"):
        response = theirs.complete(lease, outcome=outcome)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"
    assert mine.complete(lease, outcome="success").status_code == 200  # untouched by the attempts


def test_a_key_cannot_ride_or_see_another_keys_session_binding(pool):
    other = Gateway(ApiKeyFactory().plaintext)
    explained = other.explain(session_id="conv-a").json()
    assert explained["session"] == "new" and explained["bound_account"] is None
    dispatched = other.dispatch(session_id="conv-a").json()
    assert dispatched["session"] == "new"
    assert Gateway(pool["key"].plaintext).explain(session_id="conv-a").json()["bound_account"] == "acct"


@pytest.mark.parametrize("page", ["dashboard:index", "admin:index", "admin:accounts_account_changelist"])
def test_staff_pages_need_a_staff_login(client, django_user_model, page):
    url = reverse(page)
    anonymous = client.get(url)
    assert anonymous.status_code == 302 and anonymous.url.startswith(reverse("admin:login"))
    client.force_login(django_user_model.objects.create_user(username="member", password="pw"))
    member = client.get(url)
    assert member.status_code == 302 and member.url.startswith(reverse("admin:login"))


def test_the_operator_api_needs_a_staff_user(pool, client, django_user_model):
    path = "/api/v1/admin/accounts/"
    assert client.get(path).status_code == 401
    member = django_user_model.objects.create_user(username="member", password="pw")
    client.force_login(member)
    denied = client.get(path)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    by_token = APIClient()
    by_token.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=member).key}")
    assert by_token.get(path).status_code == 403


def test_every_admin_page_needs_a_staff_login(pool, client):
    for model in admin.site._registry:
        meta = model._meta
        url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        response = client.get(url)
        assert response.status_code == 302 and response.url.startswith(reverse("admin:login")), url
