"""The pool looks after itself (issue 12): empty balances, quota resets and
probes, outlier ejection with slow start, credit pacing, excluded aliases
still counting, waking when a cooldown ends, and sticky patience.

Through the gateway API, with the fast statements on and off on PostgreSQL.
Timing assertions state their slack; they hold on a busy 2-core machine."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from accounts.models import Account, ApiKey, RoutingIdentity
from routing import quotas
from routing.models import CooldownEvent, CooldownKind, Lease, StickyOutcome
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory, SessionBindingFactory
from tests.routing.gateway import Gateway
from tests.support import run_queued_behind, until

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("statements")]


def names(response) -> list[str]:
    return [c["account"] for c in response.json()["candidates"]]


def unselectable(response) -> dict[str, str]:
    return {u["account"]: u["reason"] for u in response.json()["unselectable"]}


# --- a known empty balance is not selectable (SPEC §2, issue 12 §3) ---------------------------


def test_an_account_with_a_known_empty_balance_is_not_handed_out(gw):
    AccountFactory(name="empty", remaining_credits=0)
    AccountFactory(name="poor", remaining_credits=40, min_remaining_credits=50)
    AccountFactory(name="rich", remaining_credits=500, min_remaining_credits=50)
    AccountFactory(name="unknown")
    assert {gw.cycle() for _ in range(4)} == {"rich", "unknown"}
    explained = gw.explain()
    assert sorted(names(explained)) == ["rich", "unknown"]
    assert unselectable(explained) == {
        "empty": "credits_at_or_below_minimum",
        "poor": "credits_at_or_below_minimum",
    }


def test_a_reported_empty_balance_takes_the_account_out_and_a_positive_one_brings_it_back(gw):
    AccountFactory(name="only")
    lease = gw.dispatch().json()["lease_id"]
    gw.complete(lease, outcome="success", remaining_credits=0)
    assert gw.dispatch(max_wait_ms=0).status_code == 503
    account = Account.objects.get(name="only")
    # Without a known reset time it gets a probe later, like an exhausted account.
    assert account.quota_next_probe_at > timezone.now() + timedelta(minutes=59)
    Account.objects.filter(pk=account.pk).update(remaining_credits=12)
    assert gw.cycle() == "only"


def test_an_empty_balance_reported_again_later_waits_a_whole_probe_interval(gw, settings):
    """The account went empty, its probe brought it back with a positive
    balance, and later it reports an empty one again: the probe time left
    from the first spell is long past, and the wait starts anew."""
    settings.KIROPOOL_QUOTA_PROBE_SECONDS = 600
    AccountFactory(name="only")
    gw.complete(gw.dispatch().json()["lease_id"], outcome="success", remaining_credits=0)
    Account.objects.update(quota_next_probe_at=timezone.now() - timedelta(seconds=1))
    probe = gw.dispatch(max_wait_ms=0).json()["lease_id"]
    assert Lease.objects.get(pk=probe).quota_probe
    gw.complete(probe, outcome="success", remaining_credits=50)
    assert gw.cycle() == "only"
    # The probe time the probe set is past by the time the balance runs out again.
    Account.objects.update(quota_next_probe_at=timezone.now() - timedelta(minutes=5))
    gw.complete(gw.dispatch().json()["lease_id"], outcome="success", remaining_credits=0)
    assert gw.dispatch(max_wait_ms=0).status_code == 503  # no probe at once
    assert Account.objects.get().quota_next_probe_at > timezone.now() + timedelta(minutes=9)


def test_the_dashboard_counts_accounts_without_credits_apart(staff_client):
    AccountFactory(name="empty", remaining_credits=0)
    AccountFactory(name="fine", remaining_credits=10)
    page = staff_client.get("/dashboard/?state=spent")
    assert page.context["summary"].spent == 1
    assert [row.name for row in page.context["rows"]] == ["empty"]


# --- quota resets and the half-open probe (issue 12 §4) ------------------------------------------


def test_an_exhausted_account_returns_at_its_reset_time_with_every_alias(gw, key):
    identity = RoutingIdentityFactory(name="kiro-user")
    AccountFactory(name="a", identity=identity)
    AccountFactory(name="b", identity=identity)
    lease = gw.dispatch().json()["lease_id"]
    soon = timezone.now() + timedelta(hours=1)
    gw.complete(lease, outcome="quota_exhausted", quota_resets_at=soon.isoformat())
    assert gw.dispatch(max_wait_ms=0).status_code == 503
    assert set(Account.objects.values_list("quota_resets_at", flat=True)) == {soon}

    # The reset time passes: the read lets both aliases in at once ...
    Account.objects.update(quota_resets_at=timezone.now() - timedelta(seconds=1))
    assert gw.cycle() in {"a", "b"}
    # ... and the periodic task records the reset and clears the state.
    assert quotas.quota_resets_apply() == 2
    assert not Account.objects.filter(quota_exhausted=True).exists()
    assert set(Account.objects.values_list("quota_resets_at", flat=True)) == {None}
    events = CooldownEvent.objects.filter(kind=CooldownKind.QUOTA_RESET)
    assert events.count() == 2 and {e.reason for e in events} == {"the quota reset time came"}


@pytest.mark.parametrize("report", [{"outcome": "quota_exhausted"}, {"outcome": "success", "remaining_credits": 0}])
def test_a_quota_spent_again_after_its_reset_takes_the_account_out(gw, report):
    """The reset time came, the read let the account in at once, and a
    lease started since reports the quota spent again (the periodic task
    has not run yet): the reset is applied first, and the report takes the
    account out until its probe, instead of the passed reset time letting
    it in and the task clearing the report."""
    AccountFactory(name="a", quota_exhausted=True, quota_resets_at=timezone.now() - timedelta(seconds=1))
    lease = gw.dispatch(max_wait_ms=0).json()["lease_id"]
    assert gw.complete(lease, **report).status_code == 200
    assert gw.dispatch(max_wait_ms=0).status_code == 503
    account = Account.objects.get()
    assert account.quota_resets_at is None and account.quota_next_probe_at > timezone.now()
    assert CooldownEvent.objects.filter(kind=CooldownKind.QUOTA_RESET, reason="the quota reset time came").exists()
    quotas.quota_resets_apply()
    assert gw.dispatch(max_wait_ms=0).status_code == 503  # the task has nothing left to undo


def test_a_quota_spent_again_while_the_reset_task_runs_stays_spent(gw, monkeypatch):
    """The periodic task found the identity's reset time passed; before it
    applies the reset, a lease started since the reset time reports the
    quota spent again (its completion applies the reset, then the report).
    The task must see that the reset is done, not apply it once more over
    the report and hand the spent account out again."""
    AccountFactory(name="a", quota_exhausted=True, quota_resets_at=timezone.now() - timedelta(seconds=1))
    lease = gw.dispatch(max_wait_ms=0).json()["lease_id"]
    reset, landed = quotas._identity_reset, []

    def completion_lands_first(**kwargs):
        if not landed:  # the task's call; the completion's own goes straight through
            landed.append(None)
            landed[0] = gw.complete(lease, outcome="quota_exhausted").status_code
        return reset(**kwargs)

    monkeypatch.setattr(quotas, "_identity_reset", completion_lands_first)
    quotas.quota_resets_apply()
    assert landed == [200]
    account = Account.objects.get()
    assert account.quota_exhausted and account.quota_next_probe_at > timezone.now()
    assert gw.dispatch(max_wait_ms=0).status_code == 503


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_reset_task_queued_behind_a_completion_that_spent_the_quota_again_leaves_its_report():
    """The same on PostgreSQL, with the task queued on the aliases' rows: the
    completion has applied the reset and reported the quota spent again, and
    has not committed. The task, which read the reset as due, waits for its
    rows; once the completion commits, it sees the reset done, not the
    accounts as it read them before it waited."""
    account = AccountFactory(name="a", quota_exhausted=True, quota_resets_at=timezone.now() - timedelta(seconds=1))

    def completion(cursor) -> None:  # committed while the task waits for the account's row
        cursor.execute(  # the reset applied, then the exhaustion reported
            "UPDATE accounts_account SET quota_resets_at = NULL, quota_exhausted = true,"
            " quota_exhausted_at = now(), quota_next_probe_at = now() + interval '1 hour' WHERE id = %s",
            [account.pk],
        )

    assert run_queued_behind(completion, quotas.quota_resets_apply) == 0
    account.refresh_from_db()
    assert account.quota_exhausted and account.quota_next_probe_at > timezone.now()


def test_a_quota_reported_spent_by_a_lease_out_across_the_reset_is_left_to_the_reset(gw):
    """The lease started before the reset time, which came while it was
    out: its report may tell of the quota before the reset, so the reset
    still lets the account in."""
    AccountFactory(name="a")
    lease = gw.dispatch().json()["lease_id"]
    Lease.objects.filter(pk=lease).update(started_at=timezone.now() - timedelta(minutes=1))
    Account.objects.update(quota_resets_at=timezone.now() - timedelta(seconds=1))
    assert gw.complete(lease, outcome="quota_exhausted").status_code == 200
    assert gw.cycle() == "a"
    assert quotas.quota_resets_apply() == 1
    assert not Account.objects.get().quota_exhausted


def test_a_reported_reset_time_more_than_a_year_ahead_is_refused(gw):
    AccountFactory()
    lease = gw.dispatch().json()["lease_id"]
    far = (timezone.now() + timedelta(days=367)).isoformat()
    assert gw.complete(lease, outcome="quota_exhausted", quota_resets_at=far).status_code == 422
    assert Lease.objects.get(pk=lease).completed_at is None  # nothing changed
    assert Account.objects.get().quota_resets_at is None


def test_operators_set_the_reset_time_over_the_api(operator_api):
    AccountFactory(name="a")
    when = (timezone.now() + timedelta(days=3)).replace(microsecond=0)
    response = operator_api.patch(
        "/api/v1/admin/accounts/a/", {"quota_resets_at": when.isoformat(), "min_remaining_credits": 25}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["quota_resets_at"].startswith(when.strftime("%Y-%m-%dT%H:%M:%S"))
    account = Account.objects.get(name="a")
    assert (account.quota_resets_at, account.min_remaining_credits) == (when, 25.0)


def test_a_reported_reset_time_must_lie_in_the_future(gw):
    AccountFactory()
    lease = gw.dispatch().json()["lease_id"]
    past = (timezone.now() - timedelta(minutes=1)).isoformat()
    response = gw.complete(lease, outcome="success", quota_resets_at=past)
    assert response.status_code == 422  # well-formed, against a rule the schema cannot state
    assert Lease.objects.get(pk=lease).completed_at is None  # nothing changed


def test_without_a_reset_time_one_probe_lease_goes_through_then_the_wait_restarts(gw, settings):
    settings.KIROPOOL_QUOTA_PROBE_SECONDS = 600
    AccountFactory(name="spent", identity__max_concurrency=5)
    lease = gw.dispatch().json()["lease_id"]
    gw.complete(lease, outcome="quota_exhausted")
    assert gw.dispatch(max_wait_ms=0).status_code == 503
    # The probe interval passes: exactly one lease may go through.
    Account.objects.update(quota_next_probe_at=timezone.now() - timedelta(seconds=1))
    probe = gw.dispatch(max_wait_ms=0)
    assert probe.status_code == 200
    assert Lease.objects.get(pk=probe.json()["lease_id"]).quota_probe
    assert gw.dispatch(max_wait_ms=0).status_code == 503  # one probe at a time
    assert CooldownEvent.objects.filter(kind=CooldownKind.QUOTA_PROBE).count() == 1
    # Another exhaustion restarts the wait.
    gw.complete(probe.json()["lease_id"], outcome="quota_exhausted")
    account = Account.objects.get()
    assert account.quota_exhausted and account.quota_next_probe_at > timezone.now() + timedelta(minutes=9)
    # The next probe succeeds: the account is back.
    Account.objects.update(quota_next_probe_at=timezone.now() - timedelta(seconds=1))
    again = gw.dispatch(max_wait_ms=0).json()["lease_id"]
    assert gw.complete(again, outcome="success").status_code == 200
    assert not Account.objects.get().quota_exhausted
    assert [gw.cycle() for _ in range(2)] == ["spent", "spent"]


@pytest.mark.parametrize("report", [{"outcome": "quota_exhausted"}, {"outcome": "success", "remaining_credits": 7}])
def test_a_lease_out_when_its_account_moved_reports_on_the_identity_it_started_on(gw, operator_api, report):
    """README Decisions, "A lease reports on the identity it started on": the
    account moves to another identity while its lease is out; the quota the
    lease reports is the old upstream user's (its exhaustion benches the old
    aliases, not the moved account's new ones), its slot is given back
    there, and a balance, the account's own (SPEC §2), lands on the account."""
    old, new = RoutingIdentityFactory(name="old"), RoutingIdentityFactory(name="new")
    AccountFactory(name="moved", identity=old)
    lease = gw.dispatch().json()["lease_id"]
    AccountFactory(name="stays", identity=old)
    AccountFactory(name="new-alias", identity=new)
    assert operator_api.patch("/api/v1/admin/accounts/moved/", {"identity": "new"}, format="json").status_code == 200
    assert gw.complete(lease, **report).status_code == 200
    exhausted = report["outcome"] == "quota_exhausted"
    spent = dict(Account.objects.values_list("name", "quota_exhausted"))
    assert spent == {"moved": False, "stays": exhausted, "new-alias": False}
    assert Account.objects.get(name="moved").remaining_credits == report.get("remaining_credits")
    assert dict(RoutingIdentity.objects.values_list("name", "in_flight")) == {"old": 0, "new": 0}


