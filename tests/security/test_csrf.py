"""CSRF on every form a logged-in operator submits: admin add/change/delete
and every admin action, the dashboard's unbind form, and the operator API
when it is used with the session (a DRF token needs no CSRF: it is not
sent by the browser on its own)."""

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import ApiKey
from routing.models import SessionBinding
from tests.factories import (
    AccountFactory,
    AccountGroupFactory,
    ApiKeyFactory,
    LatencySampleFactory,
    LeaseFactory,
    ProxyFactory,
    SessionBindingFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_superuser(username="op", password="pw")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.user = user
    return client


def csrf_token(client) -> str:
    client.get(reverse("admin:index"))  # sets the CSRF cookie
    return client.cookies["csrftoken"].value


@pytest.fixture
def pool():
    account = AccountFactory(proxy=ProxyFactory(), credentials={"t": "secret"})
    AccountGroupFactory(accounts=[account])
    LeaseFactory(account=account)
    LatencySampleFactory(account=account)
    return SessionBindingFactory(account=account)


def admin_actions(operator):
    request = operator.get(reverse("admin:index")).wsgi_request
    for model, model_admin in admin.site._registry.items():
        for name in model_admin.get_actions(request):
            yield model, name


def test_every_admin_action_refuses_a_post_without_the_token(operator, pool):
    token = csrf_token(operator)
    checked = 0
    for model, action in admin_actions(operator):
        objects = list(model._default_manager.values_list("pk", flat=True)[:1])
        if not objects:
            continue
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        form = {"action": action, "_selected_action": objects, "index": "0"}
        refused = operator.post(url, form)
        assert refused.status_code == 403, (model, action)
        accepted = operator.post(url, {**form, "csrfmiddlewaretoken": token})
        assert accepted.status_code in (200, 302), (model, action, accepted.status_code)
        checked += 1
    assert checked >= 10


def test_admin_add_change_delete_and_logout_refuse_a_post_without_the_token(operator, pool):
    key = ApiKeyFactory(name="k")
    forms = [
        (reverse("admin:accounts_apikey_add"), {"name": "new", "route_strategy": "auto", "preferred_pool": "balanced"}),
        (reverse("admin:accounts_apikey_change", args=[key.pk]), {"name": "renamed"}),
        (reverse("admin:accounts_apikey_delete", args=[key.pk]), {"post": "yes"}),
        (reverse("admin:logout"), {}),
    ]
    for url, form in forms:
        assert operator.post(url, form).status_code == 403, url
    assert ApiKey.objects.filter(pk=key.pk, name="k").exists()
    assert not ApiKey.objects.filter(name="new").exists()
    assert operator.get(reverse("admin:index")).status_code == 200  # still logged in


def test_the_admin_login_form_needs_the_token(django_user_model):
    django_user_model.objects.create_superuser(username="op", password="pw")
    client = Client(enforce_csrf_checks=True)
    assert client.post(reverse("admin:login"), {"username": "op", "password": "pw"}).status_code == 403
    client.get(reverse("admin:login"))
    token = client.cookies["csrftoken"].value
    response = client.post(reverse("admin:login"), {"username": "op", "password": "pw", "csrfmiddlewaretoken": token})
    assert response.status_code == 302


def test_the_dashboard_unbind_form_needs_the_token(operator, pool):
    url = reverse("dashboard:binding-unbind", args=[pool.pk])
    assert operator.post(url).status_code == 403
    assert SessionBinding.objects.filter(pk=pool.pk).exists()
    assert operator.post(url, {"csrfmiddlewaretoken": csrf_token(operator)}).status_code == 302
    assert not SessionBinding.objects.filter(pk=pool.pk).exists()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/v1/admin/identities/", {"name": "csrf-probe"}),
        ("patch", "/api/v1/admin/accounts/{account}/", {"enabled": False}),
        ("delete", "/api/v1/admin/bindings/{binding}/", None),
        ("post", "/api/v1/admin/latency/refresh/", None),
    ],
)
def test_the_operator_api_with_a_session_needs_the_token(operator, pool, method, path, body):
    path = path.format(account=pool.account.name, binding=pool.pk)
    send = getattr(operator, method)
    refused = send(path, body or {}, content_type="application/json")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert "CSRF" in refused.json()["error"]["message"]
    headers = {"HTTP_X_CSRFTOKEN": csrf_token(operator)}
    accepted = send(path, body or {}, content_type="application/json", **headers)
    assert accepted.status_code in (200, 201, 204), accepted.content


def test_the_operator_api_with_a_token_needs_no_csrf(operator, pool):
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=operator.user).key}")
    assert client.post("/api/v1/admin/identities/", {"name": "by-token"}, format="json").status_code == 201
