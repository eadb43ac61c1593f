"""An operator's edit of what the dispatcher also writes (a cooldown, a
balance) does what the gateway path does on the same change: a cooldown set
or cleared goes into the history the account dashboard shows, and a balance
at or below the minimum gets its probe time. In the admin and over the
operator API alike."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts import services
from accounts.models import Account, RoutingIdentity
from routing.models import CooldownEvent, CooldownKind, Lease
from tests.accounts.test_counters import change_form
from tests.factories import AccountFactory, ApiKeyFactory, ProxyFactory, RoutingIdentityFactory
from tests.routing.gateway import Gateway
from tests.support import run_queued_behind

pytestmark = pytest.mark.django_db

BASE = "/api/v1/admin"

# (operator API resource, admin model name, factory, the account's reference, the events' kinds)
COOLED = [
    pytest.param(
        "identities",
        "routingidentity",
        RoutingIdentityFactory,
        "identity",
        (CooldownKind.IDENTITY_COOLDOWN, CooldownKind.IDENTITY_CLEARED),
        id="identity",
    ),
    pytest.param(
        "proxies",
        "proxy",
        ProxyFactory,
        "proxy",
        (CooldownKind.PROXY_COOLDOWN, CooldownKind.PROXY_CLEARED),
        id="proxy",
    ),
]


def history(staff_client, account) -> list[tuple[str, str]]:
    """The account dashboard's cooldown history, newest first: (kind, reason)."""
    page = staff_client.get(reverse("dashboard:account", args=[account.name]))
    assert page.status_code == 200
    return [(e["kind"], e["reason"]) for e in page.context["events"]]


def labels(kinds) -> tuple[str, str]:
    return tuple(CooldownKind(kind).label for kind in kinds)


@pytest.mark.parametrize(("resource", "admin_name", "factory", "reference", "kinds"), COOLED)
def test_a_cooldown_set_and_cleared_over_the_api_is_in_the_history(
    operator_api, staff_client, resource, admin_name, factory, reference, kinds
):
    row = factory(name="row")
    account = AccountFactory(**{reference: row})
    url = f"{BASE}/{resource}/row/"
    assert operator_api.patch(url, {"name": "row"}, format="json").status_code == 200  # no cooldown: no event
    later = timezone.now() + timedelta(minutes=10)
    body = {"cooldown_until": later.isoformat(), "cooldown_reason": "upstream maintenance"}
    assert operator_api.patch(url, body, format="json").status_code == 200
    (event,) = CooldownEvent.objects.all()
    assert (event.kind, event.until, getattr(event, f"{reference}_id")) == (kinds[0], later, row.pk)
    assert operator_api.patch(url, {"cooldown_until": None}, format="json").status_code == 200
    cooled, cleared = labels(kinds)
    assert history(staff_client, account) == [
        (cleared, "cleared by operator"),
        (cooled, "set by operator: upstream maintenance"),
    ]


@pytest.mark.parametrize(("resource", "admin_name", "factory", "reference", "kinds"), COOLED)
def test_a_cooldown_set_and_cleared_in_the_admin_is_in_the_history(
    staff_client, resource, admin_name, factory, reference, kinds
):
    row = factory()
    account = AccountFactory(**{reference: row})
    url = reverse(f"admin:accounts_{admin_name}_change", args=[row.pk])
    later = (timezone.now() + timedelta(minutes=10)).astimezone(timezone.get_current_timezone())
    cooldown = {
        "cooldown_until_0": later.strftime("%Y-%m-%d"),
        "cooldown_until_1": later.strftime("%H:%M:%S"),
        "cooldown_reason": "",
    }
    response = staff_client.post(url, {**change_form(staff_client, url), **cooldown})
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert [e.until for e in CooldownEvent.objects.all()] == [later.replace(microsecond=0)]
    cleared = {"cooldown_until_0": "", "cooldown_until_1": ""}
    assert staff_client.post(url, {**change_form(staff_client, url), **cleared}).status_code == 302
    cooled, cleared = labels(kinds)
    assert history(staff_client, account) == [(cleared, "cleared by operator"), (cooled, "set by operator")]


