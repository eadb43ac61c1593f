"""Staff is the way in, not a licence: every operator route needs the Django
model permission the admin asks for the same act, and a key that hands out
account credentials needs a permission of its own. The routes are read from
the URLconf, so a new one fails here until its permission is written down."""

import pytest
from django.contrib.auth.models import Permission
from django.urls import URLResolver, get_resolver, reverse
from rest_framework.test import APIClient

from accounts.models import Account, AccountGroup, ApiKey, Proxy, RoutingIdentity
from routing.models import CooldownEvent, LatencySnapshot, SessionBinding
from tests.factories import (
    AccountFactory,
    AccountGroupFactory,
    ApiKeyFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
)
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db

SECRET = "team-b-refresh-token"


def crud(basename: str, model: str, **extra_posts: str) -> dict:
    perm = {verb: f"accounts.{verb}_{model}" for verb in ("view", "add", "change", "delete")}
    table = {
        (f"{basename}-list", "get"): perm["view"],
        (f"{basename}-list", "post"): perm["add"],
        (f"{basename}-detail", "get"): perm["view"],
        (f"{basename}-detail", "put"): perm["change"],
        (f"{basename}-detail", "patch"): perm["change"],
        (f"{basename}-detail", "delete"): perm["delete"],
    }
    table.update({(f"{basename}-{action}", "post"): perm[verb] for action, verb in extra_posts.items()})
    return table


# (URL name, method) -> the one permission that opens it. Reads also open to the
# model's change permission, as in the admin.
REQUIRED = {
    **crud("identity", "routingidentity", **{"clear-cooldown": "change"}),
    **crud("account", "account", **{"reset-quota": "change"}),
    **crud("proxy", "proxy", **{"clear-cooldown": "change"}),
    **crud("group", "accountgroup"),
    **crud("key", "apikey"),
    ("binding-list", "get"): "routing.view_sessionbinding",
    ("binding-detail", "delete"): "routing.delete_sessionbinding",
    ("latency-list", "get"): "routing.view_latencysnapshot",
    ("latency-refresh", "post"): "routing.add_latencysnapshot",
}

BODIES = {
    ("identity-list", "post"): {"name": "new-identity"},
    ("identity-detail", "put"): {"name": "spare-identity", "max_concurrency": 2},
    ("identity-detail", "patch"): {"max_concurrency": 3},
    ("account-list", "post"): {"name": "new-account", "identity": "ident"},
    ("account-detail", "put"): {"name": "acct", "identity": "ident"},
    ("account-detail", "patch"): {"region": "eu-west-1"},
    ("proxy-list", "post"): {"name": "new-proxy", "url": "http://new-proxy:3128"},
    ("proxy-detail", "put"): {"name": "prx", "url": "http://prx-2:3128"},
    ("proxy-detail", "patch"): {"cooldown_reason": "maintenance"},
    ("group-list", "post"): {"name": "new-group", "accounts": ["acct"]},
    ("group-detail", "put"): {"name": "grp", "accounts": []},
    ("group-detail", "patch"): {"accounts": ["acct"]},
    ("key-list", "post"): {"name": "new-key"},
    ("key-detail", "put"): {"name": "gw", "enabled": False},
    ("key-detail", "patch"): {"enabled": False},
}


