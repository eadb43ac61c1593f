"""Finding one's way: the site root, the admin's titles, its "View site" link
and its links to the dashboards."""

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.urls import reverse

pytestmark = pytest.mark.django_db

DASHBOARD = reverse("dashboard:index")
LOGIN = reverse("admin:login")


def test_root_sends_staff_to_the_dashboard(staff_client):
    response = staff_client.get("/")
    assert response.status_code == 302 and response.url == DASHBOARD


def test_root_sends_staff_who_may_not_view_the_dashboard_to_the_admin(client, django_user_model):
    client.force_login(django_user_model.objects.create_user(username="op", password="pw", is_staff=True))
    response = client.get("/")
    assert response.status_code == 302 and response.url == reverse("admin:index")


def test_root_sends_anyone_else_to_the_login_then_the_dashboard(client, django_user_model):
    response = client.get("/")
    assert response.status_code == 302 and response.url == f"{LOGIN}?next={DASHBOARD}"

    django_user_model.objects.create_superuser(username="op", password="a-long-password")
    login = client.post(response.url, {"username": "op", "password": "a-long-password", "next": DASHBOARD})
    assert login.status_code == 302 and login.url == DASHBOARD
    assert client.get(login.url).status_code == 200


def test_root_sends_a_logged_in_non_staff_user_to_the_login(client, django_user_model):
    client.force_login(django_user_model.objects.create_user(username="member", password="pw"))
    response = client.get("/")
    assert response.status_code == 302 and response.url.startswith(LOGIN)


def test_root_only_answers_get():
    from django.test import Client

    assert Client().post("/").status_code == 405


def test_the_admin_is_titled_kiropool_and_links_the_dashboards(staff_client):
    assert (admin.site.site_header, admin.site.site_title) == ("kiropool", "kiropool")
    page = staff_client.get(reverse("admin:index")).content.decode()
    assert "<title>kiropool administration | kiropool</title>" in page
    assert f'<a href="{reverse("admin:index")}">kiropool</a>' in page
    assert f'<a href="{DASHBOARD}">View site</a>' in page
    assert 'id="kiropool-dashboards"' in page
    assert f'<a href="{DASHBOARD}">Account pool</a>' in page
    assert f'<a href="{DASHBOARD}?state=abnormal">Accounts needing attention</a>' in page


OVERVIEW_VIEWS = ["view_account", "view_routingidentity", "view_proxy", "view_latencysnapshot"]


@pytest.mark.parametrize("held", [[], OVERVIEW_VIEWS[:-1], ["view_account", "view_sessionbinding"]])
def test_the_admin_links_no_dashboard_a_staff_user_may_not_view(client, django_user_model, held):
    # The dashboard answers them 403: no "View site", no dashboard links on the index; the docs stay.
    user = django_user_model.objects.create_user(username="op", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=held))
    client.force_login(user)
    assert client.get(DASHBOARD).status_code == 403
    for url in (reverse("admin:index"), reverse("admin:password_change"), reverse("admin:accounts_account_changelist")):
        response = client.get(url)
        assert response.status_code in (200, 403), url
        page = response.content.decode()
        assert "View site" not in page and f'href="{DASHBOARD}' not in page, url
    assert f'<a href="{reverse("docs")}">API docs</a>' in client.get(reverse("admin:index")).content.decode()


def test_the_admin_links_the_dashboard_to_a_staff_user_who_may_view_it(client, django_user_model):
    user = django_user_model.objects.create_user(username="op", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=OVERVIEW_VIEWS))
    client.force_login(user)
    assert client.get(DASHBOARD).status_code == 200
    page = client.get(reverse("admin:index")).content.decode()
    assert f'<a href="{DASHBOARD}">View site</a>' in page
    assert f'<a href="{DASHBOARD}?state=abnormal">Accounts needing attention</a>' in page


def test_the_login_page_is_titled_kiropool(client):
    page = client.get(LOGIN).content.decode()
    assert "kiropool" in page and "Django administration" not in page
