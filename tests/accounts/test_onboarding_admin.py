"""Import and export buttons on the pool's admin pages (accounts/resources.py):
the same all-or-nothing import as ``pool_import``, previewed by its dry run."""

import tempfile
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from accounts.models import Account, AccountGroup, RoutingIdentity
from tests.factories import AccountFactory, AccountGroupFactory, RoutingIdentityFactory

pytestmark = pytest.mark.django_db

SECRET = "admin-uploaded-refresh-token"
CSV, JSON = "0", "1"  # the admin's format choices, in accounts/resources.py's order
ACCOUNTS_CSV = (
    "name,identity,pool,credentials\n"
    f'acct-a,kiro-a,balanced,"{{""refresh_token"": ""{SECRET}""}}"\n'
    "acct-b,kiro-a,credit_first,\n"
)


def upload(client, model: str, text: str, fmt: str = CSV, name: str = "accounts.csv"):
    return client.post(
        reverse(f"admin:accounts_{model}_import"),
        {"resource": "0", "format": fmt, "import_file": SimpleUploadedFile(name, text.encode())},
    )


@pytest.mark.parametrize("model", ["routingidentity", "proxy", "account", "accountgroup"])
def test_the_four_pool_pages_have_import_and_export_buttons(staff_client, model):
    page = staff_client.get(reverse(f"admin:accounts_{model}_changelist")).content.decode()
    assert reverse(f"admin:accounts_{model}_import") in page
    assert reverse(f"admin:accounts_{model}_export") in page


def test_api_keys_have_no_import(staff_client):
    page = staff_client.get(reverse("admin:accounts_apikey_changelist")).content.decode()
    assert "/import/" not in page


def test_import_previews_with_a_dry_run_then_writes_on_confirm(staff_client):
    RoutingIdentityFactory(name="kiro-a")

    preview = upload(staff_client, "account", ACCOUNTS_CSV)

    assert preview.status_code == 200
    assert Account.objects.count() == 0, "the preview is a dry run"
    page = preview.content.decode()
    assert "acct-a" in page and "credit_first" in page and SECRET not in page
    confirm = preview.context["confirm_form"]
    # Between the two steps the upload waits on disk, encrypted: it holds credentials.
    waiting = Path(tempfile.gettempdir()) / confirm.initial["import_file_name"]
    assert waiting.exists() and SECRET.encode() not in waiting.read_bytes()

    done = staff_client.post(reverse("admin:accounts_account_process_import"), confirm.initial)

    assert done.status_code == 302 and done.url == reverse("admin:accounts_account_changelist")
    assert not waiting.exists()
    assert Account.objects.get(name="acct-a").credentials == {"refresh_token": SECRET}
    assert Account.objects.get(name="acct-b").pool == "credit_first"
    message = str(list(staff_client.get(done.url).context["messages"])[0])
    assert "2 new" in message


def test_a_bad_row_shows_its_number_and_field_and_nothing_is_written(staff_client):
    RoutingIdentityFactory(name="kiro-a")
    text = ACCOUNTS_CSV + "acct-c,kiro-nobody,balanced,\n"

    response = upload(staff_client, "account", text)

    assert "confirm_form" not in response.context
    [invalid] = response.context["result"].invalid_rows
    assert invalid.number == 3
    message = "no routing identity named 'kiro-nobody' in the pool or the file"
    assert invalid.field_specific_errors == {"identity": [message]}
    assert SECRET not in response.content.decode()
    assert Account.objects.count() == 0


def test_a_number_int_cannot_read_is_a_bad_row_not_a_server_error(staff_client):
    response = upload(staff_client, "routingidentity", "name,max_concurrency\nkiro-x,--2\n", name="identities.csv")

    assert response.status_code == 200
    [invalid] = response.context["result"].invalid_rows
    assert invalid.number == 1 and "max_concurrency" in invalid.field_specific_errors
    assert not RoutingIdentity.objects.exists()


def test_a_confirm_for_a_file_this_import_did_not_store_is_refused(staff_client, tmp_path):
    planted = Path(tempfile.gettempdir()) / "kiropool-planted.csv"
    planted.write_text("name,identity\nx,kiro-a\n")
    try:
        response = staff_client.post(
            reverse("admin:accounts_account_process_import"),
            {"import_file_name": planted.name, "original_file_name": "x.csv", "format": CSV, "resource": "0"},
        )
        assert response.status_code == 400
        assert planted.exists() and Account.objects.count() == 0
    finally:
        planted.unlink()


def test_group_import_through_json(staff_client):
    first, second = AccountFactory.create_batch(2)
    response = upload(
        staff_client, "accountgroup", f'[{{"name": "team", "accounts": ["{first.name}", "{second.name}"]}}]', JSON
    )
    staff_client.post(reverse("admin:accounts_accountgroup_process_import"), response.context["confirm_form"].initial)
    assert set(AccountGroup.objects.get(name="team").accounts.all()) == {first, second}


def test_export_writes_the_import_shape_without_credentials(staff_client):
    account = AccountFactory(name="acct-x", identity=RoutingIdentityFactory(name="kiro-x"))
    AccountGroupFactory(name="team", accounts=[account])

    accounts = staff_client.post(reverse("admin:accounts_account_export"), {"format": CSV, "resource": "0"})
    groups = staff_client.post(reverse("admin:accounts_accountgroup_export"), {"format": CSV, "resource": "0"})

    text = accounts.content.decode()
    assert text.splitlines()[0] == "name,identity,proxy,pool,enabled,region,profile_arn"
    assert "acct-x,kiro-x,,balanced" in text
    assert "secret-refresh-token" not in text and "gAAAAA" not in text and "credentials" not in text
    assert groups.content.decode().splitlines()[1] == "team,acct-x"


def test_import_needs_add_and_change_rights_export_needs_view(client, django_user_model):
    viewer = django_user_model.objects.create_user(username="viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_routingidentity"))
    client.force_login(viewer)
    RoutingIdentityFactory(name="kiro-a")

    assert client.get(reverse("admin:accounts_routingidentity_import")).status_code == 403
    assert upload(client, "routingidentity", "name\nkiro-new\n").status_code == 403
    assert not RoutingIdentity.objects.filter(name="kiro-new").exists()
    exported = client.post(reverse("admin:accounts_routingidentity_export"), {"format": CSV, "resource": "0"})
    assert exported.status_code == 200 and "kiro-a" in exported.content.decode()