# --- outlier ejection with slow start (issue 12 §5) ------------------------------------------


def fail(gw, times: int, **body) -> None:
    for _ in range(times):
        lease = gw.dispatch(max_wait_ms=0, **body).json()["lease_id"]
        assert gw.complete(lease, outcome="retry_next").status_code == 200


def test_an_identity_failing_every_time_is_ejected_and_the_time_doubles(gw, settings):
    settings.KIROPOOL_EJECTION_FAILURES = 3
    settings.KIROPOOL_EJECTION_BASE_SECONDS = 30
    settings.KIROPOOL_EJECTION_MAX_SECONDS = 100
    AccountFactory(name="broken", identity__max_concurrency=4)
    AccountFactory(name="fine")
    fail(gw, 2, exclude_accounts=["fine"])
    assert RoutingIdentity.objects.get(name=Account.objects.get(name="broken").identity.name).ejected_until is None
    fail(gw, 1, exclude_accounts=["fine"])
    identity = Account.objects.get(name="broken").identity
    assert 29 <= (identity.ejected_until - timezone.now()).total_seconds() <= 30
    assert [gw.cycle() for _ in range(3)] == ["fine"] * 3  # out of selection
    explained = gw.explain().json()["candidates"]
    assert {c["account"]: c["ejected_remaining_s"] for c in explained}["broken"] == 30
    event = CooldownEvent.objects.get(kind=CooldownKind.EJECTED)
    assert event.identity_id == identity.pk and "3 failed completions in a row" in event.reason
    # Back, and failing again at once: twice as long; then capped.
    RoutingIdentity.objects.filter(pk=identity.pk).update(ejected_until=timezone.now() - timedelta(minutes=5))
    fail(gw, 3, exclude_accounts=["fine"])
    identity.refresh_from_db()
    assert 59 <= (identity.ejected_until - timezone.now()).total_seconds() <= 60
    RoutingIdentity.objects.filter(pk=identity.pk).update(ejected_until=timezone.now() - timedelta(minutes=5))
    fail(gw, 3, exclude_accounts=["fine"])
    identity.refresh_from_db()
    assert 99 <= (identity.ejected_until - timezone.now()).total_seconds() <= 100
    assert identity.ejections == 3


