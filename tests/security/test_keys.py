"""Gateway API keys: looked up by prefix, compared in constant time, stamped
with their last use, refused (401) when unknown, disabled or expired."""

import zlib
from datetime import timedelta

import pytest
from django.core import signing
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from accounts import authentication
from accounts.authentication import LAST_USED_RESOLUTION, api_key_authenticate
from accounts.models import ApiKey, hash_key
from tests.factories import AccountFactory, ApiKeyFactory, api_key_admin_form
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def pool():
    AccountFactory()


def assert_401(response):
    assert response.status_code == 401, response.content
    assert response.json()["error"]["type"] == "authentication_error"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_the_lookup_is_one_indexed_query_by_prefix():
    key = ApiKeyFactory()
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now())  # no stamp write this time
    assert ApiKey._meta.get_field("prefix").unique  # unique → indexed
    with CaptureQueriesContext(connection) as queries:
        assert api_key_authenticate(key.plaintext) == key
    assert len(queries) == 1
    sql = queries[0]["sql"]
    assert "prefix" in sql and key.prefix in sql and key.key_hash not in sql  # found by prefix, not by hash


def test_the_hash_is_compared_in_constant_time(monkeypatch):
    key = ApiKeyFactory()
    calls = []
    real = authentication.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(authentication.hmac, "compare_digest", spy)
    assert api_key_authenticate(key.plaintext) is not None
    wrong = key.plaintext[:-2] + ("xx" if not key.plaintext.endswith("xx") else "yy")
    assert api_key_authenticate(wrong) is None
    assert calls == [(key.key_hash, hash_key(key.plaintext)), (key.key_hash, hash_key(wrong))]


def test_only_the_hash_and_a_lookup_prefix_are_stored():
    key = ApiKeyFactory()
    row = ApiKey.objects.filter(pk=key.pk).values().get()
    assert key.plaintext not in str(row)
    secret_part = key.plaintext.split("_", 2)[2]
    assert all(secret_part not in str(value) for value in row.values())


def test_last_used_is_stamped_at_most_once_per_resolution():
    key = ApiKeyFactory()
    assert key.last_used_at is None
    gw = Gateway(key.plaintext)
    gw.explain()
    first = ApiKey.objects.get(pk=key.pk).last_used_at
    assert first is not None and timezone.now() - first < timedelta(seconds=5)
    gw.explain()
    assert ApiKey.objects.get(pk=key.pk).last_used_at == first  # no write on the hot path
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=first - LAST_USED_RESOLUTION)
    gw.explain()
    assert ApiKey.objects.get(pk=key.pk).last_used_at > first - LAST_USED_RESOLUTION


@pytest.mark.parametrize("endpoint", ["dispatch", "explain", "complete"])
def test_disabled_and_expired_keys_get_401_everywhere(endpoint):
    disabled = ApiKeyFactory(enabled=False)
    expired = ApiKeyFactory(expires_at=timezone.now() - timedelta(seconds=1))
    for key in (disabled, expired):
        gw = Gateway(key.plaintext)
        if endpoint == "complete":
            assert_401(gw.complete("00000000-0000-0000-0000-000000000000", outcome="success"))
        else:
            assert_401(getattr(gw, endpoint)())


def test_a_key_expiring_later_works_until_then():
    key = ApiKeyFactory(expires_at=timezone.now() + timedelta(hours=1))
    assert Gateway(key.plaintext).dispatch().status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert_401(Gateway(key.plaintext).dispatch())


def test_disabling_a_key_takes_effect_on_the_next_request():
    key = ApiKeyFactory()
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(enabled=False)
    assert_401(gw.explain())


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"HTTP_AUTHORIZATION": "Bearer"},
        {"HTTP_AUTHORIZATION": "Bearer kp_unknown_secret"},
        {"HTTP_AUTHORIZATION": "Bearer not-a-kiropool-key"},
        {"HTTP_AUTHORIZATION": "Basic dXNlcjpwYXNz"},
        {"HTTP_AUTHORIZATION": "Token abc"},
        {"HTTP_X_API_KEY": "kp__"},
        {"HTTP_X_API_KEY": "kp_" + "a" * 5000 + "_b"},
    ],
)
def test_missing_or_bad_keys_get_401(client, headers):
    assert_401(client.post("/api/v1/dispatch", {}, content_type="application/json", **headers))


def test_both_headers_work(client):
    key = ApiKeyFactory()
    by_header = client.post(
        "/api/v1/dispatch/explain", {}, content_type="application/json", HTTP_X_API_KEY=key.plaintext
    )
    assert by_header.status_code == 200
    bearer = client.post(
        "/api/v1/dispatch/explain", {}, content_type="application/json", HTTP_AUTHORIZATION=f"bearer {key.plaintext}"
    )
    assert bearer.status_code == 200


def test_a_valid_prefix_with_the_wrong_secret_is_refused():
    key = ApiKeyFactory()
    other = ApiKeyFactory()
    forged = f"kp_{key.prefix}_{other.plaintext.split('_', 2)[2]}"
    assert_401(Gateway(forged).dispatch())


def cookie_readings(response) -> list[str]:
    """What anyone holding a response's cookies can read: each Set-Cookie as
    sent, and its value decoded the way Django's signer encodes it (base64,
    zlib when compressed). A signature proves where a value came from; it
    hides nothing."""
    readings = []
    for morsel in response.cookies.values():
        readings.append(morsel.OutputString())
        payload = morsel.value.split(":", 1)[0]
        try:
            data = signing.b64_decode(payload.lstrip(".").encode())
            readings.append((zlib.decompress(data) if payload.startswith(".") else data).decode(errors="replace"))
        except (ValueError, zlib.error):
            pass  # not a signed value
    return readings


def test_a_new_keys_plaintext_never_travels_in_a_cookie(staff_client):
    form = api_key_admin_form()
    created = staff_client.post(reverse("admin:accounts_apikey_add"), form)
    assert created.status_code == 302, created.content
    shown = staff_client.get(created.url)
    # The one showing still happens, from the server-side session...
    plaintext = shown.content.decode().split("<code class='kiropool-new-key'>")[1].split("</code>")[0]
    assert hash_key(plaintext) == ApiKey.objects.get(name="from-admin").key_hash
    # kp_<hex prefix>_<secret>: the secret is url-safe base64 and may itself
    # hold "_", so split after the prefix, not at the last "_" (a tail of a
    # few characters would turn up in a session id by chance).
    secret = plaintext.split("_", 2)[2]
    # ...and neither the key nor its secret part is in any cookie of either response.
    readings = cookie_readings(created) + cookie_readings(shown)
    assert readings  # the session cookie at least: the check saw cookies
    assert not [reading for reading in readings if plaintext in reading or secret in reading]
    assert all(secret not in morsel.value for morsel in staff_client.cookies.values())
