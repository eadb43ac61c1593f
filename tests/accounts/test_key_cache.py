"""The per-process key cache (accounts/authentication.py, KeyCache): a
gateway request reads no key row while the cache holds it, an operator's save
is seen at once in the process that made it and, on PostgreSQL, any change
(SQL included) in every process once the database's notice arrives
(tests/security/test_key_revocation.py across a real server's workers);
on SQLite other processes' changes within the cache's lifetime; and the
key's own limits hold exactly as without it."""

from __future__ import annotations

import time

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.authentication import KEY_CHANNEL, key_cache
from accounts.models import ApiKey
from core import listener
from tests.factories import AccountFactory, ApiKeyFactory
from tests.routing.gateway import Gateway
from tests.support import test_database_url, until

pytestmark = [pytest.mark.django_db]

# Long enough that a busy machine never lets an entry expire mid-test (a 0.5 s
# lifetime once ran out between two requests in CI); the one test of expiry
# sets a short lifetime of its own.
LIFETIME = 60.0
SHORT_LIFETIME = 0.5


@pytest.fixture(autouse=True)
def _cache_on(settings):
    settings.KIROPOOL_KEY_CACHE_SECONDS = LIFETIME
    if connection.vendor == "postgresql":
        # On PostgreSQL a process keeps keys only while its listener is
        # connected (another process's save reaches it there).
        listener.ensure()
        assert listener.ready(10), "the listener never connected"


@pytest.fixture
def key():
    AccountFactory(name="a", identity__max_concurrency=8)
    return ApiKeyFactory(name="gateway")


def _key_reads(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith("SELECT") and f"FROM {ApiKey._meta.db_table} " in q["sql"]]


def test_a_cached_key_costs_no_query(key):
    gw = Gateway(key.plaintext)
    with CaptureQueriesContext(connection) as first:
        assert gw.explain().status_code == 200
    assert len(_key_reads(first.captured_queries)) == 1  # read, and cached
    with CaptureQueriesContext(connection) as second:
        assert gw.explain().status_code == 200
    assert _key_reads(second.captured_queries) == []


def test_a_wrong_secret_with_a_cached_keys_prefix_is_refused(key):
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200
    forged = key.plaintext[:-4] + ("AAAA" if not key.plaintext.endswith("AAAA") else "BBBB")
    assert Gateway(forged).explain().status_code == 401


def test_disabling_a_key_in_the_admin_refuses_it_at_once(key, staff_client):
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200
    page = staff_client.get(reverse("admin:accounts_apikey_change", args=[key.pk]))
    form = page.context["adminform"].form
    data = {name: form[name].value() for name in form.fields if form[name].value() is not None}
    data.pop("enabled")
    data["model_preferences"] = "{}"
    saved = staff_client.post(reverse("admin:accounts_apikey_change", args=[key.pk]), data)
    assert saved.status_code == 302, saved.context["adminform"].form.errors if saved.context else saved
    assert ApiKey.objects.get(pk=key.pk).enabled is False
    assert gw.explain().status_code == 401


def test_disabling_a_key_over_the_operator_api_refuses_it_at_once(key, operator_api):
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200
    assert operator_api.patch(f"/api/v1/admin/keys/{key.pk}/", {"enabled": False}, format="json").status_code == 200
    assert gw.explain().status_code == 401


def test_disabling_a_key_with_the_admins_bulk_action_refuses_it_at_once(key, staff_client):
    """The action updates a queryset, which sends no post_save: the process
    forgets the key all the same (on SQLite no notice would reach it)."""
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200  # cached
    response = staff_client.post(
        reverse("admin:accounts_apikey_changelist"), {"action": "disable", "_selected_action": [key.pk]}
    )
    assert response.status_code == 302
    assert gw.explain().status_code == 401


def test_a_change_the_process_did_not_see_counts_within_the_lifetime(key, settings):
    settings.KIROPOOL_KEY_CACHE_SECONDS = SHORT_LIFETIME
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200
    # No signal here, and on PostgreSQL the test's transaction never commits,
    # so no notice either: as on SQLite in another process.
    ApiKey.objects.filter(pk=key.pk).update(enabled=False)
    time.sleep(SHORT_LIFETIME + 0.1)
    assert gw.explain().status_code == 401


