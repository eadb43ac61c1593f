"""The six orderings the simulator compares.

A policy only orders the candidates; everything else is the same for all of
them and lives in the engine (``engine.py``, with its dispatch call in
``leases.py``): which accounts are candidates, SPEC §2's walk that skips
cooling identities and acquires the first one with a free slot and pacing
room, waiting when every candidate is only locally throttled, binding a
session on success, cooldowns and quota. ``sticky`` says whether the policy
uses SPEC's sticky fast path (the reference gateway and its two earlier
versions do; the generic balancers have no session affinity).

kiropool's policy *is* ``routing.selection.order_candidates``. The others that
rank by latency read the real smoothed score from the same call (``Ranked``)
and re-sort it their own way, so every policy scores with the same maths and
only the ordering differs.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from routing.readiness import cooldown_remaining
from routing.selection import (
    BAND_FRACTION,
    MIN_TOLERANCE_MS,
    POOL_BALANCED,
    Candidate,
    LatencySnapshot,
    Ranked,
    SelectionContext,
    latency_usable,
    order_candidates,
)

SessionState = Literal["none", "new", "sticky"]


@dataclass(frozen=True, slots=True)
class View:
    """What a policy may look at besides the candidates."""

    now: datetime
    session: SessionState  # "sticky" here means the fast path did not serve it
    snapshot: LatencySnapshot | None
    preferred_pool: str = POOL_BALANCED  # the request's key's
    # Live sessions per identity over every account of the key, excluded
    # ones included (key 3); None: summed over the candidates given.
    session_totals: Mapping[str, int] | None = None


class Policy:
    name = ""
    label = ""
    sticky = False
    # Whether it reads the latency snapshot; the engine skips rebuilding it
    # (the costliest periodic step) for policies that do not.
    uses_snapshot = False

    def order(self, candidates: Sequence[Candidate], view: View) -> list[Candidate]:
        raise NotImplementedError

    def observe(self, account: str, first_token_ms: float) -> None:
        """A successful request's first-token latency, as it completes."""


def _started(c: Candidate) -> tuple[bool, datetime | None]:
    # Never started first, then earliest: the round-robin tie-break.
    return (c.last_started_at is not None, c.last_started_at)


class Kiropool(Policy):
    """SPEC §2 as implemented: ``order_candidates`` with new-session spread
    whenever the request has a session id the fast path did not serve."""

    name = "kiropool"
    label = "kiropool (bands + spread)"
    sticky = True
    uses_snapshot = True

    def order(self, candidates: Sequence[Candidate], view: View) -> list[Candidate]:
        ctx = SelectionContext(
            now=view.now,
            preferred_pool=view.preferred_pool,
            snapshot=view.snapshot,
            spread_sessions=view.session != "none",
            session_totals=view.session_totals,
        )
        return [r.candidate for r in order_candidates(candidates, ctx)]


def _ranked_without_spread(candidates: Sequence[Candidate], view: View) -> list[Ranked]:
    ctx = SelectionContext(now=view.now, preferred_pool=view.preferred_pool, snapshot=view.snapshot)
    return order_candidates(candidates, ctx)


class ExactScore(Policy):
    """The reference before its fix: proxy health, then the exact smoothed
    latency score, then last started, credits, name. No session spread."""

    name = "exact_score"
    label = "exact score (greedy)"
    sticky = True
    uses_snapshot = True

    def order(self, candidates: Sequence[Candidate], view: View) -> list[Candidate]:
        def key(r: Ranked) -> tuple[object, ...]:
            score = r.latency_score_ms
            return (
                r.proxy_in_cooldown,
                r.pool_rank,
                (score is None, score or 0.0),
                _started(r.candidate),
                -r.remaining_credits_sort,
                r.candidate.account,
            )

        return [r.candidate for r in sorted(_ranked_without_spread(candidates, view), key=key)]