@pytest.mark.parametrize("outcome", ["retry_next", "fatal"])
def test_failures_the_gateway_abandoned_eject_nothing_and_keep_the_streak(gw, settings, outcome):
    # The gateway gave the request up itself (its caller went away) or never
    # sent it: nothing says the account failed.
    settings.KIROPOOL_EJECTION_FAILURES = 3
    AccountFactory(name="a", identity__max_concurrency=4)
    fail(gw, 2)
    for _ in range(5):
        lease = gw.dispatch(max_wait_ms=0).json()["lease_id"]
        answer = gw.complete(lease, outcome=outcome, abandoned=True)
        assert answer.status_code == 200 and answer.json()["outcome"] == outcome
    identity = RoutingIdentity.objects.get()
    assert identity.ejected_until is None and identity.failure_streak == 2  # neither counted nor ended
    fail(gw, 1)  # the third real failure in a row
    assert RoutingIdentity.objects.get().ejected_until is not None


@pytest.mark.parametrize("outcome", ["retry_next", "fatal"])
def test_an_abandoned_failure_over_the_capacity_report_rate_stays_abandoned(gw, settings, outcome):
    # A proxy failure makes the report one that takes capacity away; over the
    # key's rate of those its report is not applied, but the failure is still
    # the gateway's own: it must not count toward an ejection either.
    settings.KIROPOOL_EJECTION_FAILURES = 1
    settings.KIROPOOL_CAPACITY_REPORT_RATE = "1/d"  # a day's window: the test never straddles two
    AccountFactory(name="a", identity__max_concurrency=4)
    applied = []
    for _ in range(3):
        lease = gw.dispatch(max_wait_ms=0).json()["lease_id"]
        answer = gw.complete(lease, outcome=outcome, abandoned=True, proxy_failure=True)
        assert answer.status_code == 200
        applied.append(answer.json()["report_applied"])
    assert applied == [True, False, False]
    identity = RoutingIdentity.objects.get()
    assert identity.ejected_until is None and identity.failure_streak == 0


