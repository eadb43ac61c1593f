"""The session affinity store (SPEC §3): key-scoped bindings in the database,
TTL, capacity, and the per-account counts the spread key reads."""

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import Account
from routing import sessions
from routing.dispatch import DispatchRequest
from routing.models import SessionBinding
from routing.selectors import dispatch as reads
from tests.factories import AccountFactory, ApiKeyFactory, SessionBindingFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("statements")]


def _read(key, session_id=None, now=None):
    request = DispatchRequest(session_id=session_id)
    return reads.read(key=key, request=request, now=now or timezone.now(), snapshot=None, spread=False)


def lookup(key, session_id, now=None):
    found = _read(key, session_id, now)
    return next((row.candidate.account for row in found.rows if row.account_id == found.bound_account_id), None)


def live_counts(key, now=None):
    return {row.candidate.account: row.candidate.bound_sessions for row in _read(key, now=now).rows}


def test_bind_then_lookup_and_rebind_moves_the_count():
    key = ApiKeyFactory()
    a, b = AccountFactory(name="a"), AccountFactory(name="b")
    sessions.session_bind(key=key, session_id="conv", account_id=a.pk)
    assert lookup(key, "conv") == "a"
    assert live_counts(key) == {"a": 1, "b": 0}
    sessions.session_bind(key=key, session_id="conv", account_id=b.pk)
    assert lookup(key, "conv") == "b"
    assert live_counts(key) == {"a": 0, "b": 1}
    assert SessionBinding.objects.count() == 1


def test_bind_refreshes_ttl(settings):
    settings.KIROPOOL_AFFINITY_TTL_SECONDS = 600
    key = ApiKeyFactory()
    account = AccountFactory()
    start = timezone.now()
    sessions.session_bind(key=key, session_id="conv", account_id=account.pk, now=start)
    sessions.session_bind(key=key, session_id="conv", account_id=account.pk, now=start + timedelta(seconds=300))
    binding = SessionBinding.objects.get()
    assert binding.created_at == start
    assert binding.updated_at == start + timedelta(seconds=300)
    assert binding.expires_at == start + timedelta(seconds=900)


def test_bindings_are_key_scoped():
    one, two = ApiKeyFactory(), ApiKeyFactory()
    a, b = AccountFactory(name="a"), AccountFactory(name="b")
    sessions.session_bind(key=one, session_id="same", account_id=a.pk)
    sessions.session_bind(key=two, session_id="same", account_id=b.pk)
    assert (lookup(one, "same"), lookup(two, "same")) == ("a", "b")
    # counts span every key
    assert live_counts(one) == {"a": 1, "b": 1}


@pytest.mark.parametrize("session_id", ["k:1", "1|k", "a\tb", "*", "%", "_", "conv\\", "’quoted’"])
def test_ids_that_look_like_separators_or_wildcards_match_exactly(session_id):
    key = ApiKeyFactory()
    exact, other = AccountFactory(name="exact"), AccountFactory(name="other")
    sessions.session_bind(key=key, session_id=session_id, account_id=exact.pk)
    sessions.session_bind(key=key, session_id=session_id + "x", account_id=other.pk)
    assert lookup(key, session_id) == "exact"
    assert lookup(key, session_id + "x") == "other"
    assert lookup(key, "nothing") is None


def test_expired_binding_is_ignored_at_once_and_not_counted():
    key = ApiKeyFactory()
    account = AccountFactory(name="a")
    now = timezone.now()
    SessionBindingFactory(
        api_key=key, session_id="old", account=account, updated_at=now - timedelta(hours=7), expires_at=now
    )
    SessionBindingFactory(api_key=key, session_id="live", account=account)
    assert lookup(key, "old", now=now) is None
    assert lookup(key, "live", now=now) == "a"
    assert live_counts(key, now=now) == {"a": 1}
    # the row is still there until the purge: the count skips it anyway
    assert Account.objects.get(pk=account.pk).binding_rows == 2


def test_purge_deletes_expired_then_evicts_least_recently_updated():
    key = ApiKeyFactory()
    account = AccountFactory(name="a")
    now = timezone.now()
    for i in range(3):
        SessionBindingFactory(
            api_key=key, session_id=f"dead-{i}", account=account, updated_at=now - timedelta(hours=7), expires_at=now
        )
    for i in range(5):
        sessions.session_bind(key=key, session_id=f"s{i}", account_id=account.pk, now=now + timedelta(seconds=i))
    expired, evicted = sessions.binding_purge(now=now + timedelta(seconds=10), max_entries=2)
    assert (expired, evicted) == (3, 3)
    assert sorted(SessionBinding.objects.values_list("session_id", flat=True)) == ["s3", "s4"]
    assert Account.objects.get(pk=account.pk).binding_rows == 2
    assert live_counts(key, now=now + timedelta(seconds=10)) == {"a": 2}


def test_purge_twice_is_harmless():
    key = ApiKeyFactory()
    account = AccountFactory()
    now = timezone.now()
    for i in range(4):
        sessions.session_bind(key=key, session_id=f"s{i}", account_id=account.pk, now=now + timedelta(seconds=i))
    assert sessions.binding_purge(now=now + timedelta(seconds=5), max_entries=3) == (0, 1)
    assert sessions.binding_purge(now=now + timedelta(seconds=5), max_entries=3) == (0, 0)
    assert SessionBinding.objects.count() == Account.objects.get().binding_rows == 3
