"""Proxy URLs carry passwords (``http://user:password@host:port``): every
page, API read and export an operator sees shows them masked, a masked URL
sent back unchanged keeps the stored password, and only the gateway's
dispatch response carries the URL whole."""

import html.parser
import io
import json

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from accounts.models import Proxy, RoutingIdentity
from accounts.onboarding.errors import ImportRejected
from accounts.onboarding.importer import pool_import
from accounts.proxy_urls import proxy_url_masked
from routing import maintenance
from routing.models import CooldownEvent, Lease
from tests.factories import (
    AccountFactory,
    ApiKeyFactory,
    LatencySampleFactory,
    LeaseFactory,
    ProxyFactory,
    RoutingIdentityFactory,
)
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db

PASSWORD = "hunter2-proxy-pw"
URL = f"http://egress-user:{PASSWORD}@egress.internal:3128"
MASKED = "http://egress-user:***@egress.internal:3128"
BASE = "/api/v1/admin"


@pytest.fixture
def proxy():
    return ProxyFactory(name="egress", url=URL)


def stored_url() -> str:
    return Proxy.objects.get(name__in=["egress", "egress-renamed"]).url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (URL, MASKED),
        ("socks5h://u:p@ss/w:rd@10.0.0.5:1080", "socks5h://u:***@10.0.0.5:1080"),  # unencoded @ and /
        ("u:secret@10.0.0.5:3128", "u:***@10.0.0.5:3128"),  # no scheme
        ("http://10.0.0.5:3128", "http://10.0.0.5:3128"),  # nothing to hide
        ("http://user@10.0.0.5:3128", "http://user@10.0.0.5:3128"),
        ("http://user:@10.0.0.5:3128", "http://user:@10.0.0.5:3128"),
        ("", ""),
    ],
)
def test_the_mask_hides_the_password_and_only_it(url, shown):
    assert proxy_url_masked(url) == shown
    assert proxy_url_masked(shown) == shown


