"""One gateway key cannot hurt the others (issue 11 §4): each attack, tried
as a hostile or runaway key would, and failing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import ApiKey, Proxy, RoutingIdentity
from routing import maintenance, sessions
from routing.models import LatencySample, SessionBinding
from tests.factories import AccountFactory, ApiKeyFactory, ProxyFactory, SessionBindingFactory
from tests.routing.gateway import Gateway

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("statements")]


def test_a_key_without_its_own_limit_cannot_hold_every_slot(settings):
    settings.KIROPOOL_KEY_MAX_CONCURRENCY = 3
    AccountFactory(name="big", identity__max_concurrency=10)
    greedy = Gateway(ApiKeyFactory(name="greedy").plaintext)
    held = [greedy.dispatch(max_wait_ms=0) for _ in range(4)]
    assert [r.status_code for r in held] == [200, 200, 200, 429]
    assert "concurrency limit" in held[3].json()["error"]["message"]
    assert ApiKey.objects.get(name="greedy").in_flight == 3
    # Everyone else still gets a slot.
    assert Gateway(ApiKeyFactory(name="polite").plaintext).dispatch(max_wait_ms=0).status_code == 200
    # A completion gives the greedy key its slot back.
    assert greedy.complete(held[0].json()["lease_id"], outcome="success").status_code == 200
    assert ApiKey.objects.get(name="greedy").in_flight == 2
    assert greedy.dispatch(max_wait_ms=0).status_code == 200


def test_a_key_with_its_own_limit_uses_it_instead_of_the_default(settings):
    settings.KIROPOOL_KEY_MAX_CONCURRENCY = 1
    AccountFactory(identity__max_concurrency=10)
    gw = Gateway(ApiKeyFactory(max_concurrency=2).plaintext)
    assert [gw.dispatch(max_wait_ms=0).status_code for _ in range(3)] == [200, 200, 429]


def test_a_sticky_session_counts_against_the_key_too(settings):
    settings.KIROPOOL_KEY_MAX_CONCURRENCY = 1
    account = AccountFactory(identity__max_concurrency=10)
    key = ApiKeyFactory()
    SessionBindingFactory(api_key=key, account=account, session_id="conv")
    gw = Gateway(key.plaintext)
    first = gw.dispatch(session_id="conv", max_wait_ms=0)
    assert first.json()["session"] == "sticky"
    assert gw.dispatch(session_id="conv", max_wait_ms=0).status_code == 429
    gw.complete(first.json()["lease_id"], outcome="success")
    assert gw.dispatch(session_id="conv", max_wait_ms=0).status_code == 200
    assert ApiKey.objects.get(pk=key.pk).in_flight == 1


def test_a_flood_of_new_sessions_evicts_its_own_bindings_first(settings):
    # Capacity 10, each key's share 5.
    settings.KIROPOOL_AFFINITY_KEY_SHARE = 0.5
    account = AccountFactory()
    victim, flooder = ApiKeyFactory(name="victim"), ApiKeyFactory(name="flooder")
    now = timezone.now()
    # The victim's sessions are older (least recently updated): a plain LRU
    # eviction would take them first.
    for i in range(3):
        sessions.session_bind(key=victim, session_id=f"v{i}", account_id=account.pk, now=now - timedelta(hours=1))
    for i in range(12):
        sessions.session_bind(key=flooder, session_id=f"f{i}", account_id=account.pk, now=now - timedelta(minutes=i))
    expired, evicted = sessions.binding_purge(max_entries=10)
    assert (expired, evicted) == (0, 5)  # 15 bindings for 10 places: all five from the flooder
    assert SessionBinding.objects.filter(api_key=victim).count() == 3
    # The flooder keeps its seven most recent, still over its share of 5.
    assert set(SessionBinding.objects.filter(api_key=flooder).values_list("session_id", flat=True)) == {
        f"f{i}" for i in range(7)
    }
    assert sessions.binding_purge(max_entries=10) == (0, 0)  # idempotent


def test_over_capacity_with_every_key_within_its_share_the_oldest_go(settings):
    settings.KIROPOOL_AFFINITY_KEY_SHARE = 0.5
    account = AccountFactory()
    now = timezone.now()
    for n, key in enumerate(ApiKeyFactory.create_batch(3)):
        for i in range(2):  # 2 each: every key within its share of 2
            age = timedelta(minutes=10 * n + i)
            sessions.session_bind(key=key, session_id=f"k{n}-{i}", account_id=account.pk, now=now - age)
    assert sessions.binding_purge(max_entries=4) == (0, 2)
    assert set(SessionBinding.objects.values_list("session_id", flat=True)) == {"k0-0", "k0-1", "k1-0", "k1-1"}


def test_a_runaway_key_cannot_bench_the_pool_with_rate_limit_reports(settings):
    settings.KIROPOOL_CAPACITY_REPORT_RATE = "2/d"  # a day's window: the test never straddles two
    for i in range(4):
        AccountFactory(name=f"a{i}", identity__max_concurrency=5)
    hostile = Gateway(ApiKeyFactory(name="hostile").plaintext)
    answers = []
    for _ in range(4):
        lease = hostile.dispatch().json()["lease_id"]
        answers.append(hostile.complete(lease, outcome="rate_limited", cooldown_seconds=900).json())
    assert [a["report_applied"] for a in answers] == [True, True, False, False]
    # Every lease was released all the same; two identities cooled, and the
    # other two still serve everyone.
    assert RoutingIdentity.objects.filter(in_flight__gt=0).count() == 0
    assert RoutingIdentity.objects.filter(cooldown_until__gt=timezone.now()).count() == 2
    assert Gateway(ApiKeyFactory().plaintext).dispatch(max_wait_ms=0).status_code == 200


def test_quota_and_proxy_failure_reports_are_rate_limited_too(settings):
    settings.KIROPOOL_CAPACITY_REPORT_RATE = "1/d"  # a day's window: the test never straddles two
    proxy = ProxyFactory(url="http://shared-proxy:1")
    AccountFactory(name="p1", proxy=proxy, identity__max_concurrency=5)
    AccountFactory(name="p2", proxy=proxy, identity__max_concurrency=5)
    hostile = Gateway(ApiKeyFactory().plaintext)
    first = hostile.dispatch().json()["lease_id"]
    assert hostile.complete(first, outcome="quota_exhausted").json()["report_applied"] is True
    second = hostile.dispatch().json()["lease_id"]
    answer = hostile.complete(second, outcome="rate_limited", proxy_failure=True).json()
    assert answer["report_applied"] is False
    assert Proxy.objects.get(pk=proxy.pk).cooldown_until is None


def test_one_absurd_first_token_time_moves_the_global_average_only_so_far(settings):
    settings.KIROPOOL_MAX_FIRST_TOKEN_MS = 60_000
    AccountFactory(name="a")
    gw = Gateway(ApiKeyFactory().plaintext)
    for ms in [500.0] * 9 + [3_600_000.0]:
        lease = gw.dispatch().json()["lease_id"]
        gw.complete(lease, outcome="success", first_token_ms=ms)
    assert max(LatencySample.objects.values_list("first_token_ms", flat=True)) == 60_000
    snapshot = maintenance.latency_snapshot_refresh()
    # (9 · 500 + 60 000) / 10, not (9 · 500 + 3 600 000) / 10 = 360 450.
    assert snapshot.global_avg_ms == pytest.approx(6_450.0)
