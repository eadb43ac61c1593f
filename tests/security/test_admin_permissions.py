"""The admin side of the operator permissions: credentials access is given
only by those holding ``accounts.grant_credentials_access`` (the checkbox is
not even there for the others, and a forged POST of it does nothing), and the
bulk actions need the change permission, not just a look at the list."""

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone
from rest_framework.authtoken.models import Token

from accounts.models import Account, ApiKey, Proxy, RoutingIdentity
from accounts.resources import SealedTempStorage
from tests.factories import (
    AccountFactory,
    AccountGroupFactory,
    ApiKeyFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    api_key_admin_form,
)

pytestmark = pytest.mark.django_db

KEY_EDITOR = ["view_apikey", "add_apikey", "change_apikey"]
CHECKBOX = 'name="credentials_access"'

KEY_FORM = api_key_admin_form()


@pytest.fixture
def login(client, django_user_model):
    def as_staff(*codenames: str, superuser: bool = False):
        user = django_user_model.objects.create_user(
            username="staff", password="pw", is_staff=True, is_superuser=superuser
        )
        user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
        assert user.user_permissions.count() == len(codenames)
        client.force_login(user)
        return client

    return as_staff


def test_without_the_grant_the_checkbox_is_not_offered(login):
    client = login(*KEY_EDITOR)
    key = ApiKeyFactory()
    for page in (reverse("admin:accounts_apikey_add"), reverse("admin:accounts_apikey_change", args=[key.pk])):
        response = client.get(page)
        assert response.status_code == 200
        assert CHECKBOX not in response.content.decode()


@pytest.mark.parametrize("who", ["grant", "superuser"])
def test_with_the_grant_the_checkbox_is_offered_and_works(login, who):
    client = login(*KEY_EDITOR, "grant_credentials_access") if who == "grant" else login(superuser=True)
    assert CHECKBOX in client.get(reverse("admin:accounts_apikey_add")).content.decode()
    response = client.post(reverse("admin:accounts_apikey_add"), {**KEY_FORM, "credentials_access": "on"})
    assert response.status_code == 302
    assert ApiKey.objects.get(name="from-admin").credentials_access is True


def test_a_forged_post_cannot_switch_it_on(login):
    client = login(*KEY_EDITOR)
    response = client.post(reverse("admin:accounts_apikey_add"), {**KEY_FORM, "credentials_access": "on"})
    assert response.status_code == 302
    assert ApiKey.objects.get(name="from-admin").credentials_access is False

    key = ApiKeyFactory(name="plain")
    change = reverse("admin:accounts_apikey_change", args=[key.pk])
    response = client.post(change, {**KEY_FORM, "name": "plain", "credentials_access": "on"})
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.credentials_access is False


def test_a_key_with_credentials_access_is_read_only_without_the_grant(login):
    client = login(*KEY_EDITOR)
    account = AccountFactory(name="team-b")
    key = ApiKeyFactory(name="holder", credentials_access=True, enabled=False)
    change = reverse("admin:accounts_apikey_change", args=[key.pk])
    page = client.get(change)
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()  # the view-only page
    forged = {**KEY_FORM, "name": "holder", "route_strategy": "fixed", "fixed_account": account.pk}
    assert client.post(change, forged).status_code == 403
    key.refresh_from_db()
    assert (key.name, key.route_strategy, key.fixed_account, key.enabled) == ("holder", "auto", None, False)


def run_action(client, model: str, action: str, objects):
    return client.post(
        reverse(f"admin:accounts_{model}_changelist"),
        {"action": action, "_selected_action": [obj.pk for obj in objects]},
        follow=True,
    )


def test_enabling_a_key_with_credentials_access_needs_the_grant(login):
    client = login(*KEY_EDITOR)
    holder = ApiKeyFactory(credentials_access=True, enabled=False)
    plain = ApiKeyFactory(enabled=False)
    response = run_action(client, "apikey", "enable", [holder, plain])
    assert "Left 1 keys with credentials access disabled" in response.content.decode()
    assert ApiKey.objects.get(pk=plain.pk).enabled is True
    assert ApiKey.objects.get(pk=holder.pk).enabled is False


def test_a_viewer_cannot_run_the_actions(login):
    client = login("view_account", "view_routingidentity", "view_proxy", "view_apikey")
    later = timezone.now() + timezone.timedelta(minutes=5)
    account = AccountFactory(enabled=False, quota_exhausted=True)
    identity = RoutingIdentityFactory(cooldown_until=later)
    proxy = ProxyFactory(cooldown_until=later)
    key = ApiKeyFactory(enabled=False)
    assert client.get(reverse("admin:accounts_account_changelist")).status_code == 200
    for model, action, objects in [
        ("account", "enable", [account]),
        ("account", "reset_quota", [account]),
        ("routingidentity", "clear_cooldown", [identity]),
        ("proxy", "clear_cooldown", [proxy]),
        ("apikey", "enable", [key]),
    ]:
        run_action(client, model, action, objects)
    account.refresh_from_db()
    assert (account.enabled, account.quota_exhausted) == (False, True)
    assert RoutingIdentity.objects.get(pk=identity.pk).cooldown_until == later
    assert Proxy.objects.get(pk=proxy.pk).cooldown_until == later
    assert ApiKey.objects.get(pk=key.pk).enabled is False


