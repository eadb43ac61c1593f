"""The dispatcher through its HTTP API: each behaviour of the reference
gateway and its tests, rewritten against the database-backed selector."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import Account, ApiKey, RoutingIdentity
from routing.models import LatencySample, Lease, SessionBinding, StickyOutcome
from tests.factories import (
    AccountFactory,
    AccountGroupFactory,
    ApiKeyFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
    latency_snapshot_create,
)
from tests.routing.gateway import Gateway

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("statements")]


def snapshot(*, global_avg=500.0, accounts=None, proxies=None, age=timedelta(0)):
    return latency_snapshot_create(
        generated_at=timezone.now() - age,
        window_seconds=3600,
        global_avg_ms=global_avg,
        sample_count=100,
        accounts={name: [n, avg] for name, (n, avg) in (accounts or {}).items()},
        proxies={url: [n, avg] for url, (n, avg) in (proxies or {}).items()},
    )


def bind(key, session_id, account, **fields):
    return SessionBindingFactory(api_key=key, session_id=session_id, account=account, **fields)


# --- ordering ---------------------------------------------------------------


def test_credit_order_then_least_recently_started_rotation(gw):
    AccountFactory(name="rich", pool="credit_first", remaining_credits=100)
    AccountFactory(name="poor", pool="credit_first", remaining_credits=10)
    ApiKey.objects.update(preferred_pool="credit_first")
    # credit_first: the richest account wins every time while it has a slot
    assert [gw.cycle() for _ in range(3)] == ["rich", "rich", "rich"]
    Account.objects.update(pool="balanced", remaining_credits=50)
    ApiKey.objects.update(preferred_pool="balanced")
    # balanced ties rotate by last started: never-started first, then earliest
    served = [gw.cycle() for _ in range(4)]
    assert served == ["poor", "rich", "poor", "rich"]


def test_cooled_proxy_sorts_last_but_still_serves(gw):
    cooled = ProxyFactory(url="http://cooled:1", cooldown_until=timezone.now() + timedelta(minutes=5))
    AccountFactory(name="a-behind-cooled-proxy", proxy=cooled)
    AccountFactory(name="z-direct")
    assert gw.cycle() == "z-direct"
    assert gw.cycle() == "z-direct"
    Account.objects.filter(name="z-direct").update(enabled=False)
    assert gw.cycle() == "a-behind-cooled-proxy"


def test_low_latency_account_and_proxy_lead(gw):
    fast_proxy = ProxyFactory(url="http://fast:1")
    slow_proxy = ProxyFactory(url="http://slow:1")
    AccountFactory(name="a-slow", proxy=slow_proxy)
    AccountFactory(name="b-fast", proxy=fast_proxy)
    AccountFactory(name="c-fast-account", proxy=slow_proxy)
    snapshot(
        accounts={"a-slow": (50, 1500.0), "b-fast": (50, 100.0), "c-fast-account": (50, 100.0)},
        proxies={"http://fast:1": (50, 100.0), "http://slow:1": (50, 1500.0)},
    )
    order = [c["account"] for c in gw.explain().json()["candidates"]]
    assert order == ["b-fast", "c-fast-account", "a-slow"]
    assert gw.cycle() == "b-fast"
    assert gw.cycle() == "b-fast"


@pytest.mark.parametrize("disable", ["key", "stale_snapshot", "no_snapshot"])
def test_latency_ignored_when_disabled_or_stale(gw, key, disable):
    AccountFactory(name="a-slow")
    AccountFactory(name="b-fast")
    if disable == "key":
        ApiKey.objects.filter(pk=key.pk).update(latency_routing_enabled=False)
    if disable != "no_snapshot":
        age = timedelta(minutes=6) if disable == "stale_snapshot" else timedelta(0)
        snapshot(accounts={"a-slow": (50, 5000.0), "b-fast": (50, 50.0)}, age=age)
    explained = gw.explain().json()
    assert all(c["latency_band"] is None for c in explained["candidates"])
    assert explained["latency"]["usable"] is False
    # plain rotation: the slow account still gets its turn
    assert sorted(gw.cycle() for _ in range(2)) == ["a-slow", "b-fast"]


def test_fresh_snapshot_bands_are_used(gw):
    AccountFactory(name="a-slow")
    AccountFactory(name="b-fast")
    snapshot(accounts={"a-slow": (50, 5000.0), "b-fast": (50, 50.0)})
    explained = gw.explain().json()
    assert explained["latency"]["usable"] is True
    assert [c["account"] for c in explained["candidates"]] == ["b-fast", "a-slow"]
    assert [gw.cycle() for _ in range(3)] == ["b-fast"] * 3


def test_no_sample_account_and_one_14_percent_faster_share_band_0_and_alternate(gw):
    AccountFactory(name="measured")
    AccountFactory(name="fresh")
    # G = 500; 20 samples at 375 ms smooth to 400 and score 430 (14 % under G)
    snapshot(accounts={"measured": (20, 375.0)})
    bands = {c["account"]: c["latency_band"] for c in gw.explain().json()["candidates"]}
    assert bands == {"measured": 0, "fresh": 0}
    served = [gw.cycle() for _ in range(4)]
    assert served[0::2] == [served[0]] * 2 and served[1::2] == [served[1]] * 2
    assert set(served) == {"measured", "fresh"}


# --- sessions ---------------------------------------------------------------


def test_new_session_binds_on_success_and_sticks(gw, key):
    AccountFactory(name="a")
    AccountFactory(name="b")
    first = gw.dispatch(session_id="conv-1").json()
    assert first["session"] == "new"
    done = gw.complete(first["lease_id"], outcome="success", first_token_ms=420)
    assert done.json() == {
        "lease_id": first["lease_id"],
        "account": first["account"]["name"],
        "outcome": "success",
        "session_bound": True,
        "report_applied": True,
    }
    for _ in range(3):
        again = gw.dispatch(session_id="  conv-1 ")
        assert again.json()["session"] == "sticky"
        assert again.json()["account"]["name"] == first["account"]["name"]
        gw.complete(again.json()["lease_id"], outcome="success")
    assert LatencySample.objects.get().first_token_ms == 420
    binding = SessionBinding.objects.get()
    assert (binding.api_key, binding.session_id) == (key, "conv-1")


def test_failed_request_does_not_bind(gw):
    AccountFactory(name="a")
    lease = gw.dispatch(session_id="conv").json()["lease_id"]
    assert gw.complete(lease, outcome="retry_next").json()["session_bound"] is False
    assert not SessionBinding.objects.exists()


def test_sticky_account_used_when_immediately_available(gw, key):
    bound = AccountFactory(name="z-bound")
    AccountFactory(name="a-other")
    bind(key, "conv", bound)
    response = gw.dispatch(session_id="conv").json()
    assert response["session"] == "sticky"
    assert response["account"]["name"] == "z-bound"
    assert response["waited_ms"] == 0


def test_sticky_moves_without_waiting_when_identity_throttled_and_the_key_has_no_patience(gw, key):
    ApiKey.objects.filter(pk=key.pk).update(sticky_patience_ms=0)
    bound = AccountFactory(name="bound")
    AccountFactory(name="other")
    bind(key, "conv", bound)
    holder = Gateway(ApiKeyFactory().plaintext)
    held = holder.dispatch(exclude_accounts=["other"]).json()
    assert held["account"]["name"] == "bound"  # its identity's only slot is taken
    response = gw.dispatch(session_id="conv", max_wait_ms=5000).json()
    assert response["account"]["name"] == "other"
    assert response["session"] == "sticky"
    assert response["waited_ms"] < 1000
    assert Lease.objects.get(pk=response["lease_id"]).moved_from == "bound"


def test_sticky_skipped_when_bound_account_is_excluded_or_disabled(gw, key):
    bound = AccountFactory(name="bound")
    AccountFactory(name="other")
    bind(key, "conv", bound)
    assert gw.cycle(session_id="conv", exclude_accounts=["bound"]) == "other"
    Account.objects.filter(pk=bound.pk).update(enabled=False)
    assert gw.cycle(session_id="conv") == "other"
    # Bound to an account that is not a candidate: still a sticky session, moved.
    bind(key, "conv-2", bound)
    response = gw.dispatch(session_id="conv-2").json()
    assert (response["account"]["name"], response["session"]) == ("other", "sticky")
    lease = Lease.objects.get(pk=response["lease_id"])
    assert (lease.sticky, lease.moved_from) == (StickyOutcome.MOVED, "bound")


def test_a_session_bound_outside_the_keys_group_moves_and_names_its_account():
    """The key's group changed under a live binding: the bound account is no
    candidate, and the session is still sticky, moved from it."""
    outside = AccountFactory(name="outside")
    inside = AccountFactory(name="inside")
    grouped = ApiKeyFactory(account_group=AccountGroupFactory(accounts=[inside]))
    bind(grouped, "conv", outside)
    response = Gateway(grouped.plaintext).dispatch(session_id="conv").json()
    assert (response["account"]["name"], response["session"]) == ("inside", "sticky")
    lease = Lease.objects.get(pk=response["lease_id"])
    assert (lease.sticky, lease.moved_from) == (StickyOutcome.MOVED, "outside")


def test_new_session_goes_to_least_bound_identity_even_when_slower(gw, key):
    fast = AccountFactory(name="fast")
    AccountFactory(name="slow")
    snapshot(accounts={"fast": (50, 100.0), "slow": (50, 2000.0)})
    other_key = ApiKeyFactory()
    for i in range(3):
        bind(other_key, f"s{i}", fast)  # counts span every key
    assert gw.account_of() == "fast"  # stateless: latency decides
    assert gw.account_of(session_id="brand-new") == "slow"


def test_spread_counts_sum_per_routing_identity_not_per_account(gw, key):
    shared = RoutingIdentityFactory(name="shared-user")
    alpha = AccountFactory(name="alpha", identity=shared, remaining_credits=10)
    AccountFactory(name="beta", identity=shared, remaining_credits=1000)
    gamma = AccountFactory(name="gamma", remaining_credits=1)
    for i in range(3):
        bind(key, f"a{i}", alpha)
    bind(key, "g0", gamma)
    explained = gw.explain(session_id="new-one").json()["candidates"]
    assert [(c["account"], c["session_count"]) for c in explained] == [("gamma", 1), ("beta", 3), ("alpha", 3)]
    assert gw.account_of(session_id="new-one") == "gamma"


def test_session_counts_skip_expired_bindings(gw, key):
    crowded = AccountFactory(name="a-crowded")
    AccountFactory(name="b-empty")
    past = timezone.now() - timedelta(hours=1)
    for i in range(5):
        bind(key, f"old{i}", crowded, updated_at=past - timedelta(hours=7), expires_at=past)
    counts = {c["account"]: c["session_count"] for c in gw.explain(session_id="x").json()["candidates"]}
    assert counts == {"a-crowded": 0, "b-empty": 0}
    # and an expired binding is not sticky
    assert gw.explain(session_id="old0").json()["session"] == "new"


def test_sessions_are_key_scoped(gw, key):
    a = AccountFactory(name="a")
    b = AccountFactory(name="b")
    other = ApiKeyFactory()
    bind(key, "shared-id", a)
    bind(other, "shared-id", b)
    assert gw.explain(session_id="shared-id").json()["bound_account"] == "a"
    assert Gateway(other.plaintext).explain(session_id="shared-id").json()["bound_account"] == "b"


@pytest.mark.parametrize("session_id", ["a:b", "key|session", "a/b\\c", "üñí©ødé", "%s", "' OR 1=1 --", "a" * 512])
def test_session_ids_that_look_like_separators(gw, key, session_id):
    a = AccountFactory(name="a")
    AccountFactory(name="b")
    bind(key, session_id, a)
    bind(key, session_id[:1], AccountFactory(name="c"))
    response = gw.dispatch(session_id=session_id)
    assert response.status_code == 200
    assert response.json()["account"]["name"] == "a"


def test_model_preference_comes_first(gw, key):
    AccountFactory(name="a-general")
    AccountFactory(name="z-opus")
    ApiKey.objects.filter(pk=key.pk).update(model_preferences={"claude-opus": ["z-opus"]})
    assert gw.account_of(model="claude-opus") == "z-opus"
    assert gw.account_of(model="other-model") == "a-general"


def test_route_strategies(key):
    in_group = AccountFactory(name="in-group")
    AccountFactory(name="a-outside")
    grouped = ApiKeyFactory(account_group=AccountGroupFactory(accounts=[in_group]))
    fixed = ApiKeyFactory(route_strategy="fixed", fixed_account=in_group)
    assert Gateway(grouped.plaintext).cycle() == "in-group"
    assert Gateway(fixed.plaintext).cycle() == "in-group"
    assert Gateway(key.plaintext).cycle() == "a-outside"


# --- completion outcomes ---------------------------------------------------


def test_rate_limited_cools_identity_and_optionally_proxy(gw):
    proxy = ProxyFactory(url="http://p:1")
    account = AccountFactory(name="a", proxy=proxy)
    lease = gw.dispatch().json()["lease_id"]
    gw.complete(lease, outcome="rate_limited", cooldown_seconds=5000, proxy_failure=True, error_message="429")
    identity = RoutingIdentity.objects.get(pk=account.identity_id)
    left = (identity.cooldown_until - timezone.now()).total_seconds()
    assert 890 < left <= 900  # capped at 900 s
    proxy.refresh_from_db()
    assert proxy.cooldown_until == identity.cooldown_until
    assert identity.in_flight == 0


def test_rate_limited_default_cooldown_without_proxy_failure(gw):
    proxy = ProxyFactory()
    account = AccountFactory(name="a", proxy=proxy)
    gw.complete(gw.dispatch().json()["lease_id"], outcome="rate_limited")
    identity = RoutingIdentity.objects.get(pk=account.identity_id)
    assert 295 < (identity.cooldown_until - timezone.now()).total_seconds() <= 300
    proxy.refresh_from_db()
    assert proxy.cooldown_until is None


def test_quota_exhaustion_covers_every_alias(gw):
    shared = RoutingIdentityFactory()
    AccountFactory(name="alias-1", identity=shared)
    AccountFactory(name="alias-2", identity=shared)
    AccountFactory(name="elsewhere")
    lease = gw.dispatch(exclude_accounts=["elsewhere"]).json()["lease_id"]
    gw.complete(lease, outcome="quota_exhausted", error_message="monthly quota")
    exhausted = dict(Account.objects.values_list("name", "quota_exhausted"))
    assert exhausted == {"alias-1": True, "alias-2": True, "elsewhere": False}
    assert [gw.cycle() for _ in range(2)] == ["elsewhere", "elsewhere"]


def test_positive_credits_bring_an_exhausted_account_back(gw):
    AccountFactory(name="a", identity=RoutingIdentityFactory(max_concurrency=3))
    first, second, third = (gw.dispatch().json()["lease_id"] for _ in range(3))
    gw.complete(first, outcome="quota_exhausted")
    assert gw.dispatch().status_code == 503
    gw.complete(second, outcome="retry_next", remaining_credits=0)
    assert gw.dispatch().status_code == 503  # zero credits is not a way back
    gw.complete(third, outcome="fatal", remaining_credits=42.5)
    account = Account.objects.get(name="a")
    assert (account.quota_exhausted, account.remaining_credits) == (False, 42.5)
    assert gw.cycle() == "a"


@pytest.mark.parametrize("outcome", ["retry_next", "fatal"])
def test_retry_next_and_fatal_only_release(gw, outcome):
    account = AccountFactory(name="a")
    gw.complete(gw.dispatch(session_id="s").json()["lease_id"], outcome=outcome, first_token_ms=100)
    identity = RoutingIdentity.objects.get(pk=account.identity_id)
    assert (identity.in_flight, identity.cooldown_until) == (0, None)
    assert not SessionBinding.objects.exists() and not LatencySample.objects.exists()
    assert not Account.objects.get().quota_exhausted


def test_lease_ttl_and_in_flight_accounting(gw, settings):
    account = AccountFactory(name="a")
    RoutingIdentity.objects.filter(pk=account.identity_id).update(max_concurrency=2)
    first = gw.dispatch().json()
    gw.dispatch()
    lease = Lease.objects.get(pk=first["lease_id"])
    assert abs((lease.expires_at - lease.started_at).total_seconds() - settings.KIROPOOL_LEASE_TTL_SECONDS) < 1
    assert RoutingIdentity.objects.get(pk=account.identity_id).in_flight == 2
    assert gw.dispatch(max_wait_ms=0).status_code == 429
    # a lease past its TTL stops counting at once, before any reaper runs
    Lease.objects.filter(pk=first["lease_id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert gw.dispatch(max_wait_ms=0).status_code == 200
    assert Lease.objects.get(pk=first["lease_id"]).outcome == "expired"
    assert RoutingIdentity.objects.get(pk=account.identity_id).in_flight == 2


# --- errors -----------------------------------------------------------------


def error_of(response):
    return response.status_code, response.json()["error"]["type"]


@pytest.mark.parametrize(
    "body",
    [
        {"session_id": "x\x00y"},
        {"max_wait_ms": -1},
        {"max_wait_ms": 300_001},
        {"max_wait_ms": "soon"},
        {"session_id": "x" * 513},
        {"session_id": 12},
        {"exclude_accounts": "a"},
        {"exclude_accounts": [["nested"]]},
        {"exclude_accounts": ["a"] * 257},
        {"model": ["x"]},
    ],
)
def test_dispatch_400(gw, body):
    AccountFactory()
    response = gw.dispatch(**body)
    assert error_of(response) == (400, "invalid_request_error")
    assert response.json()["error"]["message"]
    assert not Lease.objects.exists()


def test_dispatch_400_for_malformed_json_and_non_object(gw):
    AccountFactory()
    bad = gw.client.post("/api/v1/dispatch", "{not json", content_type="application/json")
    listed = gw.client.post("/api/v1/dispatch", [1, 2], format="json")
    assert error_of(bad) == (400, "invalid_request_error")
    assert error_of(listed) == (400, "invalid_request_error")
    assert not Lease.objects.exists()


def test_session_id_of_512_chars_is_fine_and_blank_means_none(gw):
    AccountFactory(identity=RoutingIdentityFactory(max_concurrency=5))
    assert gw.dispatch(session_id="x" * 512).json()["session"] == "new"
    # Trimmed before its length is checked: 512 characters between spaces.
    padded = gw.dispatch(session_id="  " + "y" * 512 + "\t")
    assert padded.status_code == 200, padded.content
    assert Lease.objects.get(pk=padded.json()["lease_id"]).session_id == "y" * 512
    assert gw.dispatch(session_id="   ").json()["session"] == "none"
    assert gw.dispatch(session_id=None).json()["session"] == "none"


@pytest.mark.parametrize("header", [{}, {"HTTP_AUTHORIZATION": "Bearer kp_nope_nope"}, {"HTTP_X_API_KEY": "garbage"}])
def test_dispatch_401(header):
    from rest_framework.test import APIClient

    AccountFactory()
    response = APIClient().post("/api/v1/dispatch", {}, format="json", **header)
    assert error_of(response) == (401, "authentication_error")
    assert "Bearer" in response["WWW-Authenticate"]


def test_disabled_and_expired_keys_get_401(key):
    AccountFactory()
    ApiKey.objects.filter(pk=key.pk).update(enabled=False)
    assert Gateway(key.plaintext).dispatch().status_code == 401
    ApiKey.objects.filter(pk=key.pk).update(enabled=True, expires_at=timezone.now() - timedelta(seconds=1))
    assert Gateway(key.plaintext).dispatch().status_code == 401


def test_x_api_key_header_works(key):
    from rest_framework.test import APIClient

    AccountFactory(name="a")
    response = APIClient().post("/api/v1/dispatch", {}, format="json", HTTP_X_API_KEY=key.plaintext)
    assert response.status_code == 200


def test_complete_errors(gw):
    AccountFactory()
    lease = gw.dispatch().json()["lease_id"]
    other = Gateway(ApiKeyFactory().plaintext)
    assert error_of(other.complete(lease, outcome="success")) == (404, "not_found_error")
    assert error_of(gw.complete("00000000-0000-0000-0000-000000000000", outcome="success")) == (404, "not_found_error")
    assert gw.client.post("/api/v1/leases/not-a-uuid/complete", {}, format="json").status_code == 404
    assert error_of(gw.complete(lease, outcome="teleported")) == (400, "invalid_request_error")
    assert error_of(gw.complete(lease, outcome="expired")) == (400, "invalid_request_error")
    assert error_of(gw.complete(lease, outcome="success", first_token_ms=-5)) == (400, "invalid_request_error")
    # Past an hour a first-token time is no measurement: refused, not clipped.
    assert error_of(gw.complete(lease, outcome="success", first_token_ms=3_600_001)) == (400, "invalid_request_error")
    assert error_of(gw.complete(lease, outcome="rate_limited", cooldown_seconds=-1)) == (400, "invalid_request_error")
    assert Lease.objects.get(pk=lease).completed_at is None
    assert gw.complete(lease, outcome="success", first_token_ms=10).status_code == 200


def test_complete_twice_is_409_and_changes_nothing(gw):
    account = AccountFactory()
    lease = gw.dispatch(session_id="s").json()["lease_id"]
    assert gw.complete(lease, outcome="success", first_token_ms=100).status_code == 200
    before = (
        list(Lease.objects.values()),
        list(SessionBinding.objects.values()),
        LatencySample.objects.count(),
        RoutingIdentity.objects.get(pk=account.identity_id).in_flight,
    )
    again = gw.complete(lease, outcome="rate_limited", first_token_ms=999)
    assert error_of(again) == (409, "conflict_error")
    after = (
        list(Lease.objects.values()),
        list(SessionBinding.objects.values()),
        LatencySample.objects.count(),
        RoutingIdentity.objects.get(pk=account.identity_id).in_flight,
    )
    assert after == before
    assert RoutingIdentity.objects.get(pk=account.identity_id).cooldown_until is None


def test_complete_twice_takes_nothing_from_the_keys_capacity_reports(gw, settings):
    # A gateway retrying a completion whose answer it lost (the Python client
    # does, and counts the 409 as done) must not spend the key's budget of
    # capacity-taking reports: the second completion changes nothing.
    settings.KIROPOOL_CAPACITY_REPORT_RATE = "1/d"  # a day's window: the test never straddles two
    AccountFactory(name="a", identity__max_concurrency=5)
    AccountFactory(name="b", identity__max_concurrency=5)
    lease = gw.dispatch().json()["lease_id"]
    assert gw.complete(lease, outcome="success").status_code == 200
    assert error_of(gw.complete(lease, outcome="rate_limited")) == (409, "conflict_error")
    assert error_of(gw.complete(lease, outcome="quota_exhausted")) == (409, "conflict_error")
    second = gw.dispatch().json()["lease_id"]
    answer = gw.complete(second, outcome="rate_limited").json()
    assert answer["report_applied"] is True
    assert RoutingIdentity.objects.filter(cooldown_until__gt=timezone.now()).count() == 1


def test_429_when_every_candidate_is_cooling(gw):
    soon = timezone.now() + timedelta(seconds=42.3)
    AccountFactory(identity=RoutingIdentityFactory(cooldown_until=soon))
    AccountFactory(identity=RoutingIdentityFactory(cooldown_until=soon + timedelta(minutes=5)))
    response = gw.dispatch()
    assert error_of(response) == (429, "rate_limit_error")
    assert response["Retry-After"] in {"42", "43"}


def test_429_when_locally_throttled_past_the_wait_budget(gw):
    AccountFactory(identity=RoutingIdentityFactory(max_concurrency=1))
    assert gw.dispatch().status_code == 200
    response = gw.dispatch(max_wait_ms=50)
    assert error_of(response) == (429, "rate_limit_error")
    assert int(response["Retry-After"]) >= 1
    assert Lease.objects.count() == 1


def test_pacing_waits_instead_of_failing(gw):
    AccountFactory(identity=RoutingIdentityFactory(max_concurrency=5, min_start_interval_ms=1000))
    first = gw.dispatch().json()
    assert first["waited_ms"] == 0
    assert gw.dispatch(max_wait_ms=0).status_code == 429
    paced = gw.dispatch(max_wait_ms=3000).json()
    # It waited rather than failed, and started no sooner than the interval
    # after the first (the server's own clock: however long this thread took
    # between the requests, up to the 1 s interval). Woken at the end of the
    # interval, not of its 3 s budget: slack 1.5 s for a busy machine.
    gap = Lease.objects.get(pk=paced["lease_id"]).started_at - Lease.objects.get(pk=first["lease_id"]).started_at
    assert gap >= timedelta(milliseconds=1000)
    assert 0 < paced["waited_ms"] <= 2500


def test_key_limits_answer_429_at_once(key):
    AccountFactory(identity=RoutingIdentityFactory(max_concurrency=10))
    ApiKey.objects.filter(pk=key.pk).update(max_concurrency=1)
    gw = Gateway(key.plaintext)
    first = gw.dispatch().json()
    limited = gw.dispatch(max_wait_ms=10_000)
    assert error_of(limited) == (429, "rate_limit_error")
    assert "concurrency" in limited.json()["error"]["message"]
    gw.complete(first["lease_id"], outcome="success")
    assert ApiKey.objects.get(pk=key.pk).in_flight == 0
    ApiKey.objects.filter(pk=key.pk).update(max_concurrency=None, min_start_interval_ms=60_000, last_started_at=None)
    assert gw.dispatch().status_code == 200
    paced = gw.dispatch()
    assert error_of(paced) == (429, "rate_limit_error")
    assert 55 <= int(paced["Retry-After"]) <= 60


def test_502_when_every_account_of_the_key_is_excluded(gw):
    AccountFactory(name="a")
    AccountFactory(name="b")
    AccountFactory(name="off", enabled=False)
    response = gw.dispatch(exclude_accounts=["a", "b"])
    assert error_of(response) == (502, "api_error")
    assert response.json()["error"]["message"] == "all eligible accounts failed for this request"


def test_502_when_the_excluded_accounts_are_also_exhausted(gw):
    # The read drops exhausted accounts; the request still excluded all of them.
    AccountFactory(name="spent", quota_exhausted=True)
    AccountFactory(name="dry", remaining_credits=0)
    AccountFactory(name="off", enabled=False)
    assert error_of(gw.dispatch(exclude_accounts=["spent", "dry"])) == (502, "api_error")
    # One enabled account not excluded (exhausted, so no candidate): nothing usable.
    assert error_of(gw.dispatch(exclude_accounts=["spent"])) == (503, "api_error")


def test_503_when_a_healthy_account_is_excluded_and_the_one_left_is_spent(gw):
    """The read finds the excluded account, and nothing else it may hand
    out; an enabled account the request did not exclude is exhausted."""
    AccountFactory(name="healthy")
    AccountFactory(name="spent", quota_exhausted=True)
    assert error_of(gw.dispatch(exclude_accounts=["healthy"])) == (503, "api_error")
    assert error_of(gw.dispatch(exclude_accounts=["healthy", "spent"])) == (502, "api_error")


def test_503_when_no_usable_account(gw):
    response = gw.dispatch()
    assert error_of(response) == (503, "api_error")
    AccountFactory(enabled=False)
    AccountFactory(quota_exhausted=True)
    assert error_of(gw.dispatch()) == (503, "api_error")


def test_explain_names_a_live_binding_when_no_account_is_a_candidate(gw, key):
    """SPEC §2: a session is sticky when a live binding of (key, session id)
    exists, whatever its account's state; explain says so, and names the
    account, even when nothing is selectable (the dispatch's 503)."""
    bound = AccountFactory(name="a")
    bind(key, "s", bound)
    Account.objects.filter(pk=bound.pk).update(enabled=False)
    body = gw.explain(session_id="s").json()
    assert body["candidates"] == []
    assert (body["session"], body["bound_account"]) == ("sticky", "a")
    assert gw.explain(session_id="other").json()["session"] == "new"


def test_explain_changes_nothing(gw, key):
    AccountFactory(name="a")
    bind(key, "s", Account.objects.get())
    before = (list(RoutingIdentity.objects.values()), list(SessionBinding.objects.values()))
    explained = gw.explain(session_id="s")
    assert explained.status_code == 200
    body = explained.json()
    assert body["session"] == "sticky" and body["bound_account"] == "a"
    assert set(body["candidates"][0]) == {
        "account",
        "routing_identity",
        "pool",
        "proxy_in_cooldown",
        "model_preferred",
        "session_count",
        "pool_rank",
        "latency_band",
        "latency_score_ms",
        "last_started_at",
        "remaining_credits_sort",
        "credit_burn_per_hour",
        "quota_resets_at",
        "quota_probe",
        "cooldown_remaining_s",
        "ejected_remaining_s",
        "in_flight",
        "held_for_sticky",
        "effective_concurrency",
        "max_concurrency",
        "can_start",
    }
    assert {"sticky_patience_ms", "sticky_would_wait", "unselectable"} <= set(body)
    assert (list(RoutingIdentity.objects.values()), list(SessionBinding.objects.values())) == before
    assert not Lease.objects.exists()
    assert error_of(gw.explain(max_wait_ms=-1)) == (400, "invalid_request_error")


# --- cost -------------------------------------------------------------------


def _queries(ctx) -> list[str]:
    """The statements a request ran, transaction control left out (the test's
    own transaction turns each ``atomic`` into a savepoint)."""
    return [q["sql"] for q in ctx.captured_queries if "SAVEPOINT" not in q["sql"]]


# Queries per dispatch, the key lookup included, whatever the pool's size.
# "fast" (PostgreSQL's one-statement writes): a bound session is served by one
# statement (read the bound account, claim, insert the lease); any other
# dispatch reads the head of the order and claims in one statement, and a
# fresh session first finds no bound account. "fast-lookup" (a key of mostly
# new sessions): a session's binding is looked up first, and a bound one is
# then served by that one statement. "orm" (SQLite, or PostgreSQL
# with KIROPOOL_FAST_STATEMENTS off): the claim locks the identity's row if
# it can start, locks a free slot of the key and marks it taken, updates the
# identity and inserts the lease, in one transaction.
DISPATCH_QUERIES = {
    "fast": {None: 3, "fresh": 4, "bound": 2},
    "fast-lookup": {None: 3, "fresh": 4, "bound": 3},
    "orm": {None: 7, "fresh": 8, "bound": 7},
}


@pytest.mark.parametrize("session", [None, "fresh", "bound"])
def test_dispatch_issues_a_fixed_number_of_queries(gw, key, session, statements):
    def pool(size):
        Account.objects.all().delete()
        RoutingIdentity.objects.all().delete()
        accounts = [AccountFactory(proxy=ProxyFactory()) for _ in range(size)]
        for i, account in enumerate(accounts):
            bind(ApiKeyFactory(), f"other-{size}-{i}", account)
        if session == "bound":
            SessionBinding.objects.filter(api_key=key).delete()
            bind(key, "bound", accounts[0])
        snapshot()
        gw.cycle()  # warm the key's last-used stamp and the snapshot cache

    body = {"session_id": session} if session else {}
    counts = []
    for size in (2, 40):
        pool(size)
        with CaptureQueriesContext(connection) as ctx:
            assert gw.dispatch(**body).status_code == 200
        counts.append(len(_queries(ctx)))
    expected = DISPATCH_QUERIES[statements][session]
    assert counts == [expected, expected]


# Queries per completion of a success with a first-token time, the key lookup
# included. "fast": release (key and identity), sample, binding upsert and
# NOTIFY in one statement. "orm": read the lease, close it, release the key's
# slot and the identity's, record the sample, upsert the binding (with a
# session), NOTIFY on PostgreSQL.
COMPLETION_QUERIES = {"fast": {None: 2, "conv": 2}, "fast-lookup": {None: 2, "conv": 2}, "orm": {None: 6, "conv": 7}}


@pytest.mark.parametrize("session", [None, "conv"])
def test_completion_issues_a_fixed_number_of_queries(gw, session, statements):
    AccountFactory.create_batch(3)
    body = {"session_id": session} if session else {}
    gw.cycle(**body)  # warm the key's last-used stamp
    lease = gw.dispatch(**body).json()["lease_id"]
    with CaptureQueriesContext(connection) as ctx:
        assert gw.complete(lease, outcome="success", first_token_ms=250).status_code == 200
    notify = 1 if statements == "orm" and connection.vendor == "postgresql" else 0
    assert len(_queries(ctx)) == COMPLETION_QUERIES[statements][session] + notify, _queries(ctx)
