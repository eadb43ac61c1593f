"""The alternative orderings on the reference's own examples. No database."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

from bench.simulate.policies import (
    ExactScore,
    FlooredBands,
    Kiropool,
    LeastInFlight,
    LiteLLMLowestLatency,
    RoundRobin,
    View,
)
from routing.selection import POOL_BALANCED, Candidate, LatencySnapshot, LatencyStats

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def cand(account: str, **fields: object) -> Candidate:
    fields.setdefault("routing_identity", account)
    return Candidate(account=account, pool=POOL_BALANCED, **fields)  # type: ignore[arg-type]


def snap(**accounts: float) -> LatencySnapshot:
    stats = {name: LatencyStats(20, ms) for name, ms in accounts.items()}
    return LatencySnapshot(generated_at=NOW, global_avg_ms=500.0, accounts=stats, proxies={})


def names(ordered) -> list[str]:
    return [c.account for c in ordered]


def rounds(policy, candidates: list[Candidate], view: View, n: int) -> list[str]:
    """Head of the order n times, starting its identity each time (as the walk would)."""
    picked = []
    for i in range(n):
        now = view.now + timedelta(seconds=i)
        head = policy.order(candidates, View(now=now, session=view.session, snapshot=view.snapshot))[0]
        picked.append(head.account)
        candidates = [
            dataclasses.replace(c, last_started_at=now) if c.routing_identity == head.routing_identity else c
            for c in candidates
        ]
    return picked


def test_marginally_faster_account_wins_everything_only_without_bands():
    # the reference's example: A scores 430 ms (~14 % under G = 500), B has no samples (500)
    view = View(now=NOW, session="none", snapshot=snap(a=375.0))
    pair = [cand("a"), cand("b")]
    assert rounds(ExactScore(), pair, view, 4) == ["a", "a", "a", "a"]
    # floored from zero: 430 // 75 = 5 and 500 // 75 = 6, so A still always wins
    assert rounds(FlooredBands(), pair, view, 4) == ["a", "a", "a", "a"]
    # centred bands: both in band 0, round-robin takes over
    assert rounds(Kiropool(), pair, view, 4) == ["a", "b", "a", "b"]


def test_kiropool_spread_counts_moving_sessions_too():
    loaded, idle = cand("a", bound_sessions=3), cand("b")
    for session in ("new", "sticky"):
        assert names(Kiropool().order([loaded, idle], View(NOW, session, None))) == ["b", "a"]
    assert names(Kiropool().order([loaded, idle], View(NOW, "none", None))) == ["a", "b"]
    # the first attempt spread brand-new sessions only
    assert names(FlooredBands().order([loaded, idle], View(NOW, "new", None))) == ["b", "a"]
    assert names(FlooredBands().order([loaded, idle], View(NOW, "sticky", None))) == ["a", "b"]


def test_litellm_tries_unused_deployments_first_then_picks_within_buffer():
    policy = LiteLLMLowestLatency(random.Random(1), buffer=0.5, window=3)
    view = View(NOW, "none", None)
    trio = [cand("a"), cand("b"), cand("c")]
    policy.observe("a", 100.0)
    policy.observe("b", 140.0)
    assert names(policy.order(trio, view))[0] == "c"  # unused: latency 0
    policy.observe("c", 400.0)
    heads = {names(policy.order(trio, view))[0] for _ in range(50)}
    assert heads == {"a", "b"}  # 140 is within 100 × 1.5, 400 is not
    # only the last `window` latencies count
    for _ in range(3):
        policy.observe("a", 1000.0)
    assert names(policy.order(trio, view))[-1] == "a"


def test_litellm_leaves_cooling_deployments_out_of_the_pick():
    policy = LiteLLMLowestLatency(random.Random(2), buffer=0.5, window=10)
    cooling = cand("a", identity_cooldown_until=NOW + timedelta(seconds=30))
    policy.observe("b", 300.0)
    for _ in range(20):
        assert names(policy.order([cooling, cand("b")], View(NOW, "none", None))) == ["b", "a"]


def test_round_robin_rotates_and_least_in_flight_fills_the_idle():
    rr = RoundRobin()
    trio = [cand("c"), cand("a"), cand("b")]
    heads = [names(rr.order(trio, View(NOW, "none", None)))[0] for _ in range(4)]
    assert heads == ["a", "b", "c", "a"]
    busy = [cand("a", in_flight=2), cand("b", in_flight=0), cand("c", in_flight=1)]
    assert names(LeastInFlight().order(busy, View(NOW, "none", None))) == ["b", "c", "a"]
