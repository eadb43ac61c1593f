"""Whether a candidate can start a lease now, and why not when none can.

The other half of the policy beside the ordering contract
(``routing/selection.py``), and pure like it: no Django, no I/O, ``now``
passed in. Whether a candidate can start a lease now is
:func:`throttle_state`: not while its identity is cooling down or ejected
(an outlier ejection after repeated failures), not while its identity holds
as many leases as its effective concurrency (which ramps up from 1 after an
ejection: slow start), counting slots held for sticky sessions waiting on
it, and not before its pacing interval has passed. :func:`miss_of` says why
nothing could be acquired (SPEC §2): wait, or answer 429 with the shortest
cooldown. The claims check the same rules in SQL (``selectors/rules.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from routing.selection import SLOW_START, Candidate, SelectionContext

ThrottleState = Literal["cooling", "saturated", "pacing", "ready"]


def cooldown_remaining(until: datetime | None, now: datetime) -> timedelta | None:
    """Time left on a cooldown, or None when not cooling (unset or already over)."""
    if until is None or until <= now:
        return None
    return until - now


def pacing_ready_at(c: Candidate) -> datetime | None:
    """Earliest next start on the identity; None when pacing does not constrain it."""
    if c.min_start_interval_ms <= 0 or c.last_started_at is None:
        return None
    return c.last_started_at + timedelta(milliseconds=c.min_start_interval_ms)


def blocked_until(c: Candidate, now: datetime) -> datetime | None:
    """When the identity's cooldown or outlier ejection ends, if either holds now."""
    ends = [t for t in (c.identity_cooldown_until, c.ejected_until) if t is not None and t > now]
    return max(ends) if ends else None


def effective_concurrency(c: Candidate, now: datetime, slow_start: timedelta = SLOW_START) -> int:
    """The identity's limit now: back from an ejection it starts with one slot
    and ramps linearly to ``max_concurrency`` over ``slow_start``, so a
    half-broken upstream account is not flooded the moment it returns."""
    if c.ejected_until is None or now < c.ejected_until or slow_start <= timedelta(0):
        return c.max_concurrency
    if now >= c.ejected_until + slow_start:
        return c.max_concurrency
    elapsed = (now - c.ejected_until).total_seconds()
    return min(c.max_concurrency, 1 + math.floor((c.max_concurrency - 1) * elapsed / slow_start.total_seconds()))


def slow_start_step_at(c: Candidate, now: datetime, slow_start: timedelta = SLOW_START) -> datetime | None:
    """When the identity's slow-start limit next grows by a slot, or None
    when it is not ramping. A millisecond late, so that at the returned
    moment :func:`effective_concurrency` has grown whatever the rounding."""
    if c.ejected_until is None or c.max_concurrency <= 1 or slow_start <= timedelta(0):
        return None
    if not c.ejected_until <= now < c.ejected_until + slow_start:
        return None
    window, slots = slow_start.total_seconds(), c.max_concurrency - 1
    steps = math.floor(slots * (now - c.ejected_until).total_seconds() / window) + 1
    return c.ejected_until + timedelta(seconds=steps * window / slots, milliseconds=1)


def throttle_state(
    c: Candidate, now: datetime, *, slow_start: timedelta = SLOW_START, reserved: bool = True
) -> ThrottleState:
    """Why the identity cannot start a lease now, or ``"ready"``.

    Cooling (a cooldown or an ejection) is checked first: it is the only
    state the caller answers with its Retry-After rather than by waiting for
    a slot. ``reserved=False`` is how a sticky session waiting on the
    identity sees it: the slots held for waiting sessions are its own.
    """
    if blocked_until(c, now) is not None:
        return "cooling"
    held = c.in_flight + (c.reserved if reserved else 0)
    if held >= effective_concurrency(c, now, slow_start):
        return "saturated"
    ready_at = pacing_ready_at(c)
    if ready_at is not None and now < ready_at:
        return "pacing"
    return "ready"


def sticky_fast_path_ok(c: Candidate, ctx: SelectionContext) -> bool:
    """Whether the bound account may serve the session without an ordered walk.

    The caller has checked that it is a candidate. A model preference is
    re-checked here because the fast path would bypass key 2 entirely.
    """
    if ctx.preferred_accounts:
        return False
    if cooldown_remaining(c.proxy_cooldown_until, ctx.now) is not None:
        return False
    return throttle_state(c, ctx.now, slow_start=ctx.slow_start, reserved=False) == "ready"


def sticky_patience_applies(c: Candidate, ctx: SelectionContext) -> bool:
    """Whether a returning turn should wait for its bound account rather than
    move: the account is only crowded (its identity at its limit or pacing),
    not cooling, ejected, exhausted (a row read only for its quota's probe)
    or behind a cooling proxy. Moving costs the conversation its upstream
    prompt cache; a moment's crowding should not."""
    if ctx.preferred_accounts or c.quota_probe or cooldown_remaining(c.proxy_cooldown_until, ctx.now) is not None:
        return False
    return throttle_state(c, ctx.now, slow_start=ctx.slow_start, reserved=False) in ("saturated", "pacing")


@dataclass(frozen=True, slots=True)
class Miss:
    """Why no candidate can start a lease now (SPEC §2, "when nothing could
    be acquired"): the caller waits when one was only locally throttled, and
    answers 429 with the shortest cooldown when all were cooling."""

    locally_throttled: bool = False
    shortest_cooldown: timedelta | None = None
    # The earliest moment a candidate may become able to start without a
    # release: a pacing interval, a cooldown or ejection ending, a slow-start
    # step adding a slot.
    next_ready_at: datetime | None = None
    saturated: frozenset[str] = frozenset()  # identities at their limit


def miss_of(candidates: Sequence[Candidate], now: datetime, *, slow_start: timedelta = SLOW_START) -> Miss:
    """Classify the candidates nothing could be acquired on."""
    throttled = False
    shortest: timedelta | None = None
    ready_at: datetime | None = None
    saturated: set[str] = set()

    def sooner(at: datetime | None) -> None:
        nonlocal ready_at
        if at is not None and (ready_at is None or at < ready_at):
            ready_at = at

    for c in candidates:
        state = throttle_state(c, now, slow_start=slow_start)
        if state == "cooling":
            until = blocked_until(c, now)
            shortest = until - now if shortest is None else min(shortest, until - now)
            sooner(until)
        elif state == "saturated":
            throttled = True
            saturated.add(c.routing_identity)
            if c.in_flight + c.reserved < c.max_concurrency:  # held back by the slow start only
                sooner(slow_start_step_at(c, now, slow_start))
        elif state == "pacing":
            throttled = True
            sooner(pacing_ready_at(c))
        else:
            # Ready a moment ago, taken by a concurrent dispatch since: wait
            # for it like for a full identity.
            throttled = True
    return Miss(
        locally_throttled=throttled, shortest_cooldown=shortest, next_ready_at=ready_at, saturated=frozenset(saturated)
    )


def retry_after_seconds(remaining: timedelta) -> int:
    """Retry-After in whole seconds, at least 1; rounded up so no retry comes early."""
    micros = remaining // timedelta(microseconds=1)
    return max(1, -(-micros // 1_000_000))
