"""The traffic generator's statistics and the trace reader. No database."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics

import pytest

from bench.simulate.scenario import HOUR, IdentitySpec, Knobs, Scenario
from bench.simulate.traffic import (
    diurnal_rate,
    first_token_ms,
    geometric_turns,
    peak_window,
    poisson_arrivals,
    trace_load,
    traffic_generate,
)


def small(**knobs: object) -> Scenario:
    return Scenario(knobs=dataclasses.replace(Knobs(), **knobs), seed=7)


def test_homogeneous_poisson_count_and_gaps():
    rng = random.Random(1)
    times = poisson_arrivals(rng, lambda _t: 2.0, rate_max=2.0, duration_s=5000)
    # 10 000 expected, standard deviation 100
    assert abs(len(times) - 10_000) < 400
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.03)
    # exponential gaps: the standard deviation equals the mean
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)
    assert times == sorted(times) and times[0] > 0 and times[-1] < 5000


def test_thinning_follows_the_day():
    rate = lambda t: diurnal_rate(t, mean=0.5, amplitude=0.5, peak_hour=14)  # noqa: E731
    times = poisson_arrivals(random.Random(2), rate, rate_max=0.75, duration_s=24 * HOUR)
    assert abs(len(times) - 0.5 * 24 * HOUR) < 4 * math.sqrt(0.5 * 24 * HOUR)
    peak = sum(13.5 * HOUR <= t < 14.5 * HOUR for t in times)
    trough = sum(1.5 * HOUR <= t < 2.5 * HOUR for t in times)
    # 0.75/s around the peak, 0.25/s around 02:00
    assert peak / trough == pytest.approx(3.0, rel=0.15)


def test_diurnal_rate_shape():
    assert diurnal_rate(14 * HOUR, mean=10, amplitude=0.5, peak_hour=14) == pytest.approx(15)
    assert diurnal_rate(2 * HOUR, mean=10, amplitude=0.5, peak_hour=14) == pytest.approx(5)
    assert diurnal_rate(0, mean=10, amplitude=2.0, peak_hour=12) == 0.0  # never negative


def test_geometric_turns_mean_and_support():
    rng = random.Random(3)
    draws = [geometric_turns(rng, 8.0) for _ in range(40_000)]
    assert min(draws) == 1
    assert statistics.fmean(draws) == pytest.approx(8.0, rel=0.03)
    assert draws.count(1) / len(draws) == pytest.approx(1 / 8, rel=0.05)
    assert geometric_turns(rng, 1.0) == 1


def test_first_token_is_the_identity_quantile():
    spec = IdentitySpec("a", 400.0, 0.5)
    assert first_token_ms(spec, 0.0) == pytest.approx(400.0)
    assert first_token_ms(spec, 1.0, proxy_extra_ms=60) == pytest.approx(400 * math.exp(0.5) + 60)


def test_generated_day_matches_its_knobs():
    scenario = small()
    traffic = traffic_generate(scenario)
    knobs = scenario.knobs
    sessions = [s for s in traffic.scripts if s.session_id is not None]
    stateless = [s for s in traffic.scripts if s.session_id is None]
    expected = knobs.sessions_per_hour * 24
    assert abs(len(sessions) - expected) < 4 * math.sqrt(expected)
    assert statistics.fmean(len(s.turns) for s in sessions) == pytest.approx(knobs.mean_turns, rel=0.05)
    assert len(stateless) / traffic.requests == pytest.approx(knobs.stateless_share, abs=0.015)
    thinks = [t.think_s for s in sessions for t in s.turns[1:]]
    assert statistics.median(thinks) == pytest.approx(knobs.think_median_s, rel=0.05)
    assert all(s.turns[0].think_s == 0 for s in sessions)
    generation = [t.generation_s for s in traffic.scripts for t in s.turns]
    assert statistics.median(generation) == pytest.approx(knobs.generation_median_s, rel=0.05)
    z = [t.z_latency for s in traffic.scripts for t in s.turns]
    assert statistics.fmean(z) == pytest.approx(0.0, abs=0.03) and statistics.stdev(z) == pytest.approx(1, abs=0.03)
    luck = [t.luck for s in traffic.scripts for t in s.turns]
    assert all(0 <= u < 1 for u in luck) and statistics.fmean(luck) == pytest.approx(0.5, abs=0.01)
    assert {s.key for s in traffic.scripts} == {"key-1", "key-2", "key-3"}
    assert len({s.session_id for s in sessions}) == len(sessions)
    assert [s.arrival_s for s in traffic.scripts] == sorted(s.arrival_s for s in traffic.scripts)


def test_bursts_warm_samples_and_quota():
    scenario = small(bursts_per_identity_day=20.0)
    traffic = traffic_generate(scenario)
    identities = [i.name for i in scenario.pool.identities]
    assert len(traffic.bursts) == pytest.approx(20 * len(identities), rel=0.25)
    assert all(b.end_s > b.start_s and b.identity in identities for b in traffic.bursts)
    cold = {i.name for i in scenario.pool.identities if not i.warm}
    warm_accounts = {a.name for a in scenario.pool.accounts if a.identity not in cold}
    assert {account for _, account, _, _ in traffic.warm_samples} == warm_accounts
    assert all(-scenario.knobs.snapshot_window_s <= t < 0 for t, *_ in traffic.warm_samples)
    assert [e.identity for e in traffic.quota_events] == ["mid2"]


def test_same_seed_same_traffic_other_seed_other_traffic():
    a = traffic_generate(small(hours=2))
    b = traffic_generate(small(hours=2))
    c = traffic_generate(dataclasses.replace(small(hours=2), seed=8))
    assert a == b
    assert a.scripts != c.scripts


def test_one_knob_does_not_reshuffle_the_others():
    base = traffic_generate(small(hours=2))
    more_bursts = traffic_generate(small(hours=2, bursts_per_identity_day=5))
    assert base.scripts == more_bursts.scripts


def _row(at: str, account: str, **fields: object) -> str:
    row = {
        "started_at": at,
        "api_key": "gw",
        "session_id": "s1",
        "model": "m",
        "account_name": account,
        "routing_identity": account.split("-")[0],
        "outcome": "success",
        "first_token_ms": 400.0,
        "completed_at": None,
    }
    row.update(fields)
    return json.dumps(row)


def test_trace_becomes_pool_and_arrivals():
    lines = [
        _row("2026-06-01T10:00:00+00:00", "a-1", completed_at="2026-06-01T10:00:10.400000+00:00"),
        _row("2026-06-01T10:00:30+00:00", "a-2", first_token_ms=400.0, session_id=""),
        _row("2026-06-01T10:01:00+00:00", "b-1", outcome="rate_limited", first_token_ms=None),
        _row("2026-06-01T10:01:01+00:00", "a-1", session_id="s2"),
        _row("2026-06-01T10:02:00+00:00", "b-1", outcome="quota_exhausted", first_token_ms=None),
        _row("2026-06-01T10:03:00+00:00", "b-1", outcome="fatal", first_token_ms=None),
        "",
    ]
    pool, traffic = trace_load(lines, knobs=Knobs(), seed=1, concurrency=3)
    assert [(a.name, a.identity) for a in pool.accounts] == [("a-1", "a"), ("a-2", "a"), ("b-1", "b")]
    a, b = pool.identity("a"), pool.identity("b")
    assert a.latency_median_ms == pytest.approx(400.0) and a.latency_sigma == pytest.approx(0.0)
    assert b.latency_median_ms == pytest.approx(400.0)  # no samples: the trace's median
    assert a.max_concurrency == b.max_concurrency == 3
    # the three failures were retried as leases of their own: not replayed
    assert [(s.arrival_s, s.session_id) for s in traffic.scripts] == [(0.0, "s1"), (30.0, None), (61.0, "s2")]
    assert traffic.scripts[0].turns[0].generation_s == pytest.approx(10.0)
    assert [(x.identity, x.start_s, x.end_s) for x in traffic.bursts] == [("b", 60.0, 120.0)]
    assert [(e.identity, e.at_s) for e in traffic.quota_events] == [("b", 120.0)]


def test_empty_trace_is_an_error():
    with pytest.raises(ValueError):
        trace_load(["", "  "], knobs=Knobs(), seed=1)


def test_peak_is_the_busiest_four_hours():
    day = traffic_generate(small())
    assert peak_window(day) == (12 * HOUR, 16 * HOUR)  # around the 14:00 peak of the cosine
    scripts = tuple(dataclasses.replace(day.scripts[0], arrival_s=at) for at in (0.5 * HOUR, 7.2 * HOUR, 7.9 * HOUR))
    assert peak_window(dataclasses.replace(day, scripts=scripts)) == (4 * HOUR, 8 * HOUR)  # the first busiest
    short = dataclasses.replace(day, duration_s=2.5 * HOUR)
    assert peak_window(short) == (0.0, 2.5 * HOUR)