@pytest.mark.parametrize("outcome", ["success", "rate_limited", "quota_exhausted"])
def test_only_a_failure_can_be_abandoned(gw, outcome):
    AccountFactory(name="a")
    lease = gw.dispatch(max_wait_ms=0).json()["lease_id"]
    refused = gw.complete(lease, outcome=outcome, abandoned=True)
    assert refused.status_code == 422
    assert "abandoned" in refused.json()["error"]["message"]
    assert Lease.objects.get(pk=lease).completed_at is None  # the lease is still out
    assert gw.complete(lease, outcome=outcome).status_code == 200


def test_a_long_error_message_on_the_ejecting_failure_still_ejects(gw, settings):
    # A completion's error_message may be 2,000 characters (an upstream's
    # error page, say); the ejection's reason adds its own words to it, and
    # must still fit its column (500) rather than fail the completion.
    settings.KIROPOOL_EJECTION_FAILURES = 2
    AccountFactory(name="broken")
    fail(gw, 1)
    lease = gw.dispatch(max_wait_ms=0).json()["lease_id"]
    answer = gw.complete(lease, outcome="fatal", error_message="upstream said: " + "x" * 1985)
    assert answer.status_code == 200, answer.content
    identity = RoutingIdentity.objects.get()
    assert identity.ejections == 1 and identity.ejected_until > timezone.now()
    assert Lease.objects.get(pk=lease).outcome == "fatal"
    event = CooldownEvent.objects.get(kind=CooldownKind.EJECTED)
    assert event.reason.startswith("2 failed completions in a row (upstream said: xxx")
    assert len(event.reason) <= 500


