"""Table tests for the ordering contract (SPEC §2). No database, no Django."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import pytest

from routing.selection import (
    POOL_BALANCED,
    POOL_CREDIT_FIRST,
    Candidate,
    LatencySnapshot,
    LatencyStats,
    Ranked,
    SelectionContext,
    credit_burn_per_hour,
    latency_band,
    latency_score,
    latency_usable,
    order_candidates,
    round_half_away,
)
from tests.routing.policy import NOW, cand, ctx

G = 500.0


def stats(avg_ms: float, samples: int = 20) -> LatencyStats:
    return LatencyStats(samples=samples, avg_ms=avg_ms)


def snap(
    accounts: Mapping[str, LatencyStats] | None = None,
    proxies: Mapping[str, LatencyStats] | None = None,
    *,
    g: float | None = G,
    age: timedelta = timedelta(0),
) -> LatencySnapshot:
    return LatencySnapshot(
        generated_at=NOW - age,
        global_avg_ms=g,
        accounts=accounts or {},
        proxies=proxies or {},
    )


def names(ranked: Sequence[Ranked]) -> list[str]:
    return [r.candidate.account for r in ranked]


def by_account(ranked: Sequence[Ranked]) -> dict[str, Ranked]:
    return {r.candidate.account: r for r in ranked}


def dispatch_rounds(candidates: list[Candidate], context: SelectionContext, rounds: int) -> list[str]:
    """Pick the head of the order `rounds` times, starting its identity each time."""
    picked = []
    for i in range(rounds):
        now = context.now + timedelta(seconds=i)
        head = order_candidates(candidates, dataclasses.replace(context, now=now))[0].candidate
        picked.append(head.account)
        candidates = [
            dataclasses.replace(c, last_started_at=now) if c.routing_identity == head.routing_identity else c
            for c in candidates
        ]
    return picked


# --- latency arithmetic -------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.5, 1),
        (-0.5, -1),
        (1.5, 2),
        (-1.5, -2),
        (2.5, 3),  # banker's rounding would give 2
        (-2.5, -3),
        (0.0, 0),
        (0.49999999999999994, 0),  # floor(x + 0.5) gets this wrong
        (-0.467, 0),
        (-1.42, -1),
        (2.61, 3),
    ],
)
def test_round_half_away(x: float, expected: int) -> None:
    assert round_half_away(x) == expected


@pytest.mark.parametrize(
    ("score", "g", "expected"),
    [
        pytest.param(500.0, 500.0, 0, id="at-average"),
        pytest.param(430.0, 500.0, 0, id="14pct-faster-same-band"),
        pytest.param(574.9, 500.0, 0, id="inside-upper-edge"),
        pytest.param(575.0, 500.0, 1, id="upper-edge-rounds-away"),
        pytest.param(425.0, 500.0, -1, id="lower-edge-rounds-away"),
        pytest.param(287.2, 500.0, -1, id="fast"),
        pytest.param(892.0, 500.0, 3, id="slow"),
        pytest.param(3.0, 2.0, 1, id="tolerance-floor-1ms"),
        pytest.param(2.9, 2.0, 0, id="tolerance-floor-inside"),
    ],
)
def test_latency_band(score: float, g: float, expected: int) -> None:
    assert latency_band(score, g) == expected


@pytest.mark.parametrize(
    ("account_stats", "proxy_stats", "score", "band"),
    [
        pytest.param(stats(375), None, 430.0, 0, id="spec-A-20@375"),
        pytest.param(None, None, 500.0, 0, id="spec-B-no-samples"),
        pytest.param(stats(120), None, 287.2, -1, id="spec-A-20@120"),
        pytest.param(stats(1200), None, 892.0, 3, id="spec-B-20@1200"),
        pytest.param(stats(375, samples=0), None, 500.0, 0, id="zero-samples-is-G"),
        pytest.param(stats(math.nan), None, 500.0, 0, id="nan-average-is-G"),
        pytest.param(None, stats(100), 404.0, -1, id="fast-proxy"),
        pytest.param(None, stats(100, samples=0), 500.0, 0, id="proxy-without-samples"),
    ],
)
def test_latency_score_and_band(
    account_stats: LatencyStats | None,
    proxy_stats: LatencyStats | None,
    score: float,
    band: int,
) -> None:
    snapshot = snap(
        {"acct": account_stats} if account_stats else {},
        {"http://p": proxy_stats} if proxy_stats else {},
    )
    proxy_url = "http://p" if proxy_stats else None
    got = latency_score(snapshot, account="acct", proxy_url=proxy_url)
    assert got == pytest.approx(score)
    assert latency_band(got, G) == band


def test_latency_score_without_proxy_uses_average_for_the_proxy_term() -> None:
    # The proxy has samples, but the candidate has no proxy: they must not apply.
    snapshot = snap({"acct": stats(375)}, {"http://p": stats(10)})
    assert latency_score(snapshot, account="acct", proxy_url=None) == pytest.approx(430.0)


@pytest.mark.parametrize(
    ("snapshot", "enabled", "usable"),
    [
        pytest.param(snap(), True, True, id="fresh"),
        pytest.param(snap(age=timedelta(minutes=5)), True, True, id="exactly-5min"),
        pytest.param(snap(age=timedelta(minutes=5, seconds=1)), True, False, id="stale"),
        pytest.param(snap(), False, False, id="disabled-for-key"),
        pytest.param(None, True, False, id="no-snapshot"),
        pytest.param(snap(g=None), True, False, id="no-global-avg"),
        pytest.param(snap(g=math.nan), True, False, id="nan-global-avg"),
        pytest.param(snap(g=math.inf), True, False, id="inf-global-avg"),
    ],
)
def test_latency_usable(snapshot: LatencySnapshot | None, enabled: bool, usable: bool) -> None:
    assert latency_usable(snapshot, now=NOW, enabled=enabled) is usable


# --- ordering -----------------------------------------------------------------


def test_spec_worked_example_tie_alternates_by_last_started() -> None:
    # a-fast scores 430 (~14 % under the average), b-nosample 500: same band,
    # so neither starves the other. Exact scores would pick a-fast every time.
    candidates = [cand("a-fast"), cand("b-nosample")]
    context = ctx(snapshot=snap({"a-fast": stats(375)}))

    ranked = by_account(order_candidates(candidates, context))
    assert ranked["a-fast"].latency_score_ms == pytest.approx(430.0)
    assert ranked["b-nosample"].latency_score_ms == pytest.approx(500.0)
    assert ranked["a-fast"].latency_band == ranked["b-nosample"].latency_band == 0

    assert dispatch_rounds(candidates, context, 4) == ["a-fast", "b-nosample"] * 2


def test_account_outside_tolerance_keeps_winning() -> None:
    # 20 samples at 360 ms score 421.6: band -1, so rotation does not apply.
    candidates = [cand("a-nosample"), cand("b-fast")]
    context = ctx(snapshot=snap({"b-fast": stats(360)}))
    assert dispatch_rounds(candidates, context, 3) == ["b-fast"] * 3


def test_spec_fast_and_slow_bands() -> None:
    candidates = [cand("b-slow"), cand("a-fast")]
    context = ctx(snapshot=snap({"a-fast": stats(120), "b-slow": stats(1200)}))
    ranked = order_candidates(candidates, context)
    assert names(ranked) == ["a-fast", "b-slow"]
    assert [r.latency_band for r in ranked] == [-1, 3]


def test_low_latency_account_and_low_latency_proxy_lead() -> None:
    candidates = [
        cand("a-neutral", proxy_url="http://plain"),
        cand("b-slow"),
        cand("y-fast-proxy", proxy_url="http://fast"),
        cand("z-fast-account"),
    ]
    context = ctx(
        snapshot=snap(
            {"z-fast-account": stats(100), "b-slow": stats(1500)},
            {"http://fast": stats(100)},
        )
    )
    ranked = order_candidates(candidates, context)
    assert names(ranked) == ["y-fast-proxy", "z-fast-account", "a-neutral", "b-slow"]
    assert [r.latency_band for r in ranked] == [-1, -1, 0, 4]


@pytest.mark.parametrize(
    "proxy_cooldown_until",
    [
        pytest.param(NOW + timedelta(minutes=1), id="cooling"),
        pytest.param(NOW, id="ends-now"),
        pytest.param(NOW - timedelta(minutes=1), id="over"),
        pytest.param(None, id="never"),
    ],
)
def test_cooled_proxy_sorts_last_but_stays_a_candidate(
    proxy_cooldown_until: datetime | None,
) -> None:
    fast = cand(
        "a-fast",
        proxy_url="http://p",
        proxy_cooldown_until=proxy_cooldown_until,
        remaining_credits=1000.0,
    )
    candidates = [fast, cand("b-slow")]
    context = ctx(snapshot=snap({"a-fast": stats(100), "b-slow": stats(1500)}))
    ranked = order_candidates(candidates, context)

    cooling = proxy_cooldown_until is not None and proxy_cooldown_until > NOW
    assert names(ranked) == (["b-slow", "a-fast"] if cooling else ["a-fast", "b-slow"])
    assert by_account(ranked)["a-fast"].proxy_in_cooldown is cooling


@pytest.mark.parametrize(
    "context",
    [
        pytest.param(ctx(latency_routing_enabled=False, snapshot=snap()), id="disabled-for-key"),
        pytest.param(ctx(snapshot=None), id="no-snapshot"),
        pytest.param(ctx(snapshot=snap(age=timedelta(minutes=5, seconds=1))), id="stale"),
        pytest.param(ctx(snapshot=snap(g=None)), id="no-global-avg"),
        pytest.param(ctx(snapshot=snap(g=math.nan)), id="nan-global-avg"),
    ],
)
def test_latency_ignored_when_unusable(context: SelectionContext) -> None:
    accounts = {"a-slow": stats(3000), "b-fast": stats(50)}
    if context.snapshot is not None:
        context = dataclasses.replace(context, snapshot=dataclasses.replace(context.snapshot, accounts=accounts))
    ranked = order_candidates([cand("b-fast"), cand("a-slow")], context)
    # Without latency the tie falls to the name, so the slow account leads.
    assert names(ranked) == ["a-slow", "b-fast"]
    assert all(r.latency_band is None and r.latency_score_ms is None for r in ranked)


@pytest.mark.parametrize(
    ("fast_sessions", "slow_sessions", "spread", "expected", "counts"),
    [
        pytest.param(2, 1, True, ["b-slow", "a-fast"], [1, 2], id="new-session-to-least-bound"),
        pytest.param(2, 1, False, ["a-fast", "b-slow"], [None, None], id="stateless-ignores-load"),
        pytest.param(0, 0, True, ["a-fast", "b-slow"], [0, 0], id="cold-start-falls-to-band"),
    ],
)
def test_new_session_spread(
    fast_sessions: int,
    slow_sessions: int,
    spread: bool,
    expected: list[str],
    counts: list[int | None],
) -> None:
    candidates = [
        cand("a-fast", bound_sessions=fast_sessions),
        cand("b-slow", bound_sessions=slow_sessions),
    ]
    context = ctx(
        snapshot=snap({"a-fast": stats(120), "b-slow": stats(1200)}),
        spread_sessions=spread,
    )
    ranked = order_candidates(candidates, context)
    assert names(ranked) == expected
    assert [r.session_count for r in ranked] == counts


def test_spread_counts_sessions_per_routing_identity_not_account_name() -> None:
    # beta has no sessions and the most credits, but it aliases the same
    # upstream user as alpha, which holds three.
    candidates = [
        cand("alpha", routing_identity="X", bound_sessions=3),
        cand("beta", routing_identity="X", bound_sessions=0, remaining_credits=1000.0),
        cand("gamma", routing_identity="Y", bound_sessions=1, remaining_credits=10.0),
    ]
    ranked = order_candidates(candidates, ctx(spread_sessions=True))
    assert names(ranked) == ["gamma", "beta", "alpha"]
    assert {r.candidate.account: r.session_count for r in ranked} == {
        "alpha": 3,
        "beta": 3,
        "gamma": 1,
    }


def test_balanced_credit_order_then_least_recently_started_rotation() -> None:
    candidates = [
        cand("poor", remaining_credits=10.0),
        cand("rich", remaining_credits=300.0),
        cand("mid", remaining_credits=50.0),
        cand("unknown"),
    ]
    assert names(order_candidates(candidates, ctx())) == [
        "rich",
        "mid",
        "poor",
        "unknown",
    ]
    assert dispatch_rounds(candidates, ctx(), 8) == ["rich", "mid", "poor", "unknown"] * 2


def test_credit_first_credits_beat_rotation() -> None:
    candidates = [
        cand("poor", pool=POOL_CREDIT_FIRST, remaining_credits=10.0),
        cand("rich", pool=POOL_CREDIT_FIRST, remaining_credits=300.0),
    ]
    context = ctx(preferred_pool=POOL_CREDIT_FIRST)
    assert dispatch_rounds(candidates, context, 3) == ["rich"] * 3


def test_credit_first_credits_beat_latency() -> None:
    candidates = [
        cand("fast", pool=POOL_CREDIT_FIRST, remaining_credits=10.0),
        cand("slow", pool=POOL_CREDIT_FIRST, remaining_credits=20.0),
    ]
    context = ctx(snapshot=snap({"fast": stats(50), "slow": stats(3000)}))
    assert names(order_candidates(candidates, context)) == ["slow", "fast"]


@pytest.mark.parametrize(
    ("candidates", "expected_sort"),
    [
        pytest.param(
            [
                cand("a", pool=POOL_CREDIT_FIRST, remaining_credits=100.0),
                cand("b", pool=POOL_CREDIT_FIRST),
                cand("c", pool=POOL_CREDIT_FIRST, remaining_credits=5.0),
                cand("d"),
                cand("e", remaining_credits=10_000.0),
            ],
            {"a": 100.0, "b": 100.0, "c": 5.0, "d": -1.0, "e": 10_000.0},
            id="best-known-credit-first-only",
        ),
        pytest.param(
            [cand("a", pool=POOL_CREDIT_FIRST), cand("b", remaining_credits=50.0)],
            {"a": 0.0, "b": 50.0},
            id="none-known-is-zero",
        ),
        pytest.param(
            [
                cand("x", pool=POOL_CREDIT_FIRST, remaining_credits=math.nan),
                cand("y", pool=POOL_CREDIT_FIRST, remaining_credits=40.0),
                cand("z", remaining_credits=math.inf),
            ],
            {"x": 40.0, "y": 40.0, "z": -1.0},
            id="non-finite-is-unknown",
        ),
    ],
)
def test_remaining_credits_sort_value(candidates: list[Candidate], expected_sort: dict[str, float]) -> None:
    ranked = order_candidates(candidates, ctx())
    assert {r.candidate.account: r.remaining_credits_sort for r in ranked} == expected_sort


def test_credit_first_unknown_credits_are_not_starved() -> None:
    candidates = [
        cand("a", pool=POOL_CREDIT_FIRST, remaining_credits=100.0, last_started_at=NOW),
        cand("b-fresh", pool=POOL_CREDIT_FIRST),
        cand("c", pool=POOL_CREDIT_FIRST, remaining_credits=5.0),
    ]
    context = ctx(preferred_pool=POOL_CREDIT_FIRST)
    assert names(order_candidates(candidates, context)) == ["b-fresh", "a", "c"]


@pytest.mark.parametrize(
    ("preferred_pool", "expected", "ranks"),
    [
        pytest.param(POOL_BALANCED, ["bal", "cf"], [0, 1], id="balanced"),
        pytest.param(POOL_CREDIT_FIRST, ["cf", "bal"], [0, 1], id="credit-first"),
    ],
)
def test_preferred_pool_rank(preferred_pool: str, expected: list[str], ranks: list[int]) -> None:
    # cf is slower and poorer: only the pool rank can put it first.
    candidates = [
        cand("cf", pool=POOL_CREDIT_FIRST, remaining_credits=1.0),
        cand("bal", remaining_credits=1000.0),
    ]
    context = ctx(
        preferred_pool=preferred_pool,
        snapshot=snap({"bal": stats(50), "cf": stats(3000)}),
    )
    ranked = order_candidates(candidates, context)
    assert names(ranked) == expected
    assert [r.pool_rank for r in ranked] == ranks


@pytest.mark.parametrize(
    ("preferred_pool", "pool"),
    [
        pytest.param("cheapest", POOL_BALANCED, id="unknown-preferred-pool"),
        pytest.param(POOL_BALANCED, "cheapest", id="unknown-candidate-pool"),
    ],
)
def test_unknown_pool_is_rejected(preferred_pool: str, pool: str) -> None:
    with pytest.raises(ValueError, match="cheapest"):
        order_candidates([cand("a", pool=pool)], ctx(preferred_pool=preferred_pool))


def test_model_preference_comes_first() -> None:
    # The preferred account is slower, loaded, poorer and in the other pool.
    candidates = [
        cand("a-other", remaining_credits=1000.0),
        cand(
            "z-preferred",
            pool=POOL_CREDIT_FIRST,
            bound_sessions=9,
            remaining_credits=1.0,
        ),
    ]
    context = ctx(
        preferred_accounts=frozenset({"z-preferred"}),
        spread_sessions=True,
        snapshot=snap({"a-other": stats(50), "z-preferred": stats(3000)}),
    )
    ranked = order_candidates(candidates, context)
    assert names(ranked) == ["z-preferred", "a-other"]
    assert [r.model_preferred for r in ranked] == [True, False]


def test_proxy_health_outranks_model_preference() -> None:
    candidates = [
        cand(
            "a-preferred",
            proxy_url="http://p",
            proxy_cooldown_until=NOW + timedelta(seconds=30),
        ),
        cand("b-other"),
    ]
    context = ctx(preferred_accounts=frozenset({"a-preferred"}))
    assert names(order_candidates(candidates, context)) == ["b-other", "a-preferred"]


@pytest.mark.parametrize("order", [["c", "a", "b"], ["b", "c", "a"], ["a", "b", "c"]])
def test_account_name_is_the_final_tie_breaker(order: list[str]) -> None:
    ranked = order_candidates([cand(n) for n in order], ctx(snapshot=snap()))
    assert names(ranked) == ["a", "b", "c"]


def test_no_candidates() -> None:
    assert order_candidates([], ctx(spread_sessions=True)) == []


@pytest.mark.parametrize(
    ("resets_in", "per_hour"),
    [
        pytest.param(timedelta(hours=2), 50.0, id="two hours left"),
        pytest.param(timedelta(minutes=1), 6000.0, id="one minute left"),
        pytest.param(timedelta(seconds=10), 6000.0, id="under a minute: counted as one"),
        pytest.param(timedelta(seconds=-30), 6000.0, id="passed, not yet applied: counted as one"),
    ],
)
def test_credit_pacing_counts_at_least_a_minute_left(resets_in: timedelta, per_hour: float) -> None:
    assert credit_burn_per_hour(100.0, NOW + resets_in, NOW) == pytest.approx(per_hour)