def test_the_keys_limit_holds_with_a_cached_key(key):
    key.max_concurrency = 1
    key.save()
    gw = Gateway(key.plaintext)
    first = gw.dispatch()
    assert first.status_code == 200
    # At its limit: refused at once, not after a wait, though the cached row
    # said nothing was in flight.
    started = time.monotonic()
    limited = gw.dispatch(max_wait_ms=10_000)
    assert limited.status_code == 429 and "concurrency" in limited.json()["error"]["message"]
    assert time.monotonic() - started < 2.0  # at once; slack for a busy machine
    # Freed: the next dispatch is served, though the row cached while it was
    # full would have said otherwise.
    assert gw.complete(first.json()["lease_id"], outcome="success").status_code == 200
    assert gw.dispatch().status_code == 200


def test_the_keys_limit_is_checked_before_waiting_when_every_identity_is_full(key):
    key.max_concurrency = 1
    key.save()
    AccountFactory(name="b", identity__max_concurrency=1)
    other = Gateway(ApiKeyFactory(name="other").plaintext)
    gw = Gateway(key.plaintext)
    assert gw.dispatch(exclude_accounts=["b"]).status_code == 200  # the key is at its limit
    assert other.dispatch(exclude_accounts=["a"]).status_code == 200  # b is full
    # a still has room, so exclude it: every candidate is full, and the key
    # too. The key's limit answers at once; the dispatch does not wait.
    started = time.monotonic()
    limited = gw.dispatch(exclude_accounts=["a"], max_wait_ms=5_000)
    assert limited.status_code == 429 and "concurrency" in limited.json()["error"]["message"]
    assert time.monotonic() - started < 2.0


def test_a_key_row_read_before_a_forget_is_not_kept_after_it(key):
    # A request reads the row, an operator's save makes the process forget
    # the key, then the request would keep the row it read before the save.
    read_at = key_cache.generation()
    row = ApiKey.objects.get(pk=key.pk)
    key_cache.forget(key.prefix)
    key_cache.put(row, read_at=read_at)
    assert key_cache.get(key.prefix) is None
    key_cache.put(row, read_at=key_cache.generation())  # read after it: kept
    assert key_cache.get(key.prefix) is row


def test_when_notices_may_have_been_missed_every_key_is_forgotten(key):
    key_cache.put(ApiKey.objects.get(pk=key.pk), read_at=key_cache.generation())
    key_cache.heard(None)  # what the listener says once it connects again
    assert key_cache.get(key.prefix) is None


def test_a_key_saved_in_another_process_is_forgotten_here(key, postgres_only):
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200  # kept
    assert key_cache.get(key.prefix) is not None
    # The notice another process's save sends (accounts/signals.py), from a
    # connection of its own.
    with psycopg.connect(test_database_url(), autocommit=True) as other:
        other.execute("SELECT pg_notify(%s, %s)", [KEY_CHANNEL, key.prefix])
    until(lambda: key_cache.get(key.prefix) is None, 10, what="the notice never reached the cache")


def _sql(statement: str, params: list) -> None:
    """``statement`` run and committed by another connection, as a shell or a restore script would."""
    with psycopg.connect(test_database_url(), autocommit=True) as other:
        other.execute(statement, params)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "change",
    [
        "UPDATE accounts_apikey SET enabled = false WHERE id = %s",
        "UPDATE accounts_apikey SET expires_at = now() - interval '1 hour' WHERE id = %s",
        "DELETE FROM accounts_apikey WHERE id = %s",
    ],
)
def test_a_key_changed_in_sql_is_refused_at_once_in_every_process(key, change, postgres_only):
    """No ORM, no signal: the database's trigger sends the notice (migration
    accounts/0008), and the cache forgets the key long before its lifetime."""
    gw = Gateway(key.plaintext)
    assert gw.explain().status_code == 200
    assert key_cache.get(key.prefix) is not None
    _sql(change, [key.pk])
    until(lambda: key_cache.get(key.prefix) is None, 10, what="the change's notice never reached the cache")
    assert gw.explain().status_code == 401


@pytest.mark.django_db(transaction=True)
def test_what_the_gateway_path_writes_on_a_key_sends_no_notice(key, postgres_only):
    """A lease start writes the key's pacing, a request its last use: a
    notice for those would empty every process's cache of the key at every
    dispatch. Only the change of its configuration is heard."""
    with psycopg.connect(test_database_url(), autocommit=True) as heard:
        heard.execute(f"LISTEN {KEY_CHANNEL}")
        _sql("UPDATE accounts_apikey SET last_started_at = now(), last_used_at = now() WHERE id = %s", [key.pk])
        Gateway(key.plaintext).dispatch()  # the gateway's own writes, through the app
        _sql("UPDATE accounts_apikey SET name = 'renamed' WHERE id = %s", [key.pk])
        notices = [n.payload for n in heard.notifies(timeout=2.0, stop_after=2)]
    assert notices == [key.prefix]