def test_failures_of_leases_out_at_an_ejection_do_not_eject_again_even_after_it(gw, settings):
    """Six leases out; three fail and eject the identity. The ejection ends,
    then the other three fail: they were out when it was ejected, so they
    count for nothing. Three failures of leases started since do."""
    settings.KIROPOOL_EJECTION_FAILURES = 3
    AccountFactory(name="broken", identity__max_concurrency=6)
    AccountFactory(name="fine")
    leases = [gw.dispatch(exclude_accounts=["fine"]).json()["lease_id"] for _ in range(6)]
    for lease in leases[:3]:
        assert gw.complete(lease, outcome="retry_next").status_code == 200
    identity = RoutingIdentity.objects.get(name=Account.objects.get(name="broken").identity.name)
    assert identity.ejections == 1
    RoutingIdentity.objects.filter(pk=identity.pk).update(ejected_until=timezone.now() - timedelta(seconds=1))
    for lease in leases[3:]:
        assert gw.complete(lease, outcome="retry_next").status_code == 200
    identity.refresh_from_db()
    assert (identity.ejections, identity.failure_streak) == (1, 0)
    assert identity.ejected_until < timezone.now()
    fail(gw, 3, exclude_accounts=["fine"])
    identity.refresh_from_db()
    assert identity.ejections == 2 and identity.ejected_until > timezone.now()


def test_a_success_ends_the_failure_streak(gw, settings):
    settings.KIROPOOL_EJECTION_FAILURES = 3
    AccountFactory(name="flaky")
    fail(gw, 2)
    gw.cycle()
    fail(gw, 2)
    identity = RoutingIdentity.objects.get()
    assert identity.ejected_until is None and identity.failure_streak == 2