def test_an_editor_can_run_them(login):
    client = login("view_account", "change_account")
    account = AccountFactory(enabled=False)
    run_action(client, "account", "enable", [account])
    assert Account.objects.get(pk=account.pk).enabled is True


# --- a group that a key with credentials access uses ----------------------------------------------

GROUP_EDITOR = ["view_accountgroup", "add_accountgroup", "change_accountgroup"]


@pytest.fixture
def credentials_group():
    """Team A's group, which a key with credentials access routes over, and
    team B's account, which must not reach that key's gateway."""
    mine, theirs = AccountFactory(name="team-a-acct"), AccountFactory(name="team-b-acct")
    group = AccountGroupFactory(name="team-a", accounts=[mine])
    ApiKeyFactory(name="holder", account_group=group, credentials_access=True)
    return group, mine, theirs


def test_adding_accounts_to_such_a_group_needs_the_grant(login, credentials_group):
    group, mine, theirs = credentials_group
    client = login(*GROUP_EDITOR)
    change = reverse("admin:accounts_accountgroup_change", args=[group.pk])
    response = client.post(change, {"name": "team-a", "accounts": [mine.pk, theirs.pk]})
    assert response.status_code == 200
    assert "accounts.grant_credentials_access" in str(response.context["adminform"].form.errors["accounts"])
    assert list(group.accounts.all()) == [mine]
    # Taking accounts out only narrows what the key receives.
    assert client.post(change, {"name": "team-a", "accounts": []}).status_code == 302
    assert not group.accounts.exists()


def test_the_grant_lets_a_group_editor_add_them(login, credentials_group):
    group, mine, theirs = credentials_group
    client = login(*GROUP_EDITOR, "grant_credentials_access")
    change = reverse("admin:accounts_accountgroup_change", args=[group.pk])
    assert client.post(change, {"name": "team-a", "accounts": [mine.pk, theirs.pk]}).status_code == 302
    assert set(group.accounts.all()) == {mine, theirs}


def test_an_import_cannot_add_accounts_to_such_a_group_without_the_grant(login, credentials_group):
    group, mine, theirs = credentials_group
    client = login(*GROUP_EDITOR)
    text = "name,accounts\nteam-a,team-a-acct;team-b-acct\n"
    upload = {"resource": "0", "format": "0", "import_file": SimpleUploadedFile("groups.csv", text.encode())}
    response = client.post(reverse("admin:accounts_accountgroup_import"), upload)
    assert response.status_code == 200 and "confirm_form" not in response.context
    [invalid] = response.context["result"].invalid_rows
    assert "accounts.grant_credentials_access" in str(invalid.field_specific_errors["accounts"])
    # The confirm step, forged, runs the same check: nothing is written.
    stored = SealedTempStorage(encoding="utf-8-sig")
    stored.save(text)
    confirm = {"import_file_name": stored.name, "original_file_name": "groups.csv", "format": "0", "resource": "0"}
    client.post(reverse("admin:accounts_accountgroup_process_import"), confirm)
    assert list(group.accounts.all()) == [mine]


# --- the operator API's tokens ------------------------------------------------------------------


def _superuser_token(django_user_model):
    root = django_user_model.objects.create_user(username="root", password="pw", is_staff=True, is_superuser=True)
    return Token.objects.create(user=root)


TOKEN_PERMISSIONS = ["view_tokenproxy", "add_tokenproxy", "change_tokenproxy", "delete_tokenproxy"]


def test_staff_given_the_token_permissions_cannot_reach_anyones_token(login, django_user_model):
    """Had they read a superuser's key in the token list, they could act as
    that superuser over the operator API; nor may they make one for them."""
    token = _superuser_token(django_user_model)
    client = login(*TOKEN_PERMISSIONS)
    changelist = reverse("admin:authtoken_tokenproxy_changelist")
    assert client.get(changelist).status_code == 403
    assert client.get(reverse("admin:authtoken_tokenproxy_add")).status_code == 403
    assert client.post(reverse("admin:authtoken_tokenproxy_add"), {"user": token.user_id}).status_code == 403
    assert token.key not in client.get(reverse("admin:index")).content.decode()


def test_a_superuser_lists_whose_tokens_exist_without_their_keys_and_may_revoke_one(login, django_user_model):
    token = _superuser_token(django_user_model)
    client = login(superuser=True)
    changelist = client.get(reverse("admin:authtoken_tokenproxy_changelist"))
    assert changelist.status_code == 200
    assert "root" in changelist.content.decode() and token.key not in changelist.content.decode()
    assert client.get(reverse("admin:authtoken_tokenproxy_add")).status_code == 403  # made at the shell
    revoke = reverse("admin:authtoken_tokenproxy_delete", args=[token.user_id])
    assert client.post(revoke, {"post": "yes"}).status_code == 302
    assert not Token.objects.exists()
