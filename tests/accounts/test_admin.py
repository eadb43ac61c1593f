from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts.models import Account, ApiKey, Proxy, RoutingIdentity
from routing.models import CooldownEvent, SessionBinding
from tests.accounts.test_counters import change_form
from tests.factories import (
    AccountFactory,
    AccountGroupFactory,
    ApiKeyFactory,
    LatencySampleFactory,
    LeaseFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
)
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db

SECRET = "secret-refresh-token"


@pytest.fixture
def pool():
    proxy = ProxyFactory()
    account = AccountFactory(proxy=proxy, credentials={"refresh_token": SECRET})
    AccountGroupFactory(accounts=[account])
    ApiKeyFactory()
    SessionBindingFactory(account=account)
    LeaseFactory(account=account)
    LatencySampleFactory(account=account)
    return account


@pytest.mark.parametrize(
    "model",
    [
        "accounts.routingidentity",
        "accounts.account",
        "accounts.proxy",
        "accounts.accountgroup",
        "accounts.apikey",
        "routing.sessionbinding",
        "routing.lease",
        "routing.latencysample",
        "routing.latencysnapshot",
        "routing.cooldownevent",
    ],
)
def test_every_list_page_renders_without_secrets(staff_client, pool, model):
    app, name = model.split(".")
    response = staff_client.get(reverse(f"admin:{app}_{name}_changelist"), {"q": "a"})
    assert response.status_code == 200
    assert SECRET not in response.content.decode()


def test_account_change_page_never_shows_credentials_and_keeps_them(staff_client, pool):
    url = reverse("admin:accounts_account_change", args=[pool.pk])
    page = staff_client.get(url)
    assert page.status_code == 200
    assert SECRET not in page.content.decode()
    form = {
        "name": pool.name,
        "identity": pool.identity.pk,
        "proxy": pool.proxy.pk,
        "pool": "credit_first",
        "enabled": "on",
        "region": "us-east-1",
        "profile_arn": "",
        "min_remaining_credits": "0",
        "quota_exhausted_reason": "",
        "new_credentials": "",
    }
    assert staff_client.post(url, form).status_code == 302
    pool.refresh_from_db()
    assert pool.pool == "credit_first"
    assert pool.credentials == {"refresh_token": SECRET}
    assert staff_client.post(url, {**form, "new_credentials": '{"refresh_token": "rotated"}'}).status_code == 302
    pool.refresh_from_db()
    assert pool.credentials == {"refresh_token": "rotated"}
    bad = staff_client.post(url, {**form, "new_credentials": "[1, 2]"})
    assert bad.status_code == 200 and "must be a JSON object" in bad.content.decode()


def run_action(client, model, action, objects):
    app, name = model.split(".")
    return client.post(
        reverse(f"admin:{app}_{name}_changelist"),
        {"action": action, "_selected_action": [o.pk for o in objects]},
        follow=True,
    )


def test_enable_disable_accounts_and_keys(staff_client):
    accounts = AccountFactory.create_batch(2)
    keys = ApiKeyFactory.create_batch(2)
    run_action(staff_client, "accounts.account", "disable", accounts)
    run_action(staff_client, "accounts.apikey", "disable", keys)
    assert not Account.objects.filter(enabled=True).exists()
    assert not ApiKey.objects.filter(enabled=True).exists()
    run_action(staff_client, "accounts.account", "enable", accounts[:1])
    run_action(staff_client, "accounts.apikey", "enable", keys[:1])
    assert list(Account.objects.filter(enabled=True)) == accounts[:1]
    assert list(ApiKey.objects.filter(enabled=True)) == keys[:1]


def test_reset_quota(staff_client):
    exhausted = AccountFactory(quota_exhausted=True, quota_exhausted_at=timezone.now(), quota_exhausted_reason="out")
    response = run_action(staff_client, "accounts.account", "reset_quota", [exhausted])
    assert "Reset the quota of 1 accounts" in response.content.decode()
    exhausted.refresh_from_db()
    assert not exhausted.quota_exhausted and exhausted.quota_exhausted_at is None
    assert CooldownEvent.objects.filter(kind="quota_reset", account=exhausted).count() == 1