def test_every_candidate_ejected_is_a_429_until_one_returns(gw):
    AccountFactory(name="out", identity__ejected_until=timezone.now() + timedelta(seconds=42))
    response = gw.dispatch()
    assert response.status_code == 429
    assert 41 <= int(response["Retry-After"]) <= 42


def test_back_from_an_ejection_the_limit_ramps_up_from_one(gw, settings):
    settings.KIROPOOL_SLOW_START_SECONDS = 60
    now = timezone.now()
    AccountFactory(name="back", identity__max_concurrency=5, identity__ejected_until=now - timedelta(seconds=1))
    assert gw.dispatch(max_wait_ms=0).status_code == 200
    assert gw.dispatch(max_wait_ms=0).status_code == 429  # one slot right after its return
    # Half-way through the window: 1 + floor(4 · 30/60) = 3 slots.
    RoutingIdentity.objects.update(ejected_until=now - timedelta(seconds=30))
    assert [gw.dispatch(max_wait_ms=0).status_code for _ in range(3)] == [200, 200, 429]
    assert gw.explain().json()["candidates"][0]["effective_concurrency"] == 3
    # After the window, all five.
    RoutingIdentity.objects.update(ejected_until=now - timedelta(seconds=61))
    assert [gw.dispatch(max_wait_ms=0).status_code for _ in range(3)] == [200, 200, 429]


def test_ejections_are_counted_on_metrics(gw, client, settings, django_capture_on_commit_callbacks):
    settings.KIROPOOL_EJECTION_FAILURES = 2
    AccountFactory(name="broken")
    before = _metric(client, "kiropool_identity_ejections_total")
    with django_capture_on_commit_callbacks(execute=True):  # counted once the ejection is committed
        fail(gw, 2)
    assert _metric(client, "kiropool_identity_ejections_total") == before + 1


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").content.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# --- credit pacing (issue 12 §6) ----------------------------------------------------------------


def test_credit_first_accounts_are_ranked_by_the_credits_they_must_burn_before_their_reset(gw, key):
    ApiKey.objects.filter(pk=key.pk).update(preferred_pool="credit_first")
    now = timezone.now()
    # 900 credits over 30 days burn 1.25/h; 100 over 2 hours burn 50/h: most urgent.
    AccountFactory(
        name="big-late", pool="credit_first", remaining_credits=900, quota_resets_at=now + timedelta(days=30)
    )
    AccountFactory(
        name="small-soon", pool="credit_first", remaining_credits=100, quota_resets_at=now + timedelta(hours=2)
    )
    AccountFactory(name="no-reset", pool="credit_first", remaining_credits=5000)
    explained = gw.explain().json()["candidates"]
    assert [c["account"] for c in explained] == ["small-soon", "big-late", "no-reset"]
    burn = {c["account"]: c["credit_burn_per_hour"] for c in explained}
    assert burn["small-soon"] == pytest.approx(50, rel=0.01)
    assert burn["big-late"] == pytest.approx(1.25, rel=0.01)
    assert burn["no-reset"] is None
    assert gw.cycle() == "small-soon"


# --- sessions on an excluded alias still count (issue 12 §2) -----------------------------------


def test_excluding_a_loaded_alias_does_not_make_its_identity_look_empty(gw, key):
    loaded = RoutingIdentityFactory(name="loaded")
    a1 = AccountFactory(name="a1-loaded", identity=loaded)
    AccountFactory(name="a2-alias", identity=loaded)
    b = AccountFactory(name="b-lighter")
    other = ApiKeyFactory()
    for i in range(6):
        SessionBindingFactory(api_key=other, account=a1, session_id=f"x{i}")
    for i in range(2):
        SessionBindingFactory(api_key=other, account=b, session_id=f"y{i}")
    # The reference sums over every account of the key: the loaded identity
    # holds 6 sessions even with a1 excluded, so the new session goes to b.
    response = gw.dispatch(session_id="fresh", exclude_accounts=["a1-loaded"])
    assert response.json()["account"]["name"] == "b-lighter"


# --- a waiting dispatch wakes when a cooldown ends (issue 12 §1) -------------------------------