class _Inputs(html.parser.HTMLParser):
    """The values of a page's form inputs, as a browser would post them."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input" and attrs.get("name") and attrs.get("type") not in ("submit", "checkbox"):
            self.values[attrs["name"]] = attrs.get("value") or ""


def posted_back(page: str, **changes: str) -> dict[str, str]:
    inputs = _Inputs()
    inputs.feed(page)
    return {**inputs.values, **changes}


# --- the admin -------------------------------------------------------------------------


def test_admin_pages_never_show_the_password(proxy, staff_client):
    account = AccountFactory(proxy=proxy)
    sample = LatencySampleFactory(account=account, proxy_url=URL)
    lease = LeaseFactory(account=account, proxy_url=URL)
    pages = {
        "proxy list": reverse("admin:accounts_proxy_changelist"),
        "proxy page": reverse("admin:accounts_proxy_change", args=[proxy.pk]),
        "sample list": reverse("admin:routing_latencysample_changelist"),
        "sample page": reverse("admin:routing_latencysample_change", args=[sample.pk]),
        "lease list": reverse("admin:routing_lease_changelist"),
        "lease page": reverse("admin:routing_lease_change", args=[lease.pk]),
        "account page": reverse("admin:accounts_account_change", args=[account.pk]),
    }
    for label, path in pages.items():
        response = staff_client.get(path)
        assert response.status_code == 200, label
        assert PASSWORD not in response.content.decode(), label
    for label in ("proxy list", "proxy page", "sample list", "sample page", "lease page"):
        assert MASKED in staff_client.get(pages[label]).content.decode(), label


def test_one_who_may_only_look_sees_the_url_masked(proxy, client, django_user_model):
    viewer = django_user_model.objects.create_user(username="viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_proxy"))
    client.force_login(viewer)
    page = client.get(reverse("admin:accounts_proxy_change", args=[proxy.pk]))
    assert page.status_code == 200
    assert PASSWORD not in page.content.decode() and MASKED in page.content.decode()


@pytest.mark.parametrize(
    ("page", "query"),
    [
        ("admin:accounts_proxy_changelist", {"url__startswith": "http://egress-user:h"}),
        ("admin:accounts_proxy_changelist", {"url__contains": "hunter"}),
        ("admin:routing_latencysample_changelist", {"proxy_url__startswith": "http://egress-user:h"}),
        ("admin:routing_lease_changelist", {"proxy_url__contains": "hunter"}),
        ("admin:accounts_account_changelist", {"proxy__url__contains": "hunter"}),
    ],
)
def test_admin_lists_cannot_be_filtered_by_the_url(proxy, staff_client, page, query):
    # A filter that answers "some row" or "no row" tells the password one guess at a time.
    account = AccountFactory(proxy=proxy)
    LatencySampleFactory(account=account, proxy_url=URL)
    LeaseFactory(account=account, proxy_url=URL)
    assert staff_client.get(reverse(page), query).status_code == 400


def test_admin_search_does_not_look_into_the_url(proxy, staff_client):
    found = staff_client.get(reverse("admin:accounts_proxy_changelist"), {"q": "hunter2"})
    assert found.status_code == 200 and found.context["cl"].result_count == 0
    by_name = staff_client.get(reverse("admin:accounts_proxy_changelist"), {"q": "egress"})
    assert by_name.context["cl"].result_count == 1


def test_an_admin_edit_that_leaves_the_url_as_shown_keeps_the_password(proxy, staff_client):
    path = reverse("admin:accounts_proxy_change", args=[proxy.pk])
    form = posted_back(staff_client.get(path).content.decode(), name="egress-renamed")
    assert form["url"] == MASKED

    response = staff_client.post(path, form)

    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    assert Proxy.objects.get(pk=proxy.pk).name == "egress-renamed"
    assert stored_url() == URL


def test_an_admin_edit_of_the_url_takes_a_new_password_and_refuses_a_masked_one_elsewhere(proxy, staff_client):
    path = reverse("admin:accounts_proxy_change", args=[proxy.pk])
    form = posted_back(staff_client.get(path).content.decode())

    moved = staff_client.post(path, {**form, "url": "http://egress-user:***@elsewhere.example:3128"})
    assert moved.status_code == 200 and "url" in moved.context["adminform"].form.errors
    assert stored_url() == URL  # the stored password was not sent to another host

    typed = "http://egress-user:new-password-7@egress.internal:3128"
    assert staff_client.post(path, {**form, "url": typed}).status_code == 302
    assert stored_url() == typed

    added = staff_client.post(reverse("admin:accounts_proxy_add"), {"name": "new", "url": MASKED})
    assert added.status_code == 200 and "url" in added.context["adminform"].form.errors
    assert not Proxy.objects.filter(name="new").exists()


def test_a_form_shown_again_after_an_error_never_sends_a_typed_password_back(proxy, staff_client):
    path = reverse("admin:accounts_proxy_change", args=[proxy.pk])
    form = posted_back(staff_client.get(path).content.decode())
    typed = "http://egress-user:typed-in-a-rejected-form@egress.internal:3128"

    response = staff_client.post(path, {**form, "name": "", "url": typed})

    assert response.status_code == 200 and response.context["adminform"].form.errors
    assert "typed-in-a-rejected-form" not in response.content.decode()
    assert "url" in response.context["adminform"].form.errors  # the operator is told to type it again
    assert stored_url() == URL


def test_pages_and_reads_that_name_a_proxy_show_its_name_only(proxy, staff_client, operator_api):
    account = AccountFactory(name="acct", proxy=proxy)
    key = ApiKeyFactory()
    reads = [
        staff_client.get(reverse("dashboard:index")),
        staff_client.get(reverse("dashboard:account", args=[account.name])),
        operator_api.get(f"{BASE}/accounts/acct/"),
        Gateway(key.plaintext).explain(),
    ]
    for response in reads:
        assert response.status_code == 200
        assert PASSWORD not in response.content.decode()


# --- the operator API ------------------------------------------------------------------


def test_operator_api_reads_show_the_password_masked(proxy, operator_api):
    listed = operator_api.get(f"{BASE}/proxies/")
    one = operator_api.get(f"{BASE}/proxies/egress/")
    for response in (listed, one):
        assert response.status_code == 200
        assert PASSWORD not in response.content.decode()
    assert one.json()["url"] == MASKED


def test_operator_api_put_and_patch_of_what_was_read_keep_the_password(proxy, operator_api):
    body = operator_api.get(f"{BASE}/proxies/egress/").json()
    put = operator_api.put(f"{BASE}/proxies/egress/", {**body, "cooldown_reason": "checked"}, format="json")
    assert put.status_code == 200, put.content
    assert stored_url() == URL and PASSWORD not in put.content.decode()

    patched = operator_api.patch(f"{BASE}/proxies/egress/", {"name": "egress-renamed", "url": MASKED}, format="json")
    assert patched.status_code == 200, patched.content
    assert stored_url() == URL


def test_operator_api_takes_a_whole_url_and_refuses_a_masked_one_it_cannot_restore(proxy, operator_api):
    elsewhere = operator_api.patch(
        f"{BASE}/proxies/egress/", {"url": "http://egress-user:***@elsewhere.example:3128"}, format="json"
    )
    assert elsewhere.status_code == 422, elsewhere.content
    assert stored_url() == URL
    created = operator_api.post(f"{BASE}/proxies/", {"name": "new", "url": MASKED}, format="json")
    assert created.status_code == 422 and not Proxy.objects.filter(name="new").exists()

    typed = "http://egress-user:new-password-7@egress.internal:3128"
    changed = operator_api.patch(f"{BASE}/proxies/egress/", {"url": typed}, format="json")
    assert changed.status_code == 200 and changed.json()["url"] == MASKED
    assert stored_url() == typed


def test_operator_latency_reads_show_the_proxy_url_masked(proxy, operator_api):
    LatencySampleFactory(account=AccountFactory(proxy=proxy), proxy_url=URL)
    maintenance.latency_snapshot_refresh()
    for response in (operator_api.get(f"{BASE}/latency/"), operator_api.post(f"{BASE}/latency/refresh/")):
        assert response.status_code == 200, response.content
        assert PASSWORD not in response.content.decode()
        assert [p["proxy_url"] for p in response.json()["proxies"]] == [MASKED]


# --- exports and imports ---------------------------------------------------------------


def test_exports_show_the_password_masked(proxy, staff_client, tmp_path):
    out = io.StringIO()
    call_command("pool_export", stdout=out, stderr=io.StringIO())
    call_command("pool_export", "--format", "csv", "--output", str(tmp_path), stderr=io.StringIO())
    exported = staff_client.post(reverse("admin:accounts_proxy_export"), {"format": "0", "resource": "0"})
    texts = [out.getvalue(), (tmp_path / "proxies.csv").read_text(), exported.content.decode()]
    for text in texts:
        assert PASSWORD not in text and MASKED in text
    assert json.loads(out.getvalue())["proxies"] == [{"name": "egress", "url": MASKED}]


def test_an_export_imported_back_keeps_the_password(proxy, tmp_path):
    out = io.StringIO()
    call_command("pool_export", stdout=out, stderr=io.StringIO())
    (tmp_path / "pool.json").write_text(out.getvalue())
    call_command("pool_import", str(tmp_path / "pool.json"), stdout=io.StringIO(), stderr=io.StringIO())
    assert stored_url() == URL

    with pytest.raises(ImportRejected) as rejected:  # a masked password for a proxy that has none stored
        pool_import({"proxies": [{"name": "fresh", "url": MASKED.replace("egress.internal", "fresh.internal")}]})
    assert "url" in str(rejected.value) and not Proxy.objects.filter(name="fresh").exists()


@pytest.mark.parametrize("refused", [False, True])
def test_the_admin_import_page_shows_the_password_masked(staff_client, refused):
    text = f"name,url\nfresh,{URL.replace('egress.internal', 'fresh.internal')}\n"
    if refused:  # a refused row is shown back with its cells
        text += f"{'x' * 201},{URL.replace('egress.internal', 'other.internal')}\n"
    preview = staff_client.post(
        reverse("admin:accounts_proxy_import"),
        {"resource": "0", "format": "0", "import_file": SimpleUploadedFile("proxies.csv", text.encode())},
    )
    assert preview.status_code == 200 and ("confirm_form" in preview.context) is not refused
    assert PASSWORD not in preview.content.decode()
    assert MASKED.replace("egress.internal", "other.internal" if refused else "fresh.internal") in (
        preview.content.decode()
    )


# --- the gateway -----------------------------------------------------------------------


def test_dispatch_still_gives_the_gateway_the_whole_url(proxy):
    AccountFactory(identity=RoutingIdentityFactory(), proxy=proxy)
    response = Gateway(ApiKeyFactory().plaintext).dispatch()
    assert response.status_code == 200, response.content
    assert response.json()["account"]["proxy_url"] == URL


def test_a_completions_error_text_keeps_no_proxy_password():
    """A gateway's exception text often names the proxy it went through, URL
    and all. What the completion stores from it (the lease's error, the
    cooldown's reason and its event, shown in the admin, the dashboards and
    the operator API) has the password masked, as everywhere else."""
    proxy = ProxyFactory(name="egress", url="http://user:hunter2@10.0.0.1:8080")
    account = AccountFactory(name="a", proxy=proxy)
    gw = Gateway(ApiKeyFactory().plaintext)
    lease = gw.dispatch().json()["lease_id"]
    text = "ProxyError('Cannot connect to proxy http://user:hunter2@10.0.0.1:8080', socks5://u:p%40ss@h:1 too)"
    assert gw.complete(lease, outcome="rate_limited", proxy_failure=True, error_message=text).status_code == 200
    stored = [
        Lease.objects.get(pk=lease).error_message,
        RoutingIdentity.objects.get(pk=account.identity_id).cooldown_reason,
        Proxy.objects.get(pk=proxy.pk).cooldown_reason,
        *CooldownEvent.objects.values_list("reason", flat=True),
    ]
    assert len(stored) >= 4
    for reason in stored:
        assert "hunter2" not in reason and "p%40ss" not in reason
        assert "http://user:***@10.0.0.1:8080" in reason
