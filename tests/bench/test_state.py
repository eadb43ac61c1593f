"""The server's writes in miniature (bench/simulate/state.py), and that the
simulator's dispatcher settings are the server's defaults. No database."""

from __future__ import annotations

from collections import deque

from django.conf import settings

from bench.simulate import state as st
from bench.simulate.scenario import AccountSpec, CreditPlan, IdentitySpec, Knobs
from routing import selection

KNOBS = Knobs()


def identity(plan: CreditPlan | None = None, **spec: object) -> st.Identity:
    ident = st.Identity(IdentitySpec("a", 500.0, 0.0, **spec), [], deque(), [], plan)
    ident.accounts.append(st.Account(AccountSpec("a", "a"), ident, 0.0))
    return ident


def test_the_simulators_settings_are_the_servers_defaults():
    assert KNOBS.ejection_failures == settings.KIROPOOL_EJECTION_FAILURES
    assert KNOBS.ejection_base_s == settings.KIROPOOL_EJECTION_BASE_SECONDS
    assert KNOBS.ejection_max_s == settings.KIROPOOL_EJECTION_MAX_SECONDS
    assert KNOBS.slow_start_s == settings.KIROPOOL_SLOW_START_SECONDS == selection.SLOW_START.total_seconds()
    assert KNOBS.quota_probe_s == settings.KIROPOOL_QUOTA_PROBE_SECONDS
    assert KNOBS.sticky_patience_ms == settings.KIROPOOL_STICKY_PATIENCE_MS
    assert KNOBS.max_wait_ms == 30_000 and KNOBS.affinity_ttl_s == settings.KIROPOOL_AFFINITY_TTL_SECONDS


def test_ejection_after_five_failures_in_a_row_doubling_to_the_cap():
    ident = identity()
    assert [st.failure_record(ident, 10.0 + i, KNOBS) for i in range(5)] == [False] * 4 + [True]
    assert (ident.ejected_until_s, ident.failure_streak, ident.ejections) == (14.0 + 30, 0, 1)
    # failures of leases that were out while it is ejected change nothing
    assert not st.failure_record(ident, 20.0, KNOBS) and ident.failure_streak == 0
    assert not st.failure_record(ident, 43.9, KNOBS) and ident.ejected_until_s == 44.0
    # back: five more eject it for twice as long
    for i in range(5):
        st.failure_record(ident, 44.0 + i, KNOBS)
    assert (ident.ejected_until_s, ident.ejections) == (48.0 + 60, 2)
    # a success ends both runs: the next ejection is the base time again
    st.success_record(ident)
    for i in range(5):
        st.failure_record(ident, 200.0 + i, KNOBS)
    assert (ident.ejected_until_s, ident.ejections) == (204.0 + 30, 1)
    # the length is capped at 15 minutes however many ejections in a row
    ident.ejections = 12
    for i in range(5):
        st.failure_record(ident, 1000.0 + i, KNOBS)
    assert ident.ejected_until_s == 1004.0 + 900


def test_a_known_empty_balance_is_out_until_the_known_reset():
    plan = CreditPlan("a", 1.0, reset_s=500.0, allowance=10.0)
    ident = identity(plan)
    account = ident.accounts[0]
    assert account.reported_credits == 1.0 and account.resets_at_s == 500.0  # entered by an operator
    assert st.upstream_outcome(ident, 10.0, 0.5) == "success"
    assert st.credits_spend(ident, 1.0) == 1.0
    st.account_report(account, 11.0, KNOBS)
    assert account.reported_credits == 0.0 and st.spent(account)
    assert not st.selectable(account, 499.0) and st.selectable(account, 500.0)
    assert st.upstream_outcome(ident, 12.0, 0.5) == "quota_exhausted"
    assert st.credits_reset(ident) == 0.0 and ident.credits == 10.0 and ident.reset_s == 500.0 + st.CREDIT_CYCLE_S
    st.quota_resets_apply(ident)
    # back, its empty balance and its reset time forgotten until a completion reports them
    assert (account.reported_credits, account.resets_at_s, st.spent(account)) == (None, None, False)


def test_without_a_reset_time_one_probe_per_interval():
    ident = identity(CreditPlan("a", 0.0, reset_s=5000.0, allowance=10.0, reset_known=False))
    account = ident.accounts[0]
    assert account.resets_at_s is None
    st.quota_exhaust(ident, 100.0, KNOBS)
    assert st.spent(account) and st.quota_probe(account)
    assert not st.selectable(account, 100.0 + KNOBS.quota_probe_s - 1)
    assert st.selectable(account, 100.0 + KNOBS.quota_probe_s)
    st.quota_probe_take(ident, 3700.0, KNOBS)
    assert not st.selectable(account, 3700.0)  # one probe, then wait again
    # a balance above the minimum brings it back
    ident.credits = 5.0
    st.account_report(account, 3701.0, KNOBS)
    assert not st.spent(account) and ident.next_probe_s is None


def test_the_upstream_fails_the_unlucky_share_in_its_window():
    from bench.simulate.scenario import FailureWindow

    ident = identity()
    ident.failures.append(FailureWindow("a", 100.0, 200.0, "fatal", share=0.7))
    assert st.upstream_outcome(ident, 150.0, 0.69) == "fatal"
    assert st.upstream_outcome(ident, 150.0, 0.7) == "success"
    assert st.upstream_outcome(ident, 200.0, 0.1) == "success"
    ident.bursts.append((140.0, 160.0))
    assert st.upstream_outcome(ident, 150.0, 0.1) == "rate_limited"  # a 429 comes first