def test_a_waiting_dispatch_takes_an_identity_whose_cooldown_ends(gw):
    AccountFactory(name="full")
    cooldown_ends = timezone.now() + timedelta(seconds=2)
    AccountFactory(name="cooling", identity__cooldown_until=cooldown_ends)
    holder = Gateway(ApiKeyFactory().plaintext)
    assert holder.dispatch(exclude_accounts=["cooling"]).json()["account"]["name"] == "full"
    started = time.monotonic()
    response = gw.dispatch(max_wait_ms=8000)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["account"]["name"] == "cooling"
    # Served once the cooldown ended (the setup above may take a good part
    # of its 2 s on a busy machine, so that is not timed from the dispatch),
    # and woken then, not at the end of the 8 s budget; slack: 3 s.
    assert Lease.objects.get(pk=response.json()["lease_id"]).started_at >= cooldown_ends
    assert elapsed <= 5.0


def test_out_of_budget_the_retry_after_counts_the_cooldowns(gw):
    AccountFactory(name="full")
    AccountFactory(name="cooling", identity__cooldown_until=timezone.now() + timedelta(seconds=20))
    holder = Gateway(ApiKeyFactory().plaintext)
    holder.dispatch(exclude_accounts=["cooling"])
    response = gw.dispatch(max_wait_ms=200)
    assert response.status_code == 429
    # The full identity may free at any time (Retry-After would be 1 without
    # more to go on), but the cooling one surely frees in 20 s: no earlier
    # moment is known, so that is when to come back.
    assert 19 <= int(response["Retry-After"]) <= 20


def test_a_waiting_dispatch_takes_the_slot_of_a_lease_that_expires(gw, settings):
    """The only slot is held by a lease whose gateway never reports: the
    waiting dispatch is served once that lease expires, not at the end of
    its budget (nobody announces an expiry)."""
    settings.KIROPOOL_LEASE_TTL_SECONDS = 2
    AccountFactory(name="only", identity__max_concurrency=1)
    assert Gateway(ApiKeyFactory().plaintext).dispatch().status_code == 200  # never completed
    started = time.monotonic()
    response = gw.dispatch(max_wait_ms=20_000)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.content
    # The held lease expires 2 s after it started; slack 4 s for a busy machine.
    assert 1.0 <= elapsed <= 6.0


def test_out_of_budget_the_retry_after_is_the_end_of_the_pacing_interval(gw):
    """The only identity paces one start every 30 s and just started one:
    the moment it may start again is known, and is when to come back."""
    AccountFactory(name="paced", identity__min_start_interval_ms=30_000, identity__max_concurrency=5)
    assert Gateway(ApiKeyFactory().plaintext).dispatch().status_code == 200
    response = gw.dispatch(max_wait_ms=200)
    assert response.status_code == 429
    assert 29 <= int(response["Retry-After"]) <= 30


# --- sticky patience (issue 12 §7) --------------------------------------------------------------


# Threads against one database: PostgreSQL only (the in-memory SQLite test
# database locks whole tables between connections).
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_returning_turn_waits_for_its_busy_account_instead_of_moving():
    key = ApiKeyFactory(sticky_patience_ms=5000)
    gw = Gateway(key.plaintext)
    bound = AccountFactory(name="bound")
    AccountFactory(name="elsewhere")
    SessionBindingFactory(api_key=key, account=bound, session_id="conv")
    holder = Gateway(ApiKeyFactory().plaintext)
    held = holder.dispatch(exclude_accounts=["elsewhere"]).json()["lease_id"]

    explained = gw.explain(session_id="conv").json()
    assert explained["sticky_would_wait"] is True and explained["sticky_patience_ms"] == 5000

    def release():
        try:
            # 0.6 s after the returning turn started waiting (its hold on
            # the slot is seen), however late this thread or the dispatch
            # got going on a busy machine.
            until(
                lambda: RoutingIdentity.objects.filter(pk=bound.identity_id, sticky_waiters=1).exists(),
                5,
                what="the returning turn never started waiting",
                step=0.01,
            )
            time.sleep(0.6)
            holder.complete(held, outcome="success")
        finally:
            connection.close()

    releaser = threading.Thread(target=release)
    releaser.start()
    response = gw.dispatch(session_id="conv", max_wait_ms=10_000)
    releaser.join(30)
    assert not releaser.is_alive()
    body = response.json()
    assert body["account"]["name"] == "bound"  # did not move
    # It waited for the release 0.6 s after its hold was seen (its wait
    # starts a statement or two after the hold: 0.1 s allowed); slack 2.5 s
    # above for a busy machine.
    assert 500 <= body["waited_ms"] <= 3100
    assert Lease.objects.get(pk=body["lease_id"]).sticky == StickyOutcome.WAITED


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_new_sessions_do_not_take_the_slot_a_returning_turn_waits_for():
    key = ApiKeyFactory(sticky_patience_ms=4000)
    bound = AccountFactory(name="bound", identity__max_concurrency=1)
    SessionBindingFactory(api_key=key, account=bound, session_id="conv")
    holder = Gateway(ApiKeyFactory().plaintext)
    held = holder.dispatch().json()["lease_id"]
    results = {}

    def returning():
        results["sticky"] = Gateway(key.plaintext).dispatch(session_id="conv", max_wait_ms=8000).json()
        connection.close()

    waiter = threading.Thread(target=returning)
    waiter.start()
    deadline = time.monotonic() + 5
    while not RoutingIdentity.objects.filter(pk=bound.identity_id, sticky_waiters=1).exists():
        assert time.monotonic() < deadline, "the returning turn never started waiting"
        time.sleep(0.05)
    holder.complete(held, outcome="success")
    # A new session asking right after the release finds the slot held.
    newcomer = holder.dispatch(session_id="new", max_wait_ms=0)
    waiter.join(30)
    assert not waiter.is_alive()
    assert results["sticky"]["account"]["name"] == "bound"
    assert newcomer.status_code == 429, newcomer.content
    assert RoutingIdentity.objects.get(pk=bound.identity_id).sticky_waiters == 0  # the hold is gone


