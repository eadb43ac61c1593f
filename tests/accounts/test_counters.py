"""Operator edits never write back the dispatcher's state. Identities, accounts,
keys and proxies carry columns the dispatcher writes while operators edit the
same rows (in_flight, binding_rows, last started, cooldowns, quota, credits).
An edit over the operator API or in the admin writes only the columns it
changed, so a value a gateway wrote after the row was read survives.

"Behind its back" is a write another process would make: it lands after the
edit has read the row and before it saves (a ``pre_save`` receiver makes the
interleaving exact, in one process)."""

from __future__ import annotations

import contextlib
import re
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.db import connection
from django.db.models import F
from django.db.models.signals import pre_save
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from accounts.models import Account, ApiKey, Proxy, RoutingIdentity
from accounts.serializers import AccountSerializer, ApiKeySerializer, ProxySerializer, RoutingIdentitySerializer
from tests.factories import AccountFactory, ApiKeyFactory, ProxyFactory, RoutingIdentityFactory

pytestmark = pytest.mark.django_db

BASE = "/api/v1/admin"
SOON = timedelta(minutes=5)


def gateway_state(now):
    """What gateways write to each model while an operator edits it."""
    return {
        RoutingIdentity: {
            "in_flight": F("in_flight") + 3,
            "account_rows": F("account_rows") + 2,  # two aliases created meanwhile
            "last_started_at": now,
            "cooldown_until": now + SOON,
            "cooldown_reason": "429 from upstream",
        },
        Account: {
            "binding_rows": F("binding_rows") + 2,
            "remaining_credits": 12.5,
            "quota_exhausted": True,
            "quota_exhausted_at": now,
            "quota_exhausted_reason": "quota",
        },
        ApiKey: {"last_started_at": now, "last_used_at": now},
        Proxy: {"cooldown_until": now + SOON, "cooldown_reason": "proxy 502"},
    }


def expected_after(model, now) -> dict:
    return {
        RoutingIdentity: {"in_flight": 3, "account_rows": 2, "last_started_at": now, "cooldown_until": now + SOON},
        Account: {"binding_rows": 2, "remaining_credits": 12.5, "quota_exhausted": True},
        ApiKey: {"last_started_at": now, "last_used_at": now},
        Proxy: {"cooldown_until": now + SOON, "cooldown_reason": "proxy 502"},
    }[model]


@contextlib.contextmanager
def behind_its_back(model, pk, updates):
    """Run ``updates`` on the row the moment the edit is about to save it."""

    def write(sender, instance, **kwargs):
        if instance.pk == pk:
            model.objects.filter(pk=pk).update(**updates)

    pre_save.connect(write, sender=model, weak=False)
    try:
        yield
    finally:
        pre_save.disconnect(write, sender=model)


def assert_kept(model, pk, now):
    row = model.objects.get(pk=pk)
    assert {name: getattr(row, name) for name in expected_after(model, now)} == expected_after(model, now)


# (model, factory, serializer, URL of the row, the operator's change, the column it changes)
EDITS = [
    (RoutingIdentity, RoutingIdentityFactory, RoutingIdentitySerializer, "identities/{name}", {"max_concurrency": 7}),
    (Account, AccountFactory, AccountSerializer, "accounts/{name}", {"region": "eu-west-1"}),
    (ApiKey, ApiKeyFactory, ApiKeySerializer, "keys/{pk}", {"min_start_interval_ms": 250}),
    (Proxy, ProxyFactory, ProxySerializer, "proxies/{name}", {"name": "renamed-proxy"}),
]
IDS = [edit[0].__name__ for edit in EDITS]


@pytest.mark.parametrize(("model", "factory", "serializer", "path", "change"), EDITS, ids=IDS)
def test_a_serializer_save_on_a_stale_instance_keeps_the_counters(model, factory, serializer, path, change):
    now = timezone.now()
    row = factory()
    stale = model.objects.get(pk=row.pk)
    model.objects.filter(pk=row.pk).update(**gateway_state(now)[model])
    edit = serializer(stale, data=change, partial=True)
    assert edit.is_valid(), edit.errors
    edit.save()
    assert_kept(model, row.pk, now)
    saved = model.objects.get(pk=row.pk)
    assert {name: getattr(saved, name) for name in change} == change


@pytest.mark.parametrize("method", ["patch", "put"])
@pytest.mark.parametrize(("model", "factory", "serializer", "path", "change"), EDITS, ids=IDS)
def test_an_operator_api_edit_keeps_what_gateways_wrote_meanwhile(
    operator_api, model, factory, serializer, path, change, method
):
    now = timezone.now()
    row = factory()
    body = change
    if method == "put":  # the whole object as the operator read it, with the change
        body = {**operator_api.get(f"{BASE}/{path.format(name=row.name, pk=row.pk)}/").json(), **change}
        body = {k: v for k, v in body.items() if v is not None}  # nulls for unset references
    url = f"{BASE}/{path.format(name=row.name, pk=row.pk)}/"
    with behind_its_back(model, row.pk, gateway_state(now)[model]):
        response = getattr(operator_api, method)(url, body, format="json")
    assert response.status_code == 200, response.content
    assert_kept(model, row.pk, now)
    saved = model.objects.get(pk=row.pk)
    assert {name: getattr(saved, name) for name in change} == change