def test_reset_quota_brings_back_an_account_whose_balance_ran_out(staff_client):
    """Out of selection for an empty balance, not an exhausted quota: the
    operator's reset forgets the balance and the probe's wait, and the
    account is handed out again. One with a balance left is untouched."""
    empty = AccountFactory(name="empty", remaining_credits=0, quota_next_probe_at=timezone.now() + timedelta(hours=1))
    fine = AccountFactory(name="fine", remaining_credits=40)
    response = run_action(staff_client, "accounts.account", "reset_quota", [empty, fine])
    assert "Reset the quota of 1 accounts" in response.content.decode()
    empty.refresh_from_db()
    assert (empty.remaining_credits, empty.quota_next_probe_at) == (None, None)
    assert Account.objects.get(name="fine").remaining_credits == 40
    gateway = Gateway(ApiKeyFactory().plaintext)
    assert {gateway.cycle() for _ in range(4)} == {"empty", "fine"}


def test_the_account_form_shows_the_quota_state_and_leaves_it_to_the_reset_action(staff_client):
    """As over the operator API, the quota state is read-only on the form:
    unticking "quota exhausted" put the account back without the reset's
    event and left its exhaustion and probe times, and ticking it took one
    out with neither. Such a post now changes nothing of it."""
    now = timezone.now()
    probe = now + timedelta(minutes=5)
    exhausted = AccountFactory(
        quota_exhausted=True,
        quota_exhausted_at=now,
        quota_exhausted_reason="monthly credits spent",
        quota_next_probe_at=probe,
    )
    fresh = AccountFactory()
    edits = [
        (exhausted, {"quota_exhausted_reason": ""}),
        (fresh, {"quota_exhausted": "on", "quota_exhausted_reason": "typed"}),
    ]
    for account, change in edits:
        url = reverse("admin:accounts_account_change", args=[account.pk])
        form = change_form(staff_client, url)
        form.pop("quota_exhausted", None)  # unticked
        response = staff_client.post(url, {**form, **change})
        assert response.status_code == 302, response.context["adminform"].form.errors
    exhausted.refresh_from_db()
    state = ("quota_exhausted", "quota_exhausted_at", "quota_exhausted_reason", "quota_next_probe_at")
    assert [getattr(exhausted, name) for name in state] == [True, now, "monthly credits spent", probe]
    fresh.refresh_from_db()
    assert (fresh.quota_exhausted, fresh.quota_exhausted_reason) == (False, "")
    assert not CooldownEvent.objects.exists()
    page = staff_client.get(reverse("admin:accounts_account_change", args=[exhausted.pk])).content.decode()
    assert "monthly credits spent" in page  # shown, not editable
    run_action(staff_client, "accounts.account", "reset_quota", [exhausted])  # the way back, with its event
    exhausted.refresh_from_db()
    assert [getattr(exhausted, name) for name in state] == [False, None, "", None]
    assert CooldownEvent.objects.filter(kind="quota_reset", account=exhausted).count() == 1


def test_clear_identity_and_proxy_cooldowns(staff_client):
    later = timezone.now() + timedelta(minutes=5)
    identity = RoutingIdentityFactory(cooldown_until=later, cooldown_reason="429")
    proxy = ProxyFactory(cooldown_until=later, cooldown_reason="proxy 502")
    for model, reason, plural in (("routingidentity", "429", "routing identities"), ("proxy", "proxy 502", "proxies")):
        page = staff_client.get(f"/admin/accounts/{model}/").content.decode()
        assert f"({reason})" in page  # the cooldown column: seconds left and the reason
        assert f"Clear cooldown of selected {plural}" in page
    response = run_action(staff_client, "accounts.routingidentity", "clear_cooldown", [identity])
    assert "Cleared the cooldown of 1 routing identities." in response.content.decode()
    response = run_action(staff_client, "accounts.proxy", "clear_cooldown", [proxy])
    assert "Cleared the cooldown of 1 proxies." in response.content.decode()
    assert RoutingIdentity.objects.get(pk=identity.pk).cooldown_until is None
    assert Proxy.objects.get(pk=proxy.pk).cooldown_until is None


def test_unbind_sessions(staff_client):
    account = AccountFactory()
    doomed, kept = SessionBindingFactory(account=account), SessionBindingFactory(account=account)
    run_action(staff_client, "routing.sessionbinding", "unbind", [doomed])
    assert list(SessionBinding.objects.all()) == [kept]
    assert Account.objects.get(pk=account.pk).binding_rows == 1


def test_admin_requires_staff(client, django_user_model):
    assert client.get(reverse("admin:accounts_account_changelist")).status_code == 302
    user = django_user_model.objects.create_user(username="plain", password="pw")
    client.force_login(user)
    assert client.get(reverse("admin:accounts_account_changelist")).status_code == 302
