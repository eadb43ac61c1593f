"""The operator API for the pool: /api/v1/admin/{identities,accounts,proxies,groups,keys}/."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connection
from django.db.models.signals import pre_save
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.authentication import api_key_authenticate
from accounts.models import Account, AccountGroup, ApiKey, Proxy, RoutingIdentity
from routing.models import CooldownEvent, CooldownKind
from tests.factories import (
    AccountFactory,
    AccountGroupFactory,
    ApiKeyFactory,
    LeaseFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
)

pytestmark = pytest.mark.django_db

BASE = "/api/v1/admin"
SECRET = "secret-refresh-token"


def assert_error(response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == error_type
    assert body["error"]["message"]
    return body["error"]["message"]


# --- who may call it ---------------------------------------------------------------

ENDPOINTS = [
    ("get", "/identities/"),
    ("post", "/identities/"),
    ("get", "/identities/identity-x/"),
    ("patch", "/identities/identity-x/"),
    ("delete", "/identities/identity-x/"),
    ("post", "/identities/identity-x/clear-cooldown/"),
    ("get", "/accounts/"),
    ("post", "/accounts/"),
    ("get", "/accounts/account-x/"),
    ("put", "/accounts/account-x/"),
    ("delete", "/accounts/account-x/"),
    ("post", "/accounts/account-x/reset-quota/"),
    ("get", "/proxies/"),
    ("post", "/proxies/proxy-x/clear-cooldown/"),
    ("get", "/groups/"),
    ("delete", "/groups/group-x/"),
    ("get", "/keys/"),
    ("post", "/keys/"),
    ("delete", "/keys/1/"),
]


@pytest.fixture
def gateway_client():
    key = ApiKeyFactory()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key.plaintext}")
    return client


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_anonymous_callers_get_401(method, path):
    response = getattr(APIClient(), method)(BASE + path, {}, format="json")
    assert_error(response, 401, "authentication_error")
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_gateway_api_key_is_not_an_operator(gateway_client, method, path):
    response = getattr(gateway_client, method)(BASE + path, {}, format="json")
    assert_error(response, 401, "authentication_error")


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_gateway_key_in_x_api_key_is_not_an_operator(method, path):
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=ApiKeyFactory().plaintext)
    response = getattr(client, method)(BASE + path, {}, format="json")
    assert_error(response, 401, "authentication_error")


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_non_staff_users_get_403_by_session_and_by_token(django_user_model, method, path):
    user = django_user_model.objects.create_user(username="viewer", password="pw")
    by_session = APIClient()
    by_session.force_login(user)
    by_token = APIClient()
    by_token.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    for client in (by_session, by_token):
        response = getattr(client, method)(BASE + path, {}, format="json")
        assert_error(response, 403, "permission_error")


def test_a_bad_token_is_401():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    assert_error(client.get(f"{BASE}/accounts/"), 401, "authentication_error")


def test_staff_session_works(staff_client):
    RoutingIdentityFactory(name="alpha")
    response = staff_client.get(f"{BASE}/identities/")
    assert response.status_code == 200
    assert [row["name"] for row in response.json()] == ["alpha"]


def test_drf_create_token_gives_a_working_operator_token(django_user_model, capsys):
    user = django_user_model.objects.create_user(username="ci", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_apikey"))
    call_command("drf_create_token", "ci")
    token = Token.objects.get(user__username="ci").key
    assert token in capsys.readouterr().out
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get(f"{BASE}/keys/").status_code == 200


def test_session_writes_need_the_csrf_token(django_user_model):
    user = django_user_model.objects.create_superuser(username="boss", password="pw")
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(f"{BASE}/identities/", {"name": "csrf"}, format="json")
    assert "CSRF" in assert_error(response, 403, "permission_error")
    assert not RoutingIdentity.objects.filter(name="csrf").exists()


# --- routing identities -----------------------------------------------------------------


def test_identity_crud(operator_api):
    created = operator_api.post(
        f"{BASE}/identities/",
        {"name": "kiro-user-1", "max_concurrency": 3, "min_start_interval_ms": 250},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["name"] == "kiro-user-1"
    assert (body["max_concurrency"], body["min_start_interval_ms"]) == (3, 250)
    assert (body["in_flight"], body["live_sessions"], body["cooldown_remaining_s"]) == (0, 0, 0)

    patched = operator_api.patch(f"{BASE}/identities/kiro-user-1/", {"max_concurrency": 5}, format="json")
    assert patched.status_code == 200
    assert patched.json()["max_concurrency"] == 5
    assert RoutingIdentity.objects.get(name="kiro-user-1").max_concurrency == 5

    renamed = operator_api.put(f"{BASE}/identities/kiro-user-1/", {"name": "kiro-user-one"}, format="json")
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "kiro-user-one"

    assert operator_api.get(f"{BASE}/identities/kiro-user-one/").json()["name"] == "kiro-user-one"
    assert operator_api.delete(f"{BASE}/identities/kiro-user-one/").status_code == 204
    assert_error(operator_api.get(f"{BASE}/identities/kiro-user-one/"), 404, "not_found_error")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "x", "max_concurrency": 0}, "max_concurrency"),
        ({"name": "x", "min_start_interval_ms": -1}, "min_start_interval_ms"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({}, "name"),
        ({"name": "x", "cooldown_until": "tomorrow"}, "cooldown_until"),
    ],
)
def test_identity_writes_are_validated(operator_api, payload, field):
    message = assert_error(
        operator_api.post(f"{BASE}/identities/", payload, format="json"), 400, "invalid_request_error"
    )
    assert field in message
    assert not RoutingIdentity.objects.exists()


def test_duplicate_names_are_409(operator_api):
    RoutingIdentityFactory(name="taken")
    response = operator_api.post(f"{BASE}/identities/", {"name": "taken"}, format="json")
    assert "name" in assert_error(response, 409, "conflict_error")
    RoutingIdentityFactory(name="other")
    renamed = operator_api.patch(f"{BASE}/identities/other/", {"name": "taken"}, format="json")
    assert "name" in assert_error(renamed, 409, "conflict_error")
    assert RoutingIdentity.objects.filter(name="other").exists()


def test_a_malformed_field_with_a_taken_name_is_400(operator_api):
    RoutingIdentityFactory(name="taken")
    response = operator_api.post(f"{BASE}/identities/", {"name": "taken", "max_concurrency": "2"}, format="json")
    assert "max_concurrency" in assert_error(response, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("resource", "body"),
    [
        ("identities", {"name": "raced"}),
        ("proxies", {"name": "raced", "url": "http://raced:1"}),
        ("groups", {"name": "raced"}),
        ("keys", {"name": "raced"}),
    ],
)
def test_losing_a_name_race_is_409_too(operator_api, resource, body):
    """Another writer takes the name after the uniqueness check passed and
    before the insert: the database refuses it, and that is a 409 as well."""
    model = {"identities": RoutingIdentity, "proxies": Proxy, "groups": AccountGroup, "keys": ApiKey}[resource]

    def take_the_name(sender, instance, **kwargs):
        if instance.pk is None:
            pre_save.disconnect(take_the_name, sender=model)
            factory = {RoutingIdentity: RoutingIdentityFactory, Proxy: ProxyFactory}.get(model)
            extra = {"url": "http://other:1"} if model is Proxy else {}
            (factory or {AccountGroup: AccountGroupFactory, ApiKey: ApiKeyFactory}[model])(name="raced", **extra)

    pre_save.connect(take_the_name, sender=model, weak=False)
    try:
        response = operator_api.post(f"{BASE}/{resource}/", body, format="json")
    finally:
        pre_save.disconnect(take_the_name, sender=model)
    # (The other writer's row shares this test's transaction, so the refused
    # write's rollback takes it too: only the answer is checked here.)
    assert "conflicts with an existing" in assert_error(response, 409, "conflict_error")


def test_malformed_json_is_400(operator_api):
    response = operator_api.generic("POST", f"{BASE}/identities/", "{not json", content_type="application/json")
    assert_error(response, 400, "invalid_request_error")


def test_identity_reads_count_live_sessions_and_leases_only(operator_api):
    identity = RoutingIdentityFactory(name="busy")
    first, second = AccountFactory(identity=identity), AccountFactory(identity=identity)
    past = timezone.now() - timedelta(seconds=1)
    SessionBindingFactory(account=first)
    SessionBindingFactory(account=second)
    SessionBindingFactory(account=second, expires_at=past, updated_at=past - timedelta(hours=1))
    LeaseFactory(account=first)
    LeaseFactory(account=second, expires_at=past)  # past its TTL, not reaped yet
    LeaseFactory(account=second, completed_at=timezone.now(), outcome="success")
    row = operator_api.get(f"{BASE}/identities/busy/").json()
    assert (row["live_sessions"], row["in_flight"]) == (2, 1)


def test_identity_with_accounts_cannot_be_deleted(operator_api):
    identity = RoutingIdentityFactory(name="owner")
    AccountFactory(identity=identity, name="alias-b")
    AccountFactory(identity=identity, name="alias-a")
    message = assert_error(operator_api.delete(f"{BASE}/identities/owner/"), 409, "conflict_error")
    assert "alias-a" in message and "alias-b" in message
    assert RoutingIdentity.objects.filter(name="owner").exists()


def test_clear_identity_cooldown(operator_api):
    RoutingIdentityFactory(name="cool", cooldown_until=timezone.now() + timedelta(seconds=90), cooldown_reason="429")
    before = operator_api.get(f"{BASE}/identities/cool/").json()
    assert 89 <= before["cooldown_remaining_s"] <= 90
    response = operator_api.post(f"{BASE}/identities/cool/clear-cooldown/")
    assert response.status_code == 200
    assert response.json()["cooldown_remaining_s"] == 0
    assert response.json()["cooldown_until"] is None
    assert CooldownEvent.objects.filter(kind=CooldownKind.IDENTITY_CLEARED, identity__name="cool").count() == 1
    assert_error(operator_api.post(f"{BASE}/identities/nobody/clear-cooldown/"), 404, "not_found_error")


# --- accounts -------------------------------------------------------------------------------


def test_account_create_by_names_and_credentials_are_write_only(operator_api):
    RoutingIdentityFactory(name="user-1")
    ProxyFactory(name="egress-1", url="http://egress-1:3128")
    response = operator_api.post(
        f"{BASE}/accounts/",
        {
            "name": "acct-1",
            "identity": "user-1",
            "proxy": "egress-1",
            "pool": "credit_first",
            "remaining_credits": 120.5,
            "region": "us-east-1",
            "profile_arn": "arn:aws:codewhisperer:us-east-1:1:profile/x",
            "credentials": {"refresh_token": SECRET},
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert "credentials" not in body and SECRET not in response.content.decode()
    assert body["has_credentials"] is True
    assert (body["identity"], body["proxy"], body["pool"]) == ("user-1", "egress-1", "credit_first")
    assert Account.objects.get(name="acct-1").credentials == {"refresh_token": SECRET}

    listed, single = operator_api.get(f"{BASE}/accounts/"), operator_api.get(f"{BASE}/accounts/acct-1/")
    for read in (listed, single):
        assert read.status_code == 200
        assert SECRET not in read.content.decode()
    assert "credentials" not in listed.json()[0] and "credentials" not in single.json()


def test_account_patch_keeps_or_replaces_credentials(operator_api):
    AccountFactory(name="acct", credentials={"refresh_token": SECRET})
    assert operator_api.patch(f"{BASE}/accounts/acct/", {"enabled": False}, format="json").status_code == 200
    account = Account.objects.get(name="acct")
    assert (account.enabled, account.credentials) == (False, {"refresh_token": SECRET})
    response = operator_api.patch(f"{BASE}/accounts/acct/", {"credentials": {"refresh_token": "new"}}, format="json")
    assert response.status_code == 200
    assert "new" not in response.content.decode()
    assert Account.objects.get(name="acct").credentials == {"refresh_token": "new"}


def test_account_proxy_can_be_unset(operator_api):
    AccountFactory(name="acct", proxy=ProxyFactory())
    response = operator_api.patch(f"{BASE}/accounts/acct/", {"proxy": None}, format="json")
    assert response.status_code == 200
    assert response.json()["proxy"] is None
    assert Account.objects.get(name="acct").proxy is None


def test_naming_an_object_that_does_not_exist_is_422(operator_api):
    """Well-formed (the schema allows any name), but there is no such object."""
    RoutingIdentityFactory(name="user-1")
    for change, field in [({"identity": "nobody"}, "identity"), ({"proxy": "nowhere"}, "proxy")]:
        payload = {"name": "acct-1", "identity": "user-1", **change}
        response = operator_api.post(f"{BASE}/accounts/", payload, format="json")
        assert f"{field}: no " in assert_error(response, 422, "invalid_request_error")
    assert not Account.objects.exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"identity": ""}, "identity"),
        ({"identity": None}, "identity"),
        ({"identity": 7}, "identity"),
        ({"proxy": ["p"]}, "proxy"),
        ({"pool": "cheapest"}, "pool"),
        ({"credentials": ["not", "an", "object"]}, "credentials"),
        ({"credentials": "token"}, "credentials"),
        ({"remaining_credits": "lots"}, "remaining_credits"),
        ({"enabled": "maybe"}, "enabled"),
        ({"enabled": "true"}, "enabled"),
        ({"enabled": 1}, "enabled"),
        ({"remaining_credits": "12.5"}, "remaining_credits"),
        ({"region": 1}, "region"),
        ({"name": 12}, "name"),
    ],
)
def test_account_writes_are_validated(operator_api, change, field):
    RoutingIdentityFactory(name="user-1")
    payload = {"name": "acct-1", "identity": "user-1", **change}
    message = assert_error(operator_api.post(f"{BASE}/accounts/", payload, format="json"), 400, "invalid_request_error")
    assert field in message
    assert not Account.objects.exists()


def test_account_reads_carry_live_state(operator_api):
    now = timezone.now()
    identity = RoutingIdentityFactory(max_concurrency=4, cooldown_until=now + timedelta(seconds=30))
    proxy = ProxyFactory(cooldown_until=now + timedelta(seconds=10))
    account = AccountFactory(name="acct", identity=identity, proxy=proxy, quota_exhausted=True)
    alias = AccountFactory(identity=identity)
    SessionBindingFactory(account=account)
    SessionBindingFactory(account=account, expires_at=now, updated_at=now - timedelta(hours=1))
    SessionBindingFactory(account=alias)
    LeaseFactory(account=alias)  # the identity's lease, on the alias
    LeaseFactory(account=account)
    row = operator_api.get(f"{BASE}/accounts/acct/").json()
    assert row["live_sessions"] == 1  # its own live binding, not the expired one nor the alias's
    assert (row["in_flight"], row["max_concurrency"]) == (2, 4)  # the identity's
    assert 29 <= row["cooldown_remaining_s"] <= 30
    assert 9 <= row["proxy_cooldown_remaining_s"] <= 10
    assert row["quota_exhausted"] is True


def test_quota_state_is_read_only(operator_api):
    AccountFactory(name="acct", quota_exhausted=True)
    response = operator_api.patch(f"{BASE}/accounts/acct/", {"quota_exhausted": False}, format="json")
    assert response.status_code == 200
    assert Account.objects.get(name="acct").quota_exhausted is True


def test_reset_quota(operator_api):
    AccountFactory(name="spent", quota_exhausted=True, quota_exhausted_at=timezone.now(), quota_exhausted_reason="0")
    response = operator_api.post(f"{BASE}/accounts/spent/reset-quota/")
    assert response.status_code == 200
    assert response.json()["quota_exhausted"] is False
    assert Account.objects.get(name="spent").quota_exhausted is False
    assert CooldownEvent.objects.filter(kind=CooldownKind.QUOTA_RESET, account__name="spent").count() == 1
    # Idempotent: resetting a healthy account changes nothing.
    assert operator_api.post(f"{BASE}/accounts/spent/reset-quota/").status_code == 200
    assert CooldownEvent.objects.filter(kind=CooldownKind.QUOTA_RESET).count() == 1
    assert_error(operator_api.post(f"{BASE}/accounts/nobody/reset-quota/"), 404, "not_found_error")


def test_account_fixed_to_a_key_cannot_be_deleted(operator_api):
    account = AccountFactory(name="pinned")
    ApiKeyFactory(name="pinning-key", route_strategy="fixed", fixed_account=account)
    message = assert_error(operator_api.delete(f"{BASE}/accounts/pinned/"), 409, "conflict_error")
    assert "pinning-key" in message


def test_account_delete_drops_its_bindings(operator_api):
    account = AccountFactory(name="gone")
    SessionBindingFactory(account=account)
    assert operator_api.delete(f"{BASE}/accounts/gone/").status_code == 204
    assert not Account.objects.filter(name="gone").exists()


def test_names_with_dots_and_spaces_are_looked_up(operator_api):
    AccountFactory(name="team.alpha user@1")
    response = operator_api.get(f"{BASE}/accounts/team.alpha%20user@1/")
    assert response.status_code == 200
    assert response.json()["name"] == "team.alpha user@1"


def _list_queries(client, path: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(path).status_code == 200
    return len(queries)


@pytest.mark.parametrize("resource", ["identities", "accounts", "proxies", "groups", "keys"])
def test_lists_take_a_fixed_number_of_queries(operator_api, resource):
    def grow():
        identity = RoutingIdentityFactory()
        account = AccountFactory(identity=identity, proxy=ProxyFactory())
        SessionBindingFactory(account=account)
        LeaseFactory(account=account)
        AccountGroupFactory(accounts=[account, AccountFactory(identity=identity)])
        ApiKeyFactory(account_group=AccountGroup.objects.last(), fixed_account=account)

    grow()
    small = _list_queries(operator_api, f"{BASE}/{resource}/")
    for _ in range(5):
        grow()
    assert _list_queries(operator_api, f"{BASE}/{resource}/") == small


# --- proxies --------------------------------------------------------------------------------


def test_proxy_crud_and_clear_cooldown(operator_api):
    created = operator_api.post(f"{BASE}/proxies/", {"name": "eu-1", "url": "http://eu-1:3128"}, format="json")
    assert created.status_code == 201
    duplicate = operator_api.post(f"{BASE}/proxies/", {"name": "eu-2", "url": "http://eu-1:3128"}, format="json")
    assert "url" in assert_error(duplicate, 409, "conflict_error")
    Proxy.objects.filter(name="eu-1").update(cooldown_until=timezone.now() + timedelta(minutes=5))
    assert operator_api.get(f"{BASE}/proxies/eu-1/").json()["cooldown_remaining_s"] > 0
    cleared = operator_api.post(f"{BASE}/proxies/eu-1/clear-cooldown/")
    assert cleared.status_code == 200
    assert cleared.json()["cooldown_remaining_s"] == 0
    assert CooldownEvent.objects.filter(kind=CooldownKind.PROXY_CLEARED).count() == 1
    account = AccountFactory(proxy=Proxy.objects.get(name="eu-1"))
    assert operator_api.delete(f"{BASE}/proxies/eu-1/").status_code == 204
    account.refresh_from_db()
    assert account.proxy is None  # accounts go direct rather than disappear


# --- groups -----------------------------------------------------------------------------------


def test_group_crud_by_account_names(operator_api):
    AccountFactory(name="a1")
    AccountFactory(name="a2")
    created = operator_api.post(f"{BASE}/groups/", {"name": "team", "accounts": ["a2", "a1"]}, format="json")
    assert created.status_code == 201, created.content
    assert sorted(created.json()["accounts"]) == ["a1", "a2"]
    patched = operator_api.patch(f"{BASE}/groups/team/", {"accounts": ["a1"]}, format="json")
    assert patched.json()["accounts"] == ["a1"]
    assert list(AccountGroup.objects.get(name="team").accounts.values_list("name", flat=True)) == ["a1"]
    unknown = operator_api.patch(f"{BASE}/groups/team/", {"accounts": ["a1", "ghost"]}, format="json")
    assert "accounts" in assert_error(unknown, 422, "invalid_request_error")
    for not_a_list in ({"a1": 1}, "a1"):
        response = operator_api.patch(f"{BASE}/groups/team/", {"accounts": not_a_list}, format="json")
        assert "accounts" in assert_error(response, 400, "invalid_request_error")
    assert list(AccountGroup.objects.get(name="team").accounts.values_list("name", flat=True)) == ["a1"]


def test_group_used_by_a_key_cannot_be_deleted(operator_api):
    group = AccountGroupFactory(name="used")
    ApiKeyFactory(name="user-key", account_group=group)
    assert "user-key" in assert_error(operator_api.delete(f"{BASE}/groups/used/"), 409, "conflict_error")
    assert operator_api.delete(f"{BASE}/groups/{AccountGroupFactory().name}/").status_code == 204


# --- API keys ---------------------------------------------------------------------------------


def test_key_create_returns_the_plaintext_once(operator_api):
    AccountGroupFactory(name="team")
    response = operator_api.post(
        f"{BASE}/keys/",
        {
            "name": "gateway-1",
            "account_group": "team",
            "max_concurrency": 8,
            "preferred_pool": "credit_first",
            "credentials_access": True,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    plaintext = body["key"]
    assert plaintext.startswith("kp_")
    assert api_key_authenticate(plaintext).name == "gateway-1"
    key = ApiKey.objects.get(name="gateway-1")
    assert plaintext not in (key.key_hash, key.prefix)
    assert body["masked_key"] == f"kp_{key.prefix}_…"
    assert (body["account_group"], body["max_concurrency"], body["preferred_pool"]) == ("team", 8, "credit_first")
    assert body["credentials_access"] is True and key.credentials_access is True
    for read in (operator_api.get(f"{BASE}/keys/"), operator_api.get(f"{BASE}/keys/{key.pk}/")):
        assert plaintext not in read.content.decode()
        assert "key" not in (read.json()[0] if isinstance(read.json(), list) else read.json())


def test_key_update_and_delete(operator_api):
    key = ApiKeyFactory(name="k")
    account = AccountFactory(name="pinned")
    response = operator_api.patch(
        f"{BASE}/keys/{key.pk}/",
        {"route_strategy": "fixed", "fixed_account": "pinned", "model_preferences": {"claude": ["pinned"]}},
        format="json",
    )
    assert response.status_code == 200, response.content
    key.refresh_from_db()
    assert (key.route_strategy, key.fixed_account, key.model_preferences) == ("fixed", account, {"claude": ["pinned"]})
    assert operator_api.delete(f"{BASE}/keys/{key.pk}/").status_code == 204
    assert_error(operator_api.get(f"{BASE}/keys/{key.pk}/"), 404, "not_found_error")


@pytest.mark.parametrize("resource", ["identities", "keys"])
def test_a_pacing_interval_past_what_postgresql_holds_is_refused_on_every_database(operator_api, resource):
    # SQLite's columns hold 64 bits: 10**16 ms was taken there, and every
    # dispatch after the next lease start then failed adding it to a datetime.
    obj = RoutingIdentityFactory(name="paced") if resource == "identities" else ApiKeyFactory(name="paced")
    path = f"{BASE}/{resource}/{obj.name if resource == 'identities' else obj.pk}/"
    longest = operator_api.patch(path, {"min_start_interval_ms": 2_147_483_647}, format="json")
    assert longest.status_code == 200, longest.content
    refused = operator_api.patch(path, {"min_start_interval_ms": 10**16}, format="json")
    assert "min_start_interval_ms" in assert_error(refused, 400, "invalid_request_error")
    obj.refresh_from_db()
    assert obj.min_start_interval_ms == 2_147_483_647


def test_key_sticky_patience_is_read_and_written_as_in_the_admin(operator_api):
    created = operator_api.post(f"{BASE}/keys/", {"name": "patient", "sticky_patience_ms": 10_000}, format="json")
    assert created.status_code == 201, created.content
    key = ApiKey.objects.get(name="patient")
    assert created.json()["sticky_patience_ms"] == key.sticky_patience_ms == 10_000
    assert operator_api.get(f"{BASE}/keys/{key.pk}/").json()["sticky_patience_ms"] == 10_000
    changed = operator_api.patch(f"{BASE}/keys/{key.pk}/", {"sticky_patience_ms": None}, format="json")
    assert changed.status_code == 200 and changed.json()["sticky_patience_ms"] is None
    key.refresh_from_db()
    assert key.sticky_patience_ms is None  # back to KIROPOOL_STICKY_PATIENCE_MS
    refused = operator_api.patch(f"{BASE}/keys/{key.pk}/", {"sticky_patience_ms": -1}, format="json")
    assert "sticky_patience_ms" in assert_error(refused, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("payload", "field", "status"),
    [
        # the model's check constraint, as the admin enforces it: a rule across fields
        ({"route_strategy": "fixed"}, "fixed", 422),
        ({"max_concurrency": 0}, "max_concurrency", 400),
        ({"max_concurrency": 2.0}, "max_concurrency", 400),
        ({"max_concurrency": True}, "max_concurrency", 400),
        ({"preferred_pool": "cheap"}, "preferred_pool", 400),
        ({"account_group": "ghosts"}, "account_group", 422),
        ({"model_preferences": {"claude": "acct"}}, "model_preferences", 400),
        ({"model_preferences": ["acct"]}, "model_preferences", 400),
        ({"model_preferences": {"claude": [7]}}, "model_preferences", 400),
        ({"model_preferences": {"claude": ["ghost"]}}, "model_preferences", 422),
        ({"credentials_access": "yes"}, "credentials_access", 400),
        ({"expires_at": "soon"}, "expires_at", 400),
    ],
)
def test_key_writes_are_validated(operator_api, payload, field, status):
    AccountFactory(name="acct")
    response = operator_api.post(f"{BASE}/keys/", {"name": "bad", **payload}, format="json")
    assert field in assert_error(response, status, "invalid_request_error")
    assert not ApiKey.objects.exists()


def test_key_patch_to_fixed_without_account_is_422(operator_api):
    key = ApiKeyFactory()
    response = operator_api.patch(f"{BASE}/keys/{key.pk}/", {"route_strategy": "fixed"}, format="json")
    assert_error(response, 422, "invalid_request_error")
    key.refresh_from_db()
    assert key.route_strategy == "auto"


def test_key_ids_only(operator_api):
    key = ApiKeyFactory(name="by-name")
    assert_error(operator_api.get(f"{BASE}/keys/by-name/"), 404, "not_found_error")
    assert operator_api.get(f"{BASE}/keys/{key.pk}/").status_code == 200


# --- the whole pool over REST alone -----------------------------------------------------------


def test_provision_a_pool_and_key_over_rest_then_dispatch(operator_api):
    steps = [
        ("proxies", {"name": "egress", "url": "http://egress:3128"}),
        ("identities", {"name": "kiro-1", "max_concurrency": 2}),
        ("identities", {"name": "kiro-2"}),
        ("accounts", {"name": "a1", "identity": "kiro-1", "proxy": "egress", "credentials": {"t": "1"}}),
        ("accounts", {"name": "a1-alias", "identity": "kiro-1", "credentials": {"t": "2"}}),
        ("accounts", {"name": "a2", "identity": "kiro-2", "pool": "credit_first", "credentials": {"t": "3"}}),
        ("groups", {"name": "team", "accounts": ["a1", "a2"]}),
    ]
    for resource, payload in steps:
        response = operator_api.post(f"{BASE}/{resource}/", payload, format="json")
        assert response.status_code == 201, (resource, response.content)
    key = operator_api.post(f"{BASE}/keys/", {"name": "gw", "account_group": "team"}, format="json").json()["key"]

    gateway = APIClient()
    gateway.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    dispatched = gateway.post("/api/v1/dispatch", {"session_id": "s-1"}, format="json")
    assert dispatched.status_code == 200, dispatched.content
    assert dispatched.json()["account"]["name"] in {"a1", "a2"}
    accounts = {row["name"]: row for row in operator_api.get(f"{BASE}/accounts/").json()}
    chosen = accounts[dispatched.json()["account"]["name"]]
    assert chosen["in_flight"] == 1