def test_an_identity_created_cooling_down_is_in_the_history(operator_api):
    later = timezone.now() + timedelta(minutes=10)
    body = {"name": "benched", "cooldown_until": later.isoformat(), "cooldown_reason": "stolen token"}
    assert operator_api.post(f"{BASE}/identities/", body, format="json").status_code == 201
    assert operator_api.post(f"{BASE}/identities/", {"name": "fine"}, format="json").status_code == 201
    event = CooldownEvent.objects.get()
    assert (event.kind, event.identity.name, event.reason) == (
        CooldownKind.IDENTITY_COOLDOWN,
        "benched",
        "set by operator: stolen token",
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_an_edit_queued_behind_a_gateways_cooldown_records_that_it_ended_it():
    """The operator's edit read the identity not cooling and writes a
    cooldown end in the past; meanwhile a gateway's rate limit has cooled
    it and not committed. The edit waits for the row and ends that
    cooldown: the history says so, read as the row was when the edit got
    it, or the dashboard would show the gateway's cooldown as running."""
    identity = RoutingIdentityFactory()
    edit = RoutingIdentity.objects.get(pk=identity.pk)
    edit.cooldown_until = timezone.now() - timedelta(minutes=1)

    def rate_limit(cursor) -> None:  # committed while the edit waits for the row
        cursor.execute(
            "UPDATE accounts_routingidentity SET cooldown_until = now() + interval '5 minutes',"
            " cooldown_reason = '429' WHERE id = %s",
            [identity.pk],
        )

    run_queued_behind(rate_limit, lambda: services.cooldown_edit_save(row=edit, columns=["cooldown_until"]))
    event = CooldownEvent.objects.get()
    assert (event.kind, event.identity_id, event.reason) == (
        CooldownKind.IDENTITY_CLEARED,
        identity.pk,
        "cleared by operator",
    )


# --- a balance set at or below the minimum ------------------------------------------------------

SPENT = [
    pytest.param({"remaining_credits": 0}, id="balance-set-empty"),
    pytest.param({"min_remaining_credits": 50}, id="minimum-raised-above-it"),
]


def assert_probed_like_a_reported_balance(gateway: Gateway) -> None:
    """Out of selection, with a probe time; when it comes, one probe lease
    goes through, as after a completion reporting the same balance."""
    assert gateway.dispatch(max_wait_ms=0).status_code == 503
    account = Account.objects.get()
    assert account.quota_next_probe_at > timezone.now() + timedelta(minutes=9)
    Account.objects.update(quota_next_probe_at=timezone.now() - timedelta(seconds=1))
    probe = gateway.dispatch(max_wait_ms=0)
    assert probe.status_code == 200
    assert Lease.objects.get(pk=probe.json()["lease_id"]).quota_probe


@pytest.mark.parametrize("change", SPENT)
def test_a_balance_set_at_or_below_the_minimum_over_the_api_gets_a_probe(operator_api, settings, change):
    settings.KIROPOOL_QUOTA_PROBE_SECONDS = 600
    AccountFactory(name="only", remaining_credits=20)
    gateway = Gateway(ApiKeyFactory().plaintext)
    assert operator_api.patch(f"{BASE}/accounts/only/", change, format="json").status_code == 200
    assert_probed_like_a_reported_balance(gateway)


@pytest.mark.parametrize("change", SPENT)
def test_a_balance_set_at_or_below_the_minimum_in_the_admin_gets_a_probe(staff_client, settings, change):
    settings.KIROPOOL_QUOTA_PROBE_SECONDS = 600
    account = AccountFactory(remaining_credits=20)
    gateway = Gateway(ApiKeyFactory().plaintext)
    url = reverse("admin:accounts_account_change", args=[account.pk])
    response = staff_client.post(url, {**change_form(staff_client, url), **{k: str(v) for k, v in change.items()}})
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert_probed_like_a_reported_balance(gateway)


def test_an_account_created_without_credits_gets_a_probe(operator_api, settings):
    settings.KIROPOOL_QUOTA_PROBE_SECONDS = 600
    RoutingIdentityFactory(name="kiro")
    gateway = Gateway(ApiKeyFactory().plaintext)
    body = {"name": "drained", "identity": "kiro", "remaining_credits": 0}
    assert operator_api.post(f"{BASE}/accounts/", body, format="json").status_code == 201
    assert_probed_like_a_reported_balance(gateway)


def test_a_probe_to_come_is_kept_and_a_balance_above_the_minimum_sets_none(operator_api):
    soon = timezone.now() + timedelta(minutes=3)
    AccountFactory(name="empty", remaining_credits=0, quota_next_probe_at=soon)
    AccountFactory(name="fine", remaining_credits=5)
    assert operator_api.patch(f"{BASE}/accounts/empty/", {"remaining_credits": -1}, format="json").status_code == 200
    assert operator_api.patch(f"{BASE}/accounts/fine/", {"remaining_credits": 9}, format="json").status_code == 200
    assert dict(Account.objects.values_list("name", "quota_next_probe_at")) == {"empty": soon, "fine": None}
