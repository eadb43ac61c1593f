"""Issue 12 in the simulated dispatcher, on hand-made pools and traffic:
outlier ejection and slow start, credits that run out and reset, the probe,
credit pacing, sticky patience. No database."""

from __future__ import annotations

import dataclasses

import pytest

from bench.simulate.engine import simulate
from bench.simulate.policies import policy_build
from bench.simulate.results import MOVED_CROWDED, STAYED
from bench.simulate.runs import simulate_dispatchers
from bench.simulate.scenario import (
    AccountSpec,
    CreditPlan,
    FailureWindow,
    IdentitySpec,
    Knobs,
    Pool,
    Scenario,
    upkeep_scenario,
)
from bench.simulate.traffic import Burst, Script, Traffic, Turn, traffic_generate
from bench.simulate.variants import TODAY, Dispatcher, dispatcher_variants, patience_sweep
from routing.selection import POOL_CREDIT_FIRST

KNOBS = Knobs(hours=1.0, max_wait_ms=30_000)
EJECTION = Dispatcher("ejection", ejection=True)


def ident(name: str, slots: int = 1) -> IdentitySpec:
    return IdentitySpec(name, 500.0, 0.0, max_concurrency=slots)


def pool(*identities: IdentitySpec, aliases: dict[str, str] | None = None, pool_name: str | None = None) -> Pool:
    accounts = [AccountSpec(i.name, i.name) for i in identities]
    accounts += [AccountSpec(alias, identity) for alias, identity in (aliases or {}).items()]
    if pool_name:
        accounts = [dataclasses.replace(a, pool=pool_name) for a in accounts]
    return Pool(identities=identities, accounts=tuple(accounts))


def traffic(*scripts: Script, failures=(), plans=(), bursts=(), duration_s: float = 3600.0) -> Traffic:
    return Traffic(
        scripts=tuple(sorted(scripts, key=lambda s: s.arrival_s)),
        bursts=tuple(bursts),
        quota_events=(),
        warm_samples=(),
        duration_s=duration_s,
        credit_plans=tuple(plans),
        failures=tuple(failures),
    )


def stateless(at: float, gen: float = 5.0, key: str = "key-1") -> Script:
    return Script(key, None, at, (Turn(0.0, gen),))


def session(name: str, at: float, *turns: tuple[float, float]) -> Script:
    """Turns as (think before it, generation)."""
    return Script("key-1", name, at, tuple(Turn(0.0, gen, think_s=think) for think, gen in turns))


def run(p: Pool, t: Traffic, dispatcher: Dispatcher = TODAY, **knobs: object):
    return simulate(p, dataclasses.replace(KNOBS, **knobs), t, policy_build("kiropool", seed=1), dispatcher)


# --- outlier ejection and slow start ---------------------------------------------------


def test_a_failing_identity_is_ejected_for_doubling_times():
    # a fails everything; a request every 10 s tries a first (started longest ago), then b
    t = traffic(*(stateless(10.0 * i) for i in range(1, 61)), failures=[FailureWindow("a", 0.0, 1e9)])
    today = run(pool(ident("a"), ident("b")), t)
    assert today.upstream_errors == {"retry_next": 60} and today.ejections == 0
    ejected = run(pool(ident("a"), ident("b")), t, EJECTION)
    # 5 failures (10..50 s), out 30 s; 5 more (90..130), out 60 s; 200..240, out 120 s;
    # 370..410, out 240 s until 650.5: the rest go straight to b
    assert ejected.upstream_errors == {"retry_next": 20} and ejected.ejections == 4
    assert ejected.served == today.served == [0, 60]
    # a failed attempt costs its request a round trip: 0.5 s to fail, 0.5 s to the first token on b
    assert [ms for _, ms in today.first_tokens] == [pytest.approx(1000.0)] * 60
    assert sorted(round(ms) for _, ms in ejected.first_tokens) == [500] * 40 + [1000] * 20
    # ejected time is not selectable time, so it does not count toward a's fair share
    assert ejected.available_s[0] < today.available_s[0]


