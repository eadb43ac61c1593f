"""`make demo`: the seeded pool, and a short run through the real HTTP API."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from accounts.models import Account, ApiKey, Pool, Proxy, RoutingIdentity
from routing.demo.pool import DEMO_USER_NOTE, demo_login, demo_login_remove, demo_pool_seed
from routing.models import LatencySnapshot, Lease, LeaseOutcome, SessionBinding
from tests.factories import AccountFactory


@pytest.mark.django_db
def test_the_demo_pool_is_replaced_on_every_run_and_touches_nothing_else():
    mine = AccountFactory(name="production-account")
    first = demo_pool_seed()
    second = demo_pool_seed()
    assert first != second

    accounts = Account.objects.filter(name__startswith="demo-")
    assert RoutingIdentity.objects.filter(name__startswith="demo-").count() == 12
    assert accounts.count() == 15  # three identities have an alias
    assert set(accounts.values_list("pool", flat=True)) == {Pool.BALANCED, Pool.CREDIT_FIRST}
    assert Proxy.objects.filter(name__startswith="demo-").count() == 2
    keys = ApiKey.objects.filter(name__startswith="demo-")
    assert keys.count() == 2
    # the keys reach the demo accounts only
    for key in keys:
        assert set(key.account_group.accounts.values_list("name", flat=True)) == set(
            accounts.values_list("name", flat=True)
        )
    assert Account.objects.filter(pk=mine.pk).exists()


@pytest.mark.django_db
def test_the_demo_login_works_with_the_printed_password(client):
    login = demo_login()
    assert client.login(username=login.username, password=login.password)
    again = demo_login()
    assert again.password != login.password and again.token == login.token


@pytest.mark.django_db(transaction=True)
def test_a_short_demo_run_goes_through_the_http_api(live_server):
    # The test server's in-memory SQLite database locks a whole table per
    # writer, so concurrent clients only work on PostgreSQL.
    clients = 3 if connection.vendor == "postgresql" else 1
    out = io.StringIO()
    # Seeded: on SQLite's one client the run is only a few requests, and an
    # unseeded one sometimes had no successful request with a session.
    call_command("demo", duration=4, url=live_server.url, clients=clients, seed=7, serve=False, stdout=out)
    text = out.getvalue()
    assert not get_user_model().objects.filter(username="demo").exists()  # the login went with the demo
    assert f"{live_server.url}/dashboard/" in text
    assert "kp_" in text and "login       demo / " in text
    assert Lease.objects.filter(outcome=LeaseOutcome.SUCCESS).exists()
    assert not Lease.objects.filter(completed_at__isnull=True).exists()  # every lease was reported
    assert SessionBinding.objects.exists()
    assert LatencySnapshot.objects.exists()


@pytest.mark.django_db
def test_the_demo_refuses_a_database_with_other_pool_data_unless_forced():
    AccountFactory(name="production-account")
    with pytest.raises(CommandError, match="1 accounts.*--force"):
        call_command("demo", duration=0, url="http://127.0.0.1:9", serve=False, stdout=io.StringIO())
    assert not get_user_model().objects.filter(username="demo").exists()  # refused before anything was made
    assert not Account.objects.filter(name__startswith="demo-").exists()


@pytest.mark.django_db
def test_the_demo_login_is_removed_when_the_demo_stops():
    login = demo_login()
    user = get_user_model().objects.get(username=login.username)
    assert user.is_superuser and user.first_name == DEMO_USER_NOTE
    # A login of the same name that the demo did not make is left alone.
    get_user_model().objects.create_user(username="someone-else", first_name="an operator")
    demo_login_remove(login)
    assert not get_user_model().objects.filter(username=login.username).exists()
    assert get_user_model().objects.filter(username="someone-else").exists()
