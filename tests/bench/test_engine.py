"""The simulated dispatcher on hand-made pools and traffic, and determinism
under a seed. No database."""

from __future__ import annotations

import dataclasses

import pytest

from bench.simulate.engine import simulate
from bench.simulate.metrics import summarize
from bench.simulate.policies import POLICY_NAMES, policy_build
from bench.simulate.runs import simulate_all
from bench.simulate.scenario import AccountSpec, IdentitySpec, Knobs, Pool, QuotaEvent, Scenario
from bench.simulate.traffic import Burst, Script, Traffic, Turn, traffic_generate

KNOBS = Knobs(hours=1.0, max_wait_ms=30_000, cooldown_s=300.0)


def pool(*identities: IdentitySpec, aliases: dict[str, str] | None = None) -> Pool:
    accounts = [AccountSpec(i.name, i.name) for i in identities]
    accounts += [AccountSpec(alias, identity) for alias, identity in (aliases or {}).items()]
    return Pool(identities=identities, accounts=tuple(accounts))


def traffic(*scripts: Script, bursts=(), quota=(), warm=(), duration_s: float = 3600.0) -> Traffic:
    return Traffic(
        scripts=tuple(sorted(scripts, key=lambda s: s.arrival_s)),
        bursts=tuple(bursts),
        quota_events=tuple(quota),
        warm_samples=tuple(warm),
        duration_s=duration_s,
    )


def request(at: float, session: str | None = None, *, gen: float = 10.0, turns: int = 1, think: float = 60.0):
    steps = tuple(Turn(0.0, gen, think_s=0.0 if i == 0 else think) for i in range(turns))
    return Script("key-1", session, at, steps)


def run(p: Pool, t: Traffic, policy: str = "kiropool", **knobs: object):
    return simulate(p, dataclasses.replace(KNOBS, **knobs), t, policy_build(policy, seed=1))


A = IdentitySpec("a", 500.0, 0.0, max_concurrency=1)
B = IdentitySpec("b", 500.0, 0.0, max_concurrency=1)


def test_a_session_stays_on_its_account_while_it_is_free():
    result = run(pool(A, B), traffic(request(10, "s1", turns=5)))
    assert result.served == [5, 0]  # never started identity "a" sorts first by name, then sticks
    assert result.sessions_moved == 0
    assert result.waits_ms == [0.0] * 5
    assert result.latencies_ms == [500.0] * 5


def test_new_sessions_spread_by_identity_including_aliases():
    # a has two account names; per-identity counting keeps it from taking two of four sessions via "a-alt"
    p = pool(A, B, aliases={"a-alt": "a"})
    t = traffic(*(request(10 + 100 * i, f"s{i}") for i in range(4)))
    counts = run(p, t).bindings[-1]
    assert counts == [2, 2]


def test_first_attempt_counts_per_account_name():
    p = pool(A, B, aliases={"a-alt": "a"})
    t = traffic(*(request(10 + 100 * i, f"s{i}") for i in range(6)))
    # floored_bands spreads per account name: a, a-alt and b each get two, so identity a holds four
    assert run(p, t, "floored_bands").bindings[-1] == [4, 2]


def test_exact_score_puts_every_new_session_on_the_fastest():
    fast, slow = IdentitySpec("fast", 300.0, 0.0), IdentitySpec("slow", 700.0, 0.0)
    warm = [(-60.0 - i, name, None, ms) for i in range(20) for name, ms in (("fast", 300.0), ("slow", 700.0))]
    t = traffic(*(request(10 + 100 * i, f"s{i}") for i in range(6)), warm=warm)
    assert run(pool(fast, slow), t, "exact_score").bindings[-1] == [6, 0]
    assert run(pool(fast, slow), t, "kiropool").bindings[-1] == [3, 3]