def test_back_from_ejection_the_identity_ramps_up_over_the_slow_start():
    # one 4-slot identity; five failures eject it at 14.5 s until 44.5 s; then,
    # with no waiting (max_wait 0), the requests it admits show its limit
    failing = [stateless(10.0 + i) for i in range(5)]
    short = [stateless(at, gen=10.0) for at in (45.0, 46.0, 47.0, 48.0)]  # done by 58.5 s
    long = [stateless(at, gen=500.0) for at in (66.0, 67.0, 68.0, 105.0, 106.0, 107.0)]
    t = traffic(*failing, *short, *long, failures=[FailureWindow("a", 0.0, 15.0)])
    ramped = run(pool(ident("a", slots=4)), t, EJECTION, max_wait_ms=0)
    # limit 1 at 45-48 s (1 of 4), 2 from 64.5 s (2 of 3), 4 from 104.5 s (2 more of 3)
    assert ramped.rejected == {"502 all eligible accounts failed": 5, "429 wait budget spent": 5}
    assert ramped.served == [5]
    # all four slots at once: without ejection, or with no slow-start window
    for dispatcher, knobs in ((TODAY, {}), (EJECTION, {"slow_start_s": 0.0})):
        full = run(pool(ident("a", slots=4)), t, dispatcher, max_wait_ms=0, **knobs)
        assert full.rejected == {"502 all eligible accounts failed": 5, "429 wait budget spent": 2}
        assert full.served == [8]


# --- credits, resets, probes --------------------------------------------------------


def test_an_account_that_runs_dry_is_out_until_its_reset():
    plan = CreditPlan("a", 3.0, reset_s=200.0, allowance=10.0)
    t = traffic(*(stateless(at) for at in (10.0, 30.0, 50.0, 100.0, 210.0, 230.0)), plans=[plan])
    result = run(pool(ident("a")), t)
    # three credits, three requests; the fourth finds the known empty balance
    assert result.rejected == {"503 no usable account": 1}
    assert sum(result.served) == 5 and result.upstream_errors == {}
    assert result.credits_spent == 5.0
    assert result.resets == [(200.0, "a", 0.0)] and result.credits_wasted == 0.0
    # out (spent) at the ticks of 60, 120 and 180 s
    assert result.available_s == [3600.0 + 60.0 - 3 * 60.0]


def test_credits_left_at_a_reset_are_wasted():
    t = traffic(stateless(10.0), stateless(150.0), plans=[CreditPlan("a", 10.0, reset_s=100.0, allowance=50.0)])
    result = run(pool(ident("a")), t)
    assert result.resets == [(100.0, "a", 9.0)] and result.credits_wasted == 9.0
    assert result.credits_spent == 2.0


def test_with_no_reset_known_one_probe_per_interval_brings_it_back():
    plan = CreditPlan("a", 2.0, reset_s=1000.0, allowance=10.0, reset_known=False)
    arrivals = (10.0, 20.0, 100.0, 400.0, 500.0, 1010.0, 1020.0)
    result = run(pool(ident("a")), traffic(*(stateless(at) for at in arrivals), plans=[plan]), quota_probe_s=300.0)
    # dry at 25.5 s; the probe due at 325.5 s goes at 400 s and finds the quota
    # still spent (wait restarts); the upstream resets at 1000 s, unknown to the
    # dispatcher; the next probe (due 700.5 s) goes at 1010 s and succeeds
    assert result.probes == 2
    assert result.upstream_errors == {"quota_exhausted": 1}
    assert result.rejected == {"503 no usable account": 2, "502 all eligible accounts failed": 1}
    assert sum(result.served) == 4