def operator_routes():
    """(URL name, method) of every operator route, from the URLconf."""

    def walk(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif prefix.startswith("api/v1/admin/"):
                for method in pattern.callback.actions:
                    if method != "head":  # DRF adds it once a GET was served: it is the GET
                        yield pattern.name, method

    return set(walk(get_resolver().url_patterns))


def test_every_operator_route_has_its_permission_written_down():
    assert operator_routes() == set(REQUIRED)


@pytest.fixture
def pool():
    identity = RoutingIdentityFactory(name="ident")
    RoutingIdentityFactory(name="spare-identity")
    account = AccountFactory(name="acct", identity=identity)
    ProxyFactory(name="prx", url="http://prx:3128")
    AccountGroupFactory(name="grp")
    key = ApiKeyFactory(name="gw")
    binding = SessionBindingFactory(account=account, api_key=key)
    return {"identity": "spare-identity", "account": "acct", "proxy": "prx", "group": "grp", "key": key.pk}, binding


def url(pool, name: str) -> str:
    objects, binding = pool
    basename = name.split("-")[0]
    if name.endswith("-list") or name == "latency-refresh":
        return reverse(f"operator:{name}")
    if basename == "binding":
        return reverse(f"operator:{name}", kwargs={"pk": binding.pk})
    kwarg = "id" if basename == "key" else "name"
    return reverse(f"operator:{name}", kwargs={kwarg: objects[basename]})


def call(client, pool, name: str, method: str):
    return getattr(client, method)(url(pool, name), BODIES.get((name, method), {}), format="json")


def state() -> dict:
    models = [RoutingIdentity, Account, Proxy, AccountGroup, AccountGroup.accounts.through, ApiKey]
    models += [SessionBinding, LatencySnapshot, CooldownEvent]
    return {model.__name__: list(model.objects.order_by("pk").values()) for model in models}


def permissions(*names: str) -> list[Permission]:
    found = [Permission.objects.get(content_type__app_label=n.split(".")[0], codename=n.split(".")[1]) for n in names]
    assert len(found) == len(names)
    return found


@pytest.mark.parametrize(("name", "method"), sorted(REQUIRED))
def test_staff_without_permissions_gets_403_everywhere_and_changes_nothing(pool, operator_token_client, name, method):
    client = operator_token_client("bare-staff")
    before = state()
    response = call(client, pool, name, method)
    assert response.status_code == 403, response.content
    assert response.json()["error"]["type"] == "permission_error"
    assert REQUIRED[(name, method)] in response.json()["error"]["message"]
    assert state() == before


@pytest.mark.parametrize(("name", "method"), sorted(REQUIRED))
def test_the_one_written_down_permission_is_enough(pool, operator_token_client, name, method):
    client = operator_token_client("narrow-staff", permissions(REQUIRED[(name, method)]))
    response = call(client, pool, name, method)
    assert 200 <= response.status_code < 300, response.content


@pytest.mark.parametrize(("name", "method"), sorted(REQUIRED))
def test_a_superuser_may_do_everything(pool, django_user_model, name, method):
    client = APIClient()
    client.force_login(django_user_model.objects.create_superuser(username="root", password="pw"))
    response = call(client, pool, name, method)
    assert 200 <= response.status_code < 300, response.content


@pytest.mark.parametrize(("name", "method"), sorted(REQUIRED))
def test_view_permissions_read_but_never_write(pool, operator_token_client, name, method):
    viewer = operator_token_client("viewer", Permission.objects.filter(codename__startswith="view_"))
    before = state()
    response = call(viewer, pool, name, method)
    if method == "get":
        assert response.status_code == 200, response.content
    else:
        assert response.status_code == 403, response.content
        assert state() == before


def test_the_change_permission_also_reads_as_in_the_admin(pool, operator_token_client):
    editor = operator_token_client("editor", permissions("accounts.change_account"))
    assert editor.get("/api/v1/admin/accounts/acct/").status_code == 200
    assert editor.get("/api/v1/admin/identities/").status_code == 403


def test_a_permission_on_one_model_opens_nothing_else(pool, operator_token_client):
    client = operator_token_client("account-admin", Permission.objects.filter(codename__endswith="_account"))
    for name, method in REQUIRED:
        if not name.startswith("account-"):
            assert call(client, pool, name, method).status_code == 403, (name, method)


def test_a_method_a_route_does_not_serve_is_405_not_403(operator_token_client):
    response = operator_token_client("bare-staff").put("/api/v1/admin/latency/", {}, format="json")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- credentials access -------------------------------------------------------------------------


@pytest.fixture
def other_team():
    """An account of another team, holding its refresh token."""
    return AccountFactory(name="team-b-acct", credentials={"refresh_token": SECRET})


KEY_EDITOR = ("accounts.view_apikey", "accounts.add_apikey", "accounts.change_apikey")


def test_the_reported_attack_fails_no_key_carries_credentials_without_the_grant(other_team, operator_token_client):
    """Staff with the key permissions but not the grant: the fixed key with
    credentials access is refused, and any key they can make gets no secrets."""
    client = operator_token_client("key-editor", permissions(*KEY_EDITOR))
    fixed = {"name": "sneaky", "route_strategy": "fixed", "fixed_account": "team-b-acct"}
    refused = client.post("/api/v1/admin/keys/", {**fixed, "credentials_access": True}, format="json")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert "accounts.grant_credentials_access" in refused.json()["error"]["message"]
    assert not ApiKey.objects.filter(name="sneaky").exists()

    created = client.post("/api/v1/admin/keys/", fixed, format="json")
    assert created.status_code == 201
    dispatched = Gateway(created.json()["key"]).dispatch()
    assert dispatched.status_code == 200
    assert "credentials" not in dispatched.json()["account"]
    assert SECRET not in dispatched.content.decode()


@pytest.mark.parametrize("method", ["put", "patch"])
def test_switching_credentials_access_on_needs_the_grant(operator_token_client, method):
    key = ApiKeyFactory(name="gw")
    client = operator_token_client("key-editor", permissions(*KEY_EDITOR))
    body = {"name": "gw", "credentials_access": True, "enabled": False}
    response = getattr(client, method)(f"/api/v1/admin/keys/{key.pk}/", body, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    key.refresh_from_db()
    assert (key.credentials_access, key.enabled) == (False, True)


def test_a_key_with_credentials_access_cannot_be_repointed_without_the_grant(other_team, operator_token_client):
    key = ApiKeyFactory(name="holder", credentials_access=True)
    client = operator_token_client("key-editor", permissions(*KEY_EDITOR))
    repoint = {"route_strategy": "fixed", "fixed_account": "team-b-acct"}
    response = client.patch(f"/api/v1/admin/keys/{key.pk}/", repoint, format="json")
    assert response.status_code == 403
    key.refresh_from_db()
    assert (key.route_strategy, key.fixed_account) == ("auto", None)
    # Taking the access away is always allowed: it only narrows what the key can do.
    revoked = client.patch(f"/api/v1/admin/keys/{key.pk}/", {"credentials_access": False}, format="json")
    assert revoked.status_code == 200
    key.refresh_from_db()
    assert key.credentials_access is False


def test_the_grant_permission_grants(other_team, operator_token_client):
    client = operator_token_client("granter", permissions(*KEY_EDITOR, "accounts.grant_credentials_access"))
    body = {"name": "trusted", "route_strategy": "fixed", "fixed_account": "team-b-acct", "credentials_access": True}
    created = client.post("/api/v1/admin/keys/", body, format="json")
    assert created.status_code == 201, created.content
    dispatched = Gateway(created.json()["key"]).dispatch().json()
    assert dispatched["account"]["credentials"] == {"refresh_token": SECRET}


def test_the_grant_alone_opens_no_route(operator_token_client):
    client = operator_token_client("grant-only", permissions("accounts.grant_credentials_access"))
    assert client.get("/api/v1/admin/keys/").status_code == 403
    created = client.post("/api/v1/admin/keys/", {"name": "k", "credentials_access": True}, format="json")
    assert created.status_code == 403
    assert not ApiKey.objects.exists()


GROUP_EDITOR = ("accounts.view_accountgroup", "accounts.change_accountgroup")


def test_adding_accounts_to_the_group_of_a_key_with_credentials_access_needs_the_grant(
    other_team, operator_token_client
):
    """The same attack through the group: staff who may edit groups but not
    grant credentials access add another team's account to the group a key
    with credentials access routes over. Refused, and the key's gateway never
    gets that account (nor its secret)."""
    mine = AccountFactory(name="team-a-acct")
    group = AccountGroupFactory(name="team-a", accounts=[mine])
    key = ApiKeyFactory(name="holder", account_group=group, credentials_access=True)
    client = operator_token_client("group-editor", permissions(*GROUP_EDITOR))

    widened = {"accounts": ["team-a-acct", "team-b-acct"]}
    for method in ("put", "patch"):
        body = {"name": "team-a", **widened} if method == "put" else widened
        response = getattr(client, method)("/api/v1/admin/groups/team-a/", body, format="json")
        assert response.status_code == 403, response.content
        assert response.json()["error"]["type"] == "permission_error"
        assert "accounts.grant_credentials_access" in response.json()["error"]["message"]
    assert list(group.accounts.all()) == [mine]
    dispatched = Gateway(key.plaintext).dispatch(exclude_accounts=["team-a-acct"])
    assert dispatched.status_code == 502 and SECRET not in dispatched.content.decode()

    # Taking accounts out only narrows what the key receives, and a group no
    # such key uses is edited as before.
    assert client.patch("/api/v1/admin/groups/team-a/", {"accounts": []}, format="json").status_code == 200
    assert not group.accounts.exists()
    AccountGroupFactory(name="plain")
    ApiKeyFactory(name="no-secrets", account_group=AccountGroup.objects.get(name="plain"))
    joined = client.patch("/api/v1/admin/groups/plain/", {"accounts": ["team-b-acct"]}, format="json")
    assert joined.status_code == 200


def test_the_grant_lets_a_group_editor_add_accounts_to_such_a_group(other_team, operator_token_client):
    group = AccountGroupFactory(name="team-a")
    ApiKeyFactory(name="holder", account_group=group, credentials_access=True)
    client = operator_token_client("granter", permissions(*GROUP_EDITOR, "accounts.grant_credentials_access"))
    response = client.patch("/api/v1/admin/groups/team-a/", {"accounts": ["team-b-acct"]}, format="json")
    assert response.status_code == 200
    assert list(group.accounts.values_list("name", flat=True)) == ["team-b-acct"]
