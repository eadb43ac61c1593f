import pytest
from django.urls import reverse

from accounts.authentication import api_key_authenticate
from accounts.models import ApiKey, hash_key
from accounts.services import api_key_create
from tests.factories import ApiKeyFactory, api_key_admin_form

pytestmark = pytest.mark.django_db


def test_key_is_stored_hashed_and_authenticates():
    key, plaintext = api_key_create(name="gateway")
    stored = ApiKey.objects.get(pk=key.pk)
    assert plaintext.startswith(f"kp_{stored.prefix}_")
    assert len(plaintext) > 40
    assert stored.key_hash == hash_key(plaintext)
    assert all(plaintext not in str(getattr(stored, f.attname)) for f in ApiKey._meta.concrete_fields)
    assert api_key_authenticate(plaintext) == stored


def test_keys_are_random():
    plaintexts = {api_key_create(name=f"k{i}")[1] for i in range(20)}
    assert len(plaintexts) == 20


@pytest.mark.parametrize(
    "mangle", [lambda p: p[:-1] + ("A" if p[-1] != "A" else "B"), lambda p: "kp_x_y", str.upper, lambda p: ""]
)
def test_wrong_key_is_refused(mangle):
    key = ApiKeyFactory()
    assert api_key_authenticate(mangle(key.plaintext)) is None


def test_disabled_key_is_refused():
    key = ApiKeyFactory(enabled=False)
    assert api_key_authenticate(key.plaintext) is None


def test_admin_shows_plaintext_once(staff_client):
    response = staff_client.post(
        reverse("admin:accounts_apikey_add"),
        api_key_admin_form(),
        follow=True,
    )
    assert response.status_code == 200
    key = ApiKey.objects.get(name="from-admin")
    messages = [str(m) for m in response.context["messages"]]
    shown = [m for m in messages if "will not be shown again" in m]
    assert len(shown) == 1
    plaintext = shown[0].split("<code class='kiropool-new-key'>")[1].split("</code>")[0]
    assert hash_key(plaintext) == key.key_hash
    # the change page and the list never show it again
    change = staff_client.get(reverse("admin:accounts_apikey_change", args=[key.pk]))
    listing = staff_client.get(reverse("admin:accounts_apikey_changelist"))
    assert plaintext not in change.content.decode()
    assert plaintext not in listing.content.decode()
    assert key.prefix in listing.content.decode()