def test_credit_pacing_drains_the_account_that_resets_first():
    plans = [
        CreditPlan("soon", 100.0, reset_s=3000.0, allowance=100.0),
        CreditPlan("late", 200.0, reset_s=36_000.0, allowance=100.0),
    ]
    p = pool(ident("soon"), ident("late"), pool_name=POOL_CREDIT_FIRST)
    t = traffic(*(stateless(10.0 + 10 * i) for i in range(10)), plans=plans)
    # without pacing the credit_first pool takes the biggest balance first
    today = run(p, t)
    assert today.served == [0, 10] and today.credits_wasted == 100.0
    # with it, the one that must burn 120 credits/h before its reset beats 20/h
    paced = run(p, t, Dispatcher("pacing", credit_pacing=True))
    assert paced.served == [10, 0] and paced.credits_wasted == 90.0


# --- sticky patience ----------------------------------------------------------------


def crowded_return(*, x_gen: float) -> Traffic:
    """s1 is bound to a; when its second turn comes (22 s), a is busy with X
    (started 21 s, done 21.5 + x_gen) and c is free."""
    return traffic(
        session("s1", 10.0, (0.0, 10.0), (1.5, 5.0)),  # turn 1 on a until 20.5; turn 2 at 22 s
        stateless(15.0, gen=3.0),  # Y on c (a is busy), so a was started longest ago at 21 s
        stateless(21.0, gen=x_gen),  # X on a
    )


def test_without_patience_a_returning_turn_moves_at_once():
    result = run(pool(ident("a"), ident("c")), crowded_return(x_gen=2.0))
    assert result.returning == [(22.0, MOVED_CROWDED)] and result.sessions_moved == 1
    assert max(result.waits_ms) == 0.0


def test_patience_keeps_the_turn_when_its_account_frees_in_time():
    result = run(pool(ident("a"), ident("c")), crowded_return(x_gen=2.0), Dispatcher("p", sticky_patience_ms=5000))
    assert result.returning == [(22.0, STAYED)] and result.sessions_moved == 0
    assert sorted(result.waits_ms)[-1] == pytest.approx(1500.0)  # X ends at 23.5 s


def test_patience_runs_out_and_the_turn_moves():
    result = run(pool(ident("a"), ident("c")), crowded_return(x_gen=2.0), Dispatcher("p", sticky_patience_ms=1000))
    assert result.returning == [(22.0, MOVED_CROWDED)] and result.sessions_moved == 1
    assert sorted(result.waits_ms)[-1] == pytest.approx(1000.0)


def test_patience_is_capped_by_the_wait_budget():
    result = run(
        pool(ident("a"), ident("c")),
        crowded_return(x_gen=2.0),
        Dispatcher("p", sticky_patience_ms=5000),
        max_wait_ms=800,
    )
    assert result.returning == [(22.0, MOVED_CROWDED)]
    # the budget went on patience; the walk finds c free, so it is served, not 429
    assert sorted(result.waits_ms)[-1] == pytest.approx(800.0) and result.rejected == {}


def test_a_waiting_turn_moves_as_soon_as_its_account_starts_cooling():
    t = traffic(
        session("s1", 10.0, (0.0, 10.0), (0.7, 5.0)),  # turn 1 on a until 20.5; turn 2 at 21.2 s
        stateless(15.0, gen=3.0),  # on c
        stateless(15.5, gen=3.0),  # on d
        stateless(21.0, gen=2.0),  # X on a: rate limited at 21.5 s, retried on c
        bursts=[Burst("a", 20.9, 21.1)],
    )
    result = run(pool(ident("a"), ident("c"), ident("d")), t, Dispatcher("p", sticky_patience_ms=5000))
    assert result.upstream_errors == {"rate_limited": 1}
    # a cools at 21.5 s: the waiting turn gives up on it then and takes d
    assert result.returning == [(21.2, MOVED_CROWDED)]
    assert sorted(result.waits_ms)[-1] == pytest.approx(300.0)