def test_a_returning_turn_whose_account_cools_down_moves_without_waiting(gw, key):
    bound = AccountFactory(name="bound", identity__cooldown_until=timezone.now() + timedelta(minutes=5))
    AccountFactory(name="elsewhere")
    SessionBindingFactory(api_key=key, account=bound, session_id="conv")
    response = gw.dispatch(session_id="conv")
    assert response.json()["account"]["name"] == "elsewhere"
    assert response.json()["waited_ms"] == 0
    lease = Lease.objects.get(pk=response.json()["lease_id"])
    assert (lease.sticky, lease.moved_from) == (StickyOutcome.MOVED, "bound")


def test_a_returning_turn_whose_account_is_exhausted_moves_without_waiting(gw):
    """Its quota's probe is due, so its row is read (for the probe), and its
    identity is full: an exhausted account is not waited for, however busy."""
    key = ApiKeyFactory(sticky_patience_ms=4000)
    bound = AccountFactory(
        name="bound",
        identity__max_concurrency=1,
        quota_exhausted=True,
        quota_next_probe_at=timezone.now() - timedelta(seconds=1),
    )
    AccountFactory(name="alias", identity=bound.identity)
    AccountFactory(name="elsewhere")
    holder = Gateway(ApiKeyFactory().plaintext)
    assert holder.dispatch(exclude_accounts=["elsewhere", "bound"]).json()["account"]["name"] == "alias"
    SessionBindingFactory(api_key=key, account=bound, session_id="conv")
    response = Gateway(key.plaintext).dispatch(session_id="conv", max_wait_ms=8000).json()
    assert (response["account"]["name"], response["waited_ms"]) == ("elsewhere", 0)
    lease = Lease.objects.get(pk=response["lease_id"])
    assert (lease.sticky, lease.moved_from) == (StickyOutcome.MOVED, "bound")
    assert RoutingIdentity.objects.get(pk=bound.identity_id).sticky_waiters == 0  # no slot was held for it


def test_a_waiting_dispatch_takes_the_slot_a_slow_start_step_adds(gw, settings):
    # Back from an ejection 1.5 s ago, ramping 1 → 3 slots over 4 s: one slot
    # now, two from 2 s after the return. Nothing is released in between, so
    # only the step can wake the waiter.
    settings.KIROPOOL_SLOW_START_SECONDS = 4
    AccountFactory(
        name="back", identity__max_concurrency=3, identity__ejected_until=timezone.now() - timedelta(seconds=1.5)
    )
    holder = Gateway(ApiKeyFactory().plaintext)
    assert holder.dispatch(max_wait_ms=0).status_code == 200
    started = time.monotonic()
    response = gw.dispatch(max_wait_ms=8000)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    # Woken at the step (0.5 s from now), not at the end of the 8 s budget;
    # slack: 3 s for a busy machine.
    assert elapsed <= 3.5