class FlooredBands(Policy):
    """The reference's first attempt: bands ``floor(score / (G·15 %))``
    anchored at zero, and spread for brand-new sessions only, counted per
    account name (so aliases of one identity do not share a load figure)."""

    name = "floored_bands"
    label = "floored bands (first attempt)"
    sticky = True
    uses_snapshot = True

    def order(self, candidates: Sequence[Candidate], view: View) -> list[Candidate]:
        width = None
        snapshot = view.snapshot
        if snapshot is not None and latency_usable(snapshot, now=view.now, enabled=True):
            width = max(snapshot.global_avg_ms * BAND_FRACTION, MIN_TOLERANCE_MS)
        spread = view.session == "new"

        def key(r: Ranked) -> tuple[object, ...]:
            score = r.latency_score_ms
            band = math.floor(score / width) if width is not None and score is not None else None
            return (
                r.proxy_in_cooldown,
                r.candidate.bound_sessions if spread else 0,
                r.pool_rank,
                (band is None, band or 0),
                _started(r.candidate),
                -r.remaining_credits_sort,
                r.candidate.account,
            )

        return [r.candidate for r in sorted(_ranked_without_spread(candidates, view), key=key)]


class LiteLLMLowestLatency(Policy):
    """LiteLLM's ``latency-based-routing``: each deployment (account) is
    scored by the mean of its last ``window`` latencies, an unused one as 0
    (so it is tried first); a random pick among those within
    ``buffer × lowest`` of the lowest. Deployments in cooldown are left out
    of the pick. The rest follow by latency as the fallback order, which is
    kinder than LiteLLM itself (it queues on the pick's parallel-request limit
    instead of moving on). No session affinity."""

    name = "litellm"
    label = "LiteLLM lowest latency"

    def __init__(self, rng: random.Random, *, buffer: float, window: int) -> None:
        self.rng = rng
        self.buffer = buffer
        self.window = window
        self.latencies: dict[str, deque[float]] = {}

    def observe(self, account: str, first_token_ms: float) -> None:
        self.latencies.setdefault(account, deque(maxlen=self.window)).append(first_token_ms)

    def _latency(self, account: str) -> float:
        values = self.latencies.get(account)
        return sum(values) / len(values) if values else 0.0

    def order(self, candidates: Sequence[Candidate], view: View) -> list[Candidate]:
        shuffled = list(candidates)
        self.rng.shuffle(shuffled)  # LiteLLM shuffles first, so equal latencies tie at random
        by_latency = sorted(shuffled, key=lambda c: self._latency(c.account))
        healthy = [c for c in by_latency if cooldown_remaining(c.identity_cooldown_until, view.now) is None]
        if not healthy:
            return by_latency
        lowest = self._latency(healthy[0].account)
        pick = self.rng.choice([c for c in healthy if self._latency(c.account) <= lowest * (1 + self.buffer)])
        return [pick, *(c for c in by_latency if c is not pick)]


class RoundRobin(Policy):
    """Plain round robin over the candidate accounts, one step per dispatch.
    No session affinity, no latency."""

    name = "round_robin"
    label = "round robin"

    def __init__(self) -> None:
        self.turn = 0

    def order(self, candidates: Sequence[Candidate], view: View) -> list[Candidate]:
        ring = sorted(candidates, key=lambda c: c.account)
        start = self.turn % len(ring) if ring else 0
        self.turn += 1
        return ring[start:] + ring[:start]


class LeastInFlight(Policy):
    """Least connections: fewest live leases on the identity first, ties
    round-robin. No session affinity, no latency."""

    name = "least_in_flight"
    label = "least in-flight"

    def order(self, candidates: Sequence[Candidate], view: View) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (c.in_flight, _started(c), c.account))


POLICY_NAMES = ("kiropool", "exact_score", "floored_bands", "litellm", "round_robin", "least_in_flight")


def policy_build(name: str, *, seed: int, litellm_buffer: float = 0.5, litellm_window: int = 10) -> Policy:
    if name == "kiropool":
        return Kiropool()
    if name == "exact_score":
        return ExactScore()
    if name == "floored_bands":
        return FlooredBands()
    if name == "litellm":
        return LiteLLMLowestLatency(random.Random(f"{seed}:litellm"), buffer=litellm_buffer, window=litellm_window)
    if name == "round_robin":
        return RoundRobin()
    if name == "least_in_flight":
        return LeastInFlight()
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
