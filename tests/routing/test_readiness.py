"""Table tests for readiness (``routing/readiness.py``): whether a
candidate can start a lease now, and why not. No database, no Django."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from routing.readiness import (
    cooldown_remaining,
    effective_concurrency,
    miss_of,
    pacing_ready_at,
    retry_after_seconds,
    slow_start_step_at,
    sticky_fast_path_ok,
    sticky_patience_applies,
    throttle_state,
)
from tests.routing.policy import NOW, cand, ctx

# --- acquisition helpers ------------------------------------------------------


@pytest.mark.parametrize(
    ("until", "expected"),
    [
        (None, None),
        (NOW - timedelta(seconds=1), None),
        (NOW, None),
        (NOW + timedelta(seconds=90), timedelta(seconds=90)),
    ],
)
def test_cooldown_remaining(until: datetime | None, expected: timedelta | None) -> None:
    assert cooldown_remaining(until, NOW) == expected


@pytest.mark.parametrize(
    ("last_started_at", "interval_ms", "expected"),
    [
        (None, 500, None),
        (NOW, 0, None),
        (NOW, 500, NOW + timedelta(milliseconds=500)),
    ],
)
def test_pacing_ready_at(last_started_at: datetime | None, interval_ms: int, expected: datetime | None) -> None:
    c = cand("a", last_started_at=last_started_at, min_start_interval_ms=interval_ms)
    assert pacing_ready_at(c) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, "ready", id="idle"),
        pytest.param(
            {"identity_cooldown_until": NOW + timedelta(seconds=5)},
            "cooling",
            id="cooling",
        ),
        pytest.param({"identity_cooldown_until": NOW}, "ready", id="cooldown-ends-now"),
        pytest.param({"in_flight": 1}, "saturated", id="saturated"),
        pytest.param({"in_flight": 2, "max_concurrency": 3}, "ready", id="below-limit"),
        pytest.param(
            {
                "last_started_at": NOW - timedelta(milliseconds=100),
                "min_start_interval_ms": 500,
            },
            "pacing",
            id="pacing",
        ),
        pytest.param(
            {
                "last_started_at": NOW - timedelta(milliseconds=500),
                "min_start_interval_ms": 500,
            },
            "ready",
            id="pacing-elapsed-exactly",
        ),
        pytest.param(
            {"identity_cooldown_until": NOW + timedelta(seconds=5), "in_flight": 1},
            "cooling",
            id="cooling-beats-saturated",
        ),
        pytest.param(
            {"in_flight": 1, "last_started_at": NOW, "min_start_interval_ms": 500},
            "saturated",
            id="saturated-beats-pacing",
        ),
    ],
)
def test_throttle_state(fields: dict[str, object], expected: str) -> None:
    assert throttle_state(cand("a", **fields), NOW) == expected


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (timedelta(0), 1),
        (timedelta(milliseconds=200), 1),
        (timedelta(seconds=1), 1),
        (timedelta(seconds=1, microseconds=1), 2),
        (timedelta(seconds=299, milliseconds=500), 300),
        (timedelta(seconds=300), 300),
        (timedelta(seconds=-3), 1),
    ],
)
def test_retry_after_seconds(remaining: timedelta, expected: int) -> None:
    assert retry_after_seconds(remaining) == expected


@pytest.mark.parametrize(
    ("fields", "context_fields", "ok"),
    [
        pytest.param({}, {}, True, id="ready"),
        pytest.param(
            {
                "proxy_url": "http://p",
                "proxy_cooldown_until": NOW + timedelta(seconds=5),
            },
            {},
            False,
            id="proxy-cooling",
        ),
        pytest.param(
            {
                "proxy_url": "http://p",
                "proxy_cooldown_until": NOW - timedelta(seconds=5),
            },
            {},
            True,
            id="proxy-cooldown-over",
        ),
        pytest.param(
            {"identity_cooldown_until": NOW + timedelta(seconds=5)},
            {},
            False,
            id="identity-cooling",
        ),
        pytest.param({"in_flight": 1}, {}, False, id="saturated"),
        pytest.param(
            {"last_started_at": NOW, "min_start_interval_ms": 1000},
            {},
            False,
            id="pacing",
        ),
        pytest.param(
            {},
            {"preferred_accounts": frozenset({"a"})},
            False,
            id="model-preference-active",
        ),
        pytest.param(
            {"bound_sessions": 50},
            {"spread_sessions": True},
            True,
            id="load-does-not-matter",
        ),
    ],
)
def test_sticky_fast_path_ok(fields: dict[str, object], context_fields: dict[str, object], ok: bool) -> None:
    assert sticky_fast_path_ok(cand("a", **fields), ctx(**context_fields)) is ok


@pytest.mark.parametrize(
    ("fields", "context_fields", "waits"),
    [
        pytest.param({}, {}, False, id="ready: served at once, nothing to wait for"),
        pytest.param({"in_flight": 1}, {}, True, id="saturated"),
        pytest.param({"last_started_at": NOW, "min_start_interval_ms": 1000}, {}, True, id="pacing"),
        pytest.param(
            {"in_flight": 1, "identity_cooldown_until": NOW + timedelta(seconds=5)}, {}, False, id="identity-cooling"
        ),
        pytest.param({"in_flight": 1, "ejected_until": NOW + timedelta(seconds=5)}, {}, False, id="ejected"),
        pytest.param(
            {"in_flight": 1, "proxy_url": "http://p", "proxy_cooldown_until": NOW + timedelta(seconds=5)},
            {},
            False,
            id="proxy-cooling",
        ),
        pytest.param({"in_flight": 1, "quota_probe": True}, {}, False, id="exhausted, read for its probe"),
        pytest.param({"in_flight": 1}, {"preferred_accounts": frozenset({"a"})}, False, id="model-preference"),
    ],
)
def test_sticky_patience_waits_only_for_a_crowded_account(
    fields: dict[str, object], context_fields: dict[str, object], waits: bool
) -> None:
    assert sticky_patience_applies(cand("a", **fields), ctx(**context_fields)) is waits


def test_a_slow_start_step_is_when_a_full_ramping_identity_may_start_again() -> None:
    back = NOW - timedelta(seconds=10)
    ramping = cand("a", max_concurrency=4, ejected_until=back, in_flight=1)  # 1 + ⌊3 · 10/60⌋ = 1 slot
    miss = miss_of([ramping], NOW, slow_start=timedelta(seconds=60))
    step = back + timedelta(seconds=20, milliseconds=1)  # the second slot comes 20 s after the return
    assert miss.locally_throttled and miss.next_ready_at == step
    assert effective_concurrency(ramping, step, timedelta(seconds=60)) == 2
    assert effective_concurrency(ramping, step - timedelta(milliseconds=2), timedelta(seconds=60)) == 1
    # At its full limit, a step adds nothing: only a release can help.
    full = cand("a", max_concurrency=4, ejected_until=back, in_flight=4)
    assert miss_of([full], NOW, slow_start=timedelta(seconds=60)).next_ready_at is None
    # Not ramping: past the window, or no ejection.
    assert slow_start_step_at(cand("a", max_concurrency=4, ejected_until=NOW - timedelta(seconds=61)), NOW) is None
    assert slow_start_step_at(cand("a", max_concurrency=4), NOW) is None