def test_second_request_waits_for_the_only_slot():
    result = run(pool(A), traffic(request(10), request(10)))
    # the second walks again when the first completes: 0.5 s first token + 10 s generation
    assert sorted(result.waits_ms) == [0.0, pytest.approx(10_500.0)]
    assert result.rejected == {}


def test_wait_budget_runs_out_with_429():
    result = run(pool(A), traffic(request(10, gen=60.0), request(10)), max_wait_ms=5000)
    assert result.rejected == {"429 wait budget spent": 1}
    assert sorted(result.waits_ms) == [0.0, pytest.approx(5000.0)]


def test_pacing_makes_the_next_start_wait():
    paced = IdentitySpec("a", 500.0, 0.0, max_concurrency=2, min_start_interval_ms=2000)
    result = run(pool(paced), traffic(request(10), request(10)))
    assert sorted(result.waits_ms) == [0.0, pytest.approx(2000.0)]


def test_rate_limited_cools_the_identity_and_the_request_moves_on():
    t = traffic(request(10, "s1"), request(100, "s2"), bursts=[Burst("a", 0.0, 50.0)])
    result = run(pool(A, B), t)
    assert result.upstream_errors == {"rate_limited": 1}
    # s1 retried on b; s2 at 100 s finds a cooling (until 310 s) and goes to b too
    assert result.served == [0, 2]
    assert result.available_s[0] == pytest.approx(3600.0 - 300.0, abs=60.0)


def test_everything_cooling_is_a_429_and_everything_excluded_a_502():
    t = traffic(request(10), request(20), bursts=[Burst("a", 0.0, 15.0)])
    result = run(pool(A), t)
    # the first is rate limited, and its retry has excluded the only account;
    # the second finds the only identity cooling
    assert result.rejected == {"502 all eligible accounts failed": 1, "429 all cooling down": 1}


def test_quota_exhaustion_takes_the_identity_out_until_reset():
    t = traffic(request(10), request(100), request(400), quota=[QuotaEvent("a", 0.0, 300.0)])
    result = run(pool(A, B), t)
    assert result.upstream_errors == {"quota_exhausted": 1}
    # the first moves to b; the second finds a exhausted; by 400 s an operator has reset it
    assert result.served == [1, 2]


def test_every_account_quota_exhausted_is_a_503():
    t = traffic(request(10), request(20), quota=[QuotaEvent("a", 0.0, 3000.0)])
    result = run(pool(A), t)
    assert result.rejected == {"502 all eligible accounts failed": 1, "503 no usable account": 1}


def test_binding_expires_after_its_ttl():
    t = traffic(request(10, "s1", turns=2, think=200.0))
    result = run(pool(A, B), t, affinity_ttl_s=100.0)
    # the second turn comes after the binding expired: a new session, not a move
    assert result.sessions_moved == 0
    assert result.bindings[-1] == [0, 0]


def test_stateless_policies_do_not_stick():
    t = traffic(request(10, "s1", turns=4))
    assert run(pool(A, B), t, "round_robin").sessions_moved == 3
    assert run(pool(A, B), t, "kiropool").sessions_moved == 0


def test_same_seed_same_results_for_every_policy():
    scenario = Scenario(knobs=dataclasses.replace(Knobs(), hours=1.0, sessions_per_hour=120), seed=11)
    t = traffic_generate(scenario)
    first = simulate_all(POLICY_NAMES, scenario.pool, scenario.knobs, t, seed=11, jobs=1)
    again = simulate_all(POLICY_NAMES, scenario.pool, scenario.knobs, t, seed=11, jobs=2)
    assert first == again
    assert [r.policy for r in first] == list(POLICY_NAMES)
    assert all(r.requests > 100 for r in first)
    other = traffic_generate(dataclasses.replace(scenario, seed=12))
    assert simulate_all(["litellm"], scenario.pool, scenario.knobs, other, seed=12)[0] != first[3]
    assert summarize(first[0]).public() == summarize(again[0]).public()
