"""Account credentials: encrypted at rest, never shown back, rotated by a
command, handed to a gateway only when an operator allowed its key."""

import importlib
import io
import json
import logging

import pytest
from cryptography.fernet import Fernet
from django.apps import apps
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from accounts import fields
from accounts.models import Account, RoutingIdentity
from routing.models import CooldownEvent, CooldownKind, Lease
from tests.factories import (
    AccountFactory,
    AccountGroupFactory,
    ApiKeyFactory,
    LatencySampleFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
)
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db

SECRET = "upstream-refresh-token-9f8e7d"
KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def stored(account) -> str:
    """The credentials column as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT credentials FROM accounts_account WHERE id = %s", [account.pk])
        return cursor.fetchone()[0]


@pytest.fixture
def account():
    return AccountFactory(name="acct", credentials={"refresh_token": SECRET, "region": "us-east-1"})


def test_the_database_holds_a_fernet_token_not_the_secret(account):
    raw = stored(account)
    assert fields.is_token(raw)
    assert SECRET not in raw and "refresh_token" not in raw
    assert Account.objects.get(pk=account.pk).credentials == {"refresh_token": SECRET, "region": "us-east-1"}


def test_every_write_encrypts_afresh_and_empty_is_stored_empty(account):
    first = stored(account)
    account.save()
    assert stored(account) != first  # a new IV every time: equal secrets do not look equal
    empty = AccountFactory(credentials={})
    assert stored(empty) == ""
    assert Account.objects.get(pk=empty.pk).credentials == {}


def test_decrypted_credentials_never_print(account, caplog):
    loaded = Account.objects.get(pk=account.pk)
    for text in (repr(loaded.credentials), str(loaded.credentials), f"{loaded.credentials}", repr(loaded)):
        assert SECRET not in text
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("kiropool.test").warning("account %s has %s", loaded, loaded.credentials)
    assert SECRET not in caplog.text
    assert json.loads(json.dumps(loaded.credentials))["refresh_token"] == SECRET  # still a real dict


def test_lookups_that_could_only_compare_ciphertext_are_refused(account):
    assert Account.objects.filter(credentials={}).count() == 0
    with pytest.raises(Exception, match="Unsupported lookup"):
        list(Account.objects.filter(credentials__contains=SECRET))


def test_the_admin_never_decrypts_nor_shows_them(account, staff_client, monkeypatch):
    def boom(token):
        raise AssertionError("the admin decrypted credentials")

    monkeypatch.setattr(fields, "decrypt", boom)
    pages = [
        staff_client.get(reverse("admin:accounts_account_changelist")),
        staff_client.get(reverse("admin:accounts_account_change", args=[account.pk])),
    ]
    for page in pages:
        assert page.status_code == 200
        assert SECRET not in page.content.decode()
        assert stored(account) not in page.content.decode()  # nor the ciphertext


def account_form(account: Account, new_credentials: str) -> dict:
    """The admin's change form of ``account`` as a browser submits it."""
    return {
        "name": account.name,
        "identity": account.identity.pk,
        "pool": "balanced",
        "enabled": "on",
        "region": "",
        "profile_arn": "",
        "min_remaining_credits": "0",
        "quota_exhausted_reason": "",
        "new_credentials": new_credentials,
    }


def test_admin_writes_new_credentials_encrypted(account, staff_client):
    url = reverse("admin:accounts_account_change", args=[account.pk])
    form = account_form(account, '{"refresh_token": "rotated-by-operator"}')
    assert staff_client.post(url, form).status_code == 302
    assert fields.is_token(stored(account))
    assert Account.objects.get(pk=account.pk).credentials == {"refresh_token": "rotated-by-operator"}
    assert staff_client.post(url, {**form, "new_credentials": ""}).status_code == 302  # empty keeps them
    assert Account.objects.get(pk=account.pk).credentials == {"refresh_token": "rotated-by-operator"}