def test_a_waiting_turn_is_served_ahead_of_older_requests_on_its_account():
    t = traffic(
        session("s1", 10.0, (0.0, 5.0), (2.5, 5.0)),  # turn 1 on a until 15.5; turn 2 at 18 s
        stateless(11.0, gen=20.0),  # on b until 31.5
        stateless(16.0, gen=5.0),  # X on a until 21.5
        stateless(17.0, gen=5.0),  # W: both busy, waits from 17 s
    )
    p = pool(ident("a"), ident("b"))
    patient = run(p, t, Dispatcher("p", sticky_patience_ms=5000))
    # a frees at 21.5 s: the turn waiting for it goes first (3.5 s), W gets a after it (10 s)
    assert patient.returning == [(18.0, STAYED)]
    assert sorted(patient.waits_ms)[-2:] == [pytest.approx(3500.0), pytest.approx(10_000.0)]
    # without patience both wait in the walk, oldest first: W (4.5 s), then the turn (9 s)
    fifo = run(p, t)
    assert fifo.returning == [(18.0, STAYED)]
    assert sorted(fifo.waits_ms)[-2:] == [pytest.approx(4500.0), pytest.approx(9000.0)]


def test_the_slot_held_for_a_waiting_turn_is_not_taken_by_others():
    t = traffic(
        session("s1", 10.0, (0.0, 10.0), (0.7, 5.0)),  # turn 1 on a until 20.5; turn 2 at 21.2 s
        stateless(15.0, gen=20.0),  # on b until 35.5
        stateless(21.0, gen=2.0),  # X on a fails at 21.5 s; the gateway retries it without "a"
        failures=[FailureWindow("a", 20.9, 21.1)],
    )
    p = pool(ident("a"), ident("b"), aliases={"a2": "a"})
    result = run(p, t, Dispatcher("p", sticky_patience_ms=5000))
    assert result.upstream_errors == {"retry_next": 1}
    # X's retry could take the freed slot through the alias a2, but it is held
    # for the waiting turn: the turn gets it at once, X waits for the turn to end
    assert result.returning == [(21.2, STAYED)]
    assert sorted(result.waits_ms)[-2:] == [pytest.approx(300.0), pytest.approx(5500.0)]


# --- the variants -----------------------------------------------------------------


def test_variants_add_one_behaviour_at_a_time_and_equal_runs_run_once():
    knobs = Knobs(sticky_patience_ms=2500)
    variants = dispatcher_variants(knobs)
    assert [v.name for v in variants] == ["today", "+ejection", "+pacing", "+patience", "new"]
    assert [v.features() for v in variants] == [
        (False, False, 0),
        (True, False, 0),
        (False, True, 0),
        (False, False, 2500),
        (True, True, 2500),
    ]
    sweep = patience_sweep((0, 2500))
    assert [s.name for s in sweep] == ["patience 0 s", "patience 2.5 s"]
    t = traffic(*(stateless(10.0 * i) for i in range(1, 20)), failures=[FailureWindow("a", 0.0, 1e9)])
    results = simulate_dispatchers([variants[-1], *sweep], pool(ident("a"), ident("b")), KNOBS, t, seed=1)
    assert [r.policy for r in results] == ["new", "patience 0 s", "patience 2.5 s"]
    assert dataclasses.replace(results[2], policy="new") == results[0]


def test_the_upkeep_day_is_the_default_day_with_credits_and_failures():
    base = Scenario(knobs=dataclasses.replace(Knobs(), hours=2.0))
    day = upkeep_scenario(base)
    assert traffic_generate(day).scripts == traffic_generate(base).scripts
    credit_first = {a.name for a in day.pool.accounts if a.pool == POOL_CREDIT_FIRST}
    assert credit_first == {"mid3", "mid3-alt", "mid4", "mid5", "mid6", "slow2", "new2"}
    assert day.pool.preferred_pool("key-3") == POOL_CREDIT_FIRST and day.pool.preferred_pool("key-1") == "balanced"
    assert {p.identity for p in day.knobs.credit_plans} >= {"mid3", "new2", "fast1"}
    assert {f.identity for f in day.knobs.failures} == {"mid1", "fast2"}
