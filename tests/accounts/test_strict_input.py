"""The operator API takes JSON exactly as /api/schema/ describes it, and the
schema says what the server refuses. Regressions of the schemathesis
conformance findings (tests/fuzz runs the checks themselves): types were
coerced (``0`` taken for a string, an object for a list), strings trimmed,
and the schema allowed what the server refused (a blank name or reference,
NUL, credentials that are not an object)."""

import pytest
from django.urls import reverse

from accounts.models import Account, AccountGroup, ApiKey, Proxy, RoutingIdentity
from tests.factories import AccountFactory, AccountGroupFactory, ApiKeyFactory, ProxyFactory, RoutingIdentityFactory

pytestmark = pytest.mark.django_db

BASE = "/api/v1/admin"


def assert_400(response, field: str) -> None:
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert field in body["error"]["message"]


@pytest.mark.parametrize(
    ("resource", "body", "field"),
    [
        ("identities", {"name": 0}, "name"),
        ("identities", {"name": "i", "max_concurrency": "2"}, "max_concurrency"),
        ("identities", {"name": "i", "max_concurrency": 2.0}, "max_concurrency"),
        ("identities", {"name": "i", "min_start_interval_ms": True}, "min_start_interval_ms"),
        ("identities", {"name": "i", "cooldown_reason": 0}, "cooldown_reason"),
        ("identities", {"name": ""}, "name"),
        ("proxies", {"name": "p", "url": 0}, "url"),
        ("accounts", {"name": "a", "identity": "ident", "credentials": ["token"]}, "credentials"),
        ("accounts", {"name": "a", "identity": "ident", "credentials": "token"}, "credentials"),
        ("accounts", {"name": "a", "identity": ""}, "identity"),
        ("accounts", {"name": "a", "identity": ["ident"]}, "identity"),
        ("accounts", {"name": "a", "identity": "ident", "proxy": 0}, "proxy"),
        ("groups", {"name": "g", "accounts": {}}, "accounts"),
        ("groups", {"name": "g", "accounts": {"acct": True}}, "accounts"),
        ("groups", {"name": "g", "accounts": "acct"}, "accounts"),
        ("groups", {"name": "g", "accounts": [0]}, "accounts"),
        ("keys", {"name": "k", "enabled": "false"}, "enabled"),
        ("keys", {"name": "k", "latency_routing_enabled": 0}, "latency_routing_enabled"),
        ("keys", {"name": "k", "account_group": 5}, "account_group"),
        ("keys", {"name": "k", "model_preferences": {"m": "acct"}}, "model_preferences"),
    ],
)
def test_a_value_of_another_type_is_refused_not_coerced(operator_api, resource, body, field):
    RoutingIdentityFactory(name="ident")
    AccountFactory(name="acct")
    before = {model: model.objects.count() for model in (RoutingIdentity, Proxy, Account, AccountGroup, ApiKey)}
    assert_400(operator_api.post(f"{BASE}/{resource}/", body, format="json"), field)
    assert {model: model.objects.count() for model in before} == before


@pytest.mark.parametrize(
    ("path", "change", "field"),
    [
        ("identities/ident", {"max_concurrency": "3"}, "max_concurrency"),
        ("proxies/prx", {"cooldown_reason": 1}, "cooldown_reason"),
        ("accounts/acct", {"remaining_credits": "12"}, "remaining_credits"),
        ("accounts/acct", {"enabled": "false"}, "enabled"),
        ("groups/grp", {"accounts": {}}, "accounts"),
    ],
)
def test_a_patch_of_another_type_changes_nothing(operator_api, path, change, field):
    identity = RoutingIdentityFactory(name="ident", max_concurrency=1)
    ProxyFactory(name="prx", cooldown_reason="")
    account = AccountFactory(name="acct", identity=identity, remaining_credits=5.0)
    AccountGroupFactory(name="grp", accounts=[account])
    assert_400(operator_api.patch(f"{BASE}/{path}/", change, format="json"), field)
    account.refresh_from_db()
    assert (account.enabled, account.remaining_credits, account.identity.max_concurrency) == (True, 5.0, 1)
    assert Proxy.objects.get(name="prx").cooldown_reason == ""
    assert list(AccountGroup.objects.get(name="grp").accounts.all()) == [account]


def test_strings_are_kept_as_sent(operator_api):
    """Not trimmed: the schema's lengths apply to what the client sends."""
    response = operator_api.post(f"{BASE}/identities/", {"name": " padded ", "cooldown_reason": " x "}, format="json")
    assert response.status_code == 201
    assert RoutingIdentity.objects.filter(name=" padded ", cooldown_reason=" x ").exists()
    too_long = operator_api.post(f"{BASE}/identities/", {"name": "n" * 200 + " "}, format="json")
    assert_400(too_long, "name")


def test_a_number_is_a_number_either_way(operator_api):
    AccountFactory(name="acct")
    for credits in (12, 12.5, None):
        response = operator_api.patch(f"{BASE}/accounts/acct/", {"remaining_credits": credits}, format="json")
        assert response.status_code == 200
        assert Account.objects.get(name="acct").remaining_credits == credits


def test_an_unknown_key_id_in_the_path_is_404(operator_api):
    ApiKeyFactory()
    for path in ("keys/abc/", "keys/1.0/", "keys/99999999999999999999/"):
        response = operator_api.get(f"{BASE}/{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"


@pytest.fixture
def schema(client):
    return client.get(reverse("schema"), {"format": "json"}).json()


def test_the_schema_says_names_and_references_are_not_blank(schema):
    components = schema["components"]["schemas"]
    account = components["AccountRequest"]["properties"]
    for field in ("name", "identity", "proxy"):
        assert account[field]["type"] == "string" and account[field]["minLength"] == 1, field
    assert account["proxy"]["nullable"] is True and "nullable" not in account["identity"]
    assert account["credentials"]["type"] == "object"
    assert components["AccountGroupRequest"]["properties"]["accounts"]["items"]["minLength"] == 1


def test_the_schema_says_every_string_taken_refuses_nul(schema):
    nul_free = "^[^\\u0000]*$"
    components = schema["components"]["schemas"]
    assert components["AccountRequest"]["properties"]["region"]["pattern"] == nul_free
    assert (
        components["ApiKeyRequest"]["properties"]["model_preferences"]["additionalProperties"]["items"]["pattern"]
        == nul_free
    )
    assert components["DispatchInputRequest"]["properties"]["exclude_accounts"]["items"]["pattern"] == nul_free
    bindings = {p["name"]: p["schema"] for p in schema["paths"]["/api/v1/admin/bindings/"]["get"]["parameters"]}
    assert bindings["account"]["pattern"] == nul_free
    assert (bindings["limit"]["minimum"], bindings["limit"]["maximum"], bindings["offset"]["minimum"]) == (1, 1000, 0)
    name = schema["paths"]["/api/v1/admin/accounts/{name}/"]["get"]["parameters"][0]["schema"]
    assert "\\x00" in name["pattern"]
    # Responses may quote what a client sent (an error message): no pattern there.
    assert "pattern" not in components["ErrorDetail"]["properties"]["message"]