@pytest.mark.parametrize(
    ("typed", "broken"),
    [
        ('{"refresh_token": "typed-in-a-rejected-form"}', {"min_remaining_credits": "lots"}),
        ('{"refresh_token": "typed-in-a-rejected-form"}', {"name": ""}),
        ('{"refresh_token": "typed-in-a-rejected-form"', {}),  # not JSON: its own error
    ],
)
def test_a_form_shown_again_after_an_error_never_sends_typed_credentials_back(account, staff_client, typed, broken):
    url = reverse("admin:accounts_account_change", args=[account.pk])
    response = staff_client.post(url, {**account_form(account, typed), **broken})
    assert response.status_code == 200 and response.context["adminform"].form.errors
    page = response.content.decode()
    assert "typed-in-a-rejected-form" not in page
    assert "new_credentials" in response.context["adminform"].form.errors  # the operator is told to type them again
    assert Account.objects.get(pk=account.pk).credentials == {"refresh_token": SECRET, "region": "us-east-1"}


def test_operator_api_reads_never_carry_them(account, operator_api):
    for response in (
        operator_api.get("/api/v1/admin/accounts/"),
        operator_api.get("/api/v1/admin/accounts/acct/"),
    ):
        assert response.status_code == 200
        assert SECRET not in response.content.decode() and '"credentials"' not in response.content.decode()
    assert operator_api.get("/api/v1/admin/accounts/acct/").json()["has_credentials"] is True


def test_dispatch_carries_credentials_only_for_keys_allowed_them(account):
    plain = ApiKeyFactory()
    allowed = ApiKeyFactory(credentials_access=True)
    denied = Gateway(plain.plaintext).dispatch()
    assert denied.status_code == 200
    assert "credentials" not in denied.json()["account"] and SECRET not in denied.content.decode()
    Gateway(plain.plaintext).complete(denied.json()["lease_id"], outcome="success")
    granted = Gateway(allowed.plaintext).dispatch()
    assert granted.status_code == 200, granted.content
    assert granted.json()["account"]["credentials"] == {"refresh_token": SECRET, "region": "us-east-1"}


def test_dispatch_keeps_credentials_redacted_until_the_response_is_rendered(account):
    allowed = ApiKeyFactory(credentials_access=True)
    response = Gateway(allowed.plaintext).dispatch()
    # What a traceback, a log line or an error reporter would print of the
    # response's data shows no secret; only the rendered body carries them.
    carried = response.data["account"]["credentials"]
    assert isinstance(carried, fields.SecretDict)
    assert SECRET not in repr(response.data) and SECRET not in str(response.data)
    assert SECRET in response.content.decode()