def test_an_edit_that_changes_nothing_writes_nothing(operator_api):
    RoutingIdentityFactory(name="same", max_concurrency=2)
    with CaptureQueriesContext(connection) as queries:
        response = operator_api.patch(f"{BASE}/identities/same/", {"max_concurrency": 2}, format="json")
    assert response.status_code == 200
    assert not [q for q in queries if q["sql"].lstrip().upper().startswith("UPDATE")]


def test_new_credentials_are_written_without_touching_the_counters(operator_api):
    now = timezone.now()
    account = AccountFactory(name="rotating", credentials={"refresh_token": "old"})
    with behind_its_back(Account, account.pk, gateway_state(now)[Account]):
        response = operator_api.patch(
            f"{BASE}/accounts/rotating/", {"credentials": {"refresh_token": "new"}}, format="json"
        )
    assert response.status_code == 200
    assert_kept(Account, account.pk, now)
    assert Account.objects.get(pk=account.pk).credentials == {"refresh_token": "new"}


# --- the admin ----------------------------------------------------------------------------------


class FormFields(HTMLParser):
    """The fields a browser would submit from the admin's change form."""

    def __init__(self):
        super().__init__()
        self.data: dict[str, object] = {}
        self._select: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        name = attrs.get("name")
        if tag == "input" and name and attrs.get("type") not in ("submit", "button"):
            if attrs.get("type") == "checkbox":
                if "checked" in attrs:
                    self.data[name] = attrs.get("value", "on")
            else:
                self.data[name] = attrs.get("value", "")
        elif tag == "select" and name:
            self._select = name
            self.data.setdefault(name, "")
        elif tag == "option" and self._select and "selected" in attrs:
            self.data[self._select] = attrs.get("value", "")
        elif tag == "textarea" and name:
            self._textarea = name
            self.data[name] = ""

    def handle_data(self, data):
        if self._textarea:
            self.data[self._textarea] += data

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            # As a browser does, drop the one newline that follows <textarea>.
            self.data[self._textarea] = self.data[self._textarea].removeprefix("\n")
            self._textarea = None


def change_form(client, url: str) -> dict:
    page = client.get(url)
    assert page.status_code == 200
    form = re.search(r'<form [^>]*id="\w+_form".*?</form>', page.content.decode(), re.S).group(0)
    parser = FormFields()
    parser.feed(form)
    parser.data.pop("csrfmiddlewaretoken", None)
    parser.data["model_preferences"] = parser.data.get("model_preferences", "").strip()
    return parser.data


ADMIN_EDITS = [
    (RoutingIdentity, RoutingIdentityFactory, "routingidentity", {"max_concurrency": "7"}),
    (Account, AccountFactory, "account", {"region": "eu-west-1"}),
    (ApiKey, ApiKeyFactory, "apikey", {"min_start_interval_ms": "250"}),
    (Proxy, ProxyFactory, "proxy", {"name": "renamed-proxy"}),
]


@pytest.mark.parametrize(("model", "factory", "admin_name", "change"), ADMIN_EDITS, ids=IDS)
def test_an_admin_save_keeps_what_gateways_wrote_meanwhile(staff_client, model, factory, admin_name, change):
    now = timezone.now()
    row = factory()
    url = reverse(f"admin:accounts_{admin_name}_change", args=[row.pk])
    form = change_form(staff_client, url)
    with behind_its_back(model, row.pk, gateway_state(now)[model]):
        response = staff_client.post(url, {**form, **change})
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert_kept(model, row.pk, now)
    saved = model.objects.get(pk=row.pk)
    assert {name: str(getattr(saved, name)) for name in change} == change


# A key's dispatcher-written columns are not on its form at all: nothing to carry over.
@pytest.mark.parametrize(
    ("model", "factory", "admin_name", "change"),
    [edit for edit in ADMIN_EDITS if edit[0] is not ApiKey],
    ids=[name for name in IDS if name != "ApiKey"],
)
def test_an_admin_form_opened_before_a_gateway_wrote_does_not_undo_it(staff_client, model, factory, admin_name, change):
    """The page shows the old cooldown, quota or credits; a gateway changes
    them; the operator saves an unrelated field. The gateway's values stay."""
    now = timezone.now()
    row = factory()
    url = reverse(f"admin:accounts_{admin_name}_change", args=[row.pk])
    form = change_form(staff_client, url)
    model.objects.filter(pk=row.pk).update(**gateway_state(now)[model])
    response = staff_client.post(url, {**form, **change})
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert_kept(model, row.pk, now)


def test_an_admin_form_still_writes_what_the_operator_did_change(staff_client):
    now = timezone.now()
    account = AccountFactory(remaining_credits=100.0)
    url = reverse("admin:accounts_account_change", args=[account.pk])
    form = change_form(staff_client, url)
    Account.objects.filter(pk=account.pk).update(remaining_credits=50.0, binding_rows=F("binding_rows") + 1)
    response = staff_client.post(url, {**form, "remaining_credits": "500"})
    assert response.status_code == 302
    account.refresh_from_db()
    assert (account.remaining_credits, account.binding_rows) == (500.0, 1)

    identity = account.identity
    url = reverse("admin:accounts_routingidentity_change", args=[identity.pk])
    form = change_form(staff_client, url)
    later = (now + timedelta(hours=1)).astimezone(timezone.get_current_timezone())
    response = staff_client.post(
        url,
        {**form, "cooldown_until_0": later.strftime("%Y-%m-%d"), "cooldown_until_1": later.strftime("%H:%M:%S")},
    )
    assert response.status_code == 302
    identity.refresh_from_db()
    assert identity.cooldown_until == later.replace(microsecond=0)