def test_credentials_access_is_off_by_default_and_operators_can_grant_it(operator_api):
    created = operator_api.post("/api/v1/admin/keys/", {"name": "gw"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["credentials_access"] is False
    changed = operator_api.patch(
        f"/api/v1/admin/keys/{created.json()['id']}/", {"credentials_access": True}, format="json"
    )
    assert changed.status_code == 200 and changed.json()["credentials_access"] is True


def test_explicit_keys_encrypt_and_decrypt_independently_of_secret_key(account, settings):
    settings.KIROPOOL_FERNET_KEYS = [KEY_A]
    other = AccountFactory(credentials={"t": "under-a"})
    assert Fernet(KEY_A).decrypt(stored(other).encode()) == b'{"t":"under-a"}'
    settings.SECRET_KEY = "another-secret-key-" + "x" * 40
    assert Account.objects.get(pk=other.pk).credentials == {"t": "under-a"}


def test_the_development_key_comes_from_secret_key(account, settings):
    assert Fernet(fields.development_key(settings.SECRET_KEY)).decrypt(stored(account).encode())
    settings.SECRET_KEY = "another-secret-key-" + "x" * 40
    with pytest.raises(fields.CredentialsKeyError):
        Account.objects.get(pk=account.pk)


def test_an_undecryptable_row_is_a_clean_503_on_dispatch(account, settings):
    key = ApiKeyFactory(credentials_access=True)
    settings.KIROPOOL_FERNET_KEYS = [KEY_A]  # not the key the row was written with
    response = Gateway(key.plaintext).dispatch()
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "api_error"
    assert SECRET not in response.content.decode()
    # the gateway got no account, so the lease it would never use is released
    lease = Lease.objects.get()
    assert (lease.outcome, lease.completed_at is not None) == ("fatal", True)
    assert RoutingIdentity.objects.get(pk=account.identity_id).in_flight == 0


def test_undecryptable_credentials_do_not_eject_the_identity_for_every_key(account, settings):
    # The 503 released the lease as `fatal`, which the outlier ejection counts
    # as a failure of the upstream account: a few dispatches of a credentials
    # key (KIROPOOL_EJECTION_FAILURES) ejected the identity, and keys that
    # never ask for credentials lost an account that works for them.
    key = ApiKeyFactory(credentials_access=True)
    settings.KIROPOOL_FERNET_KEYS = [KEY_A]  # not the key the row was written with
    for _ in range(settings.KIROPOOL_EJECTION_FAILURES):
        assert Gateway(key.plaintext).dispatch(max_wait_ms=0).status_code == 503
    assert RoutingIdentity.objects.get(pk=account.identity_id).ejected_until is None
    assert Gateway(ApiKeyFactory().plaintext).dispatch(max_wait_ms=0).status_code == 200


def test_pages_that_show_an_account_by_name_work_while_its_credentials_cannot_be_decrypted(
    account, staff_client, operator_api, settings
):
    # A rotation leaves a row it cannot decrypt as it was (below); the keys,
    # groups, bindings, samples and events that name the account never need
    # its credentials, so they must not read (and try to decrypt) them.
    key = ApiKeyFactory(route_strategy="fixed", fixed_account=account)
    group = AccountGroupFactory(accounts=[account])
    SessionBindingFactory(account=account, api_key=key)
    LatencySampleFactory(account=account)
    CooldownEvent.objects.create(kind=CooldownKind.QUOTA_EXHAUSTED, account=account, created_at=timezone.now())
    settings.KIROPOOL_FERNET_KEYS = [KEY_A]  # not the key "acct" was written with
    for path in ("/api/v1/admin/keys/", f"/api/v1/admin/keys/{key.pk}/"):
        response = operator_api.get(path)
        assert response.status_code == 200, (path, response.content)
        assert '"fixed_account":"acct"' in response.content.decode().replace(" ", "")
    # Nor does an edit that leaves them as they are (here: taking the account out of selection).
    response = operator_api.patch("/api/v1/admin/accounts/acct/", {"enabled": False}, format="json")
    assert response.status_code == 200, response.content
    assert Account.objects.filter(name="acct", enabled=False).exists()
    staff_client.raise_request_exception = False
    for page in (
        reverse("admin:accounts_apikey_changelist"),
        reverse("admin:accounts_apikey_change", args=[key.pk]),
        reverse("admin:accounts_accountgroup_change", args=[group.pk]),
        reverse("admin:routing_sessionbinding_changelist"),
        reverse("admin:routing_latencysample_changelist"),
        reverse("admin:routing_cooldownevent_changelist"),
    ):
        response = staff_client.get(page)
        assert response.status_code == 200, page
        assert "acct" in response.content.decode() and SECRET not in response.content.decode()


def test_rotation_re_encrypts_every_account_under_the_first_key(account, settings):
    settings.KIROPOOL_FERNET_KEYS = [KEY_A]
    AccountFactory(name="under-a", credentials={"t": "a"})
    AccountFactory(name="nothing", credentials={})
    development = fields.development_key(settings.SECRET_KEY).decode()  # "acct" was written under it
    settings.KIROPOOL_FERNET_KEYS = [KEY_B, KEY_A, development]
    out = io.StringIO()
    call_command("rotate_credentials_key", stdout=out, batch_size=1)
    assert "re-encrypted 2 account(s); 1 without credentials" in out.getvalue()
    settings.KIROPOOL_FERNET_KEYS = [KEY_B]  # the old keys are gone now
    assert Account.objects.get(name="under-a").credentials == {"t": "a"}
    assert Account.objects.get(name="acct").credentials["refresh_token"] == SECRET
    assert Account.objects.get(name="nothing").credentials == {}


def test_rotation_moves_development_key_credentials_under_the_configured_key(account, settings):
    settings.KIROPOOL_FERNET_KEYS = [KEY_A]  # "acct" was written while no key was set
    with pytest.raises(CommandError):
        call_command("rotate_credentials_key", stdout=io.StringIO())
    call_command("rotate_credentials_key", "--from-development-key", stdout=io.StringIO())
    assert Fernet(KEY_A).decrypt(stored(account).encode())
    assert Account.objects.get(pk=account.pk).credentials["refresh_token"] == SECRET


def test_rotation_names_the_accounts_it_cannot_decrypt_and_leaves_them(account, settings):
    before = stored(account)
    settings.KIROPOOL_FERNET_KEYS = [KEY_B]
    with pytest.raises(CommandError, match="1 account\\(s\\) could not be decrypted.*acct"):
        call_command("rotate_credentials_key", stdout=io.StringIO())
    assert stored(account) == before


@pytest.mark.parametrize("size", ["0", "-1"])
def test_rotation_refuses_a_batch_size_below_one_and_changes_nothing(account, settings, size):
    # 0 ended the first batch on an empty read (an IndexError); -1 is an error
    # on PostgreSQL and no limit at all on SQLite.
    before = stored(account)
    settings.KIROPOOL_FERNET_KEYS = [KEY_A, fields.development_key(settings.SECRET_KEY).decode()]
    with pytest.raises(CommandError, match="--batch-size must be at least 1"):
        call_command("rotate_credentials_key", "--batch-size", size, stdout=io.StringIO())
    assert stored(account) == before


def test_the_migration_encrypts_plaintext_rows():
    migration = importlib.import_module("accounts.migrations.0002_account_credentials_encrypted")
    identity = RoutingIdentityFactory()
    with connection.cursor() as cursor:
        for name, value in [("legacy", json.dumps({"refresh_token": SECRET})), ("legacy-empty", "{}")]:
            cursor.execute(
                "INSERT INTO accounts_account (name, identity_id, pool, enabled, quota_exhausted,"
                " quota_exhausted_reason, region, profile_arn, credentials, binding_rows, created_at)"
                " VALUES (%s, %s, 'balanced', true, false, '', '', '', %s, 0, CURRENT_TIMESTAMP)",
                [name, identity.pk, value],
            )

    class Editor:
        pass

    editor = Editor()
    editor.connection = connection
    migration.encrypt_plaintext(apps, editor)
    migration.encrypt_plaintext(apps, editor)  # idempotent: tokens are left alone
    legacy = Account.objects.get(name="legacy")
    assert fields.is_token(stored(legacy)) and legacy.credentials == {"refresh_token": SECRET}
    assert stored(Account.objects.get(name="legacy-empty")) == ""
    migration.decrypt_to_plaintext(apps, editor)
    assert json.loads(stored(legacy)) == {"refresh_token": SECRET}


def test_deploy_check_warns_without_keys_and_errors_on_a_bad_one(settings):
    settings.KIROPOOL_FERNET_KEYS = []
    ids = {m.id for m in checks.run_checks(include_deployment_checks=True, tags=[checks.Tags.security])}
    assert "kiropool.W001" in ids
    settings.KIROPOOL_FERNET_KEYS = [KEY_A]
    ids = {m.id for m in checks.run_checks(include_deployment_checks=True, tags=[checks.Tags.security])}
    assert "kiropool.W001" not in ids
    settings.KIROPOOL_FERNET_KEYS = [KEY_A, "not-a-key"]
    errors = [m for m in checks.run_checks(tags=[checks.Tags.security]) if m.id == "kiropool.E001"]
    assert errors and "entry 2" in errors[0].msg and "not-a-key" not in errors[0].msg
