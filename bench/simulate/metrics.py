"""Fairness and latency figures of a run.

Fair share. An identity that spent part of the day cooling down or
quota-exhausted could not have been given its 1/n; no policy should be
blamed for that. Its fair share is therefore its selectable time over the
selectable time of all identities (equal shares when nothing went wrong), and
Jain's index is taken over each identity's share divided by its fair share,
Jain's own definition for unequal optimal allocations: J = (Σx)² / (n·Σx²),
1 when every identity got exactly its fair share, 1/n when one got it all.

An identity is starved when its share of requests or of bound sessions is
under a quarter of its fair share.

Stickiness. A returning turn is one whose session had a live binding when it
arrived; it moved when it was served on another account. Moves whose bound
account was only crowded on arrival (the ones sticky patience is for) are
counted apart from forced ones (the account cooling, ejected, out of credits,
or failing the request). "At peak" is the busiest four hours of the traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from bench.simulate.results import MOVED_CROWDED, STAYED, RunResult

STARVED_FRACTION = 0.25


def jain_index(values: Sequence[float]) -> float:
    """(Σx)² / (n·Σx²); 1.0 for an empty or all-zero allocation (nobody got more than anybody)."""
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError("Jain's index needs finite, non-negative values")
    squares = sum(v * v for v in values)
    if not values or squares == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * squares)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating between closest ranks; 0.0 for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def shares(amounts: Mapping[str, float]) -> dict[str, float]:
    total = sum(amounts.values())
    return {name: (v / total if total else 0.0) for name, v in amounts.items()}


def fairness(share: Mapping[str, float], fair: Mapping[str, float]) -> float:
    """Jain's index of share ÷ fair share, over identities with a fair share."""
    return jain_index([share.get(name, 0.0) / f for name, f in fair.items() if f > 0])


def starved(share: Mapping[str, float], fair: Mapping[str, float]) -> list[str]:
    return sorted(name for name, f in fair.items() if f > 0 and share.get(name, 0.0) < STARVED_FRACTION * f)


@dataclass(frozen=True, slots=True)
class Summary:
    policy: str
    jain_sessions: float
    jain_requests: float
    starved: list[str]
    mean_latency_ms: float
    p95_latency_ms: float
    p95_wait_ms: float
    sessions_moved: int
    requests: int
    served: int
    rejected: int
    upstream_errors: dict[str, int]
    fair_share: dict[str, float]
    request_share: dict[str, float]
    session_share: dict[str, float]  # share of the time-averaged live bindings
    # Issue 12: stickiness, waits at peak, credits and failing upstreams.
    returning: int = 0  # returning turns served
    moved: int = 0  # ... on another account
    moved_crowded: int = 0  # ... when their bound account was only crowded
    returning_peak: int = 0
    moved_peak: int = 0
    moved_crowded_peak: int = 0
    p95_wait_peak_ms: float = 0.0
    # From a request's arrival to its first token: waits, failed attempts, latency.
    p95_first_token_ms: float = 0.0
    p95_first_token_peak_ms: float = 0.0
    credits_spent: float = 0.0
    credits_wasted: float = 0.0
    failed_calls: int = 0  # upstream calls that came back retry_next or fatal
    ejections: int = 0
    probes: int = 0
    resets: list[tuple[float, str, float]] = field(default_factory=list)  # (at, identity, credits wasted)
    peak_s: tuple[float, float] = (0.0, 0.0)

    @property
    def moved_share(self) -> float:
        return self.moved / self.returning if self.returning else 0.0

    @property
    def moved_share_peak(self) -> float:
        return self.moved_peak / self.returning_peak if self.returning_peak else 0.0

    @property
    def moved_crowded_share_peak(self) -> float:
        return self.moved_crowded_peak / self.returning_peak if self.returning_peak else 0.0

    def public(self) -> dict[str, float | int]:
        """The figures ``bench/out/fairness.json`` carries, and nothing else."""
        return {
            "jain_sessions": round(self.jain_sessions, 4),
            "jain_requests": round(self.jain_requests, 4),
            "starved": len(self.starved),
            "mean_latency_ms": round(self.mean_latency_ms, 1),
            "p95_latency_ms": round(self.p95_latency_ms, 1),
            "p95_wait_ms": round(self.p95_wait_ms, 1),
            "sessions_moved": self.sessions_moved,
        }

    def upkeep(self) -> dict[str, float | int]:
        """The figures ``bench/out/upkeep.json`` and ``patience.json`` carry."""
        return {
            "credits_wasted": round(self.credits_wasted, 1),
            "credits_spent": round(self.credits_spent, 1),
            "failed_calls": self.failed_calls,
            "ejections": self.ejections,
            "probes": self.probes,
            "sessions_moved": self.sessions_moved,
            "returning_turns": self.returning,
            "moved_share": round(self.moved_share, 4),
            "returning_turns_peak": self.returning_peak,
            "moved_share_peak": round(self.moved_share_peak, 4),
            "moved_crowded_share_peak": round(self.moved_crowded_share_peak, 4),
            "p95_wait_ms": round(self.p95_wait_ms, 1),
            "p95_wait_peak_ms": round(self.p95_wait_peak_ms, 1),
            "p95_first_token_ms": round(self.p95_first_token_ms, 1),
            "p95_first_token_peak_ms": round(self.p95_first_token_peak_ms, 1),
            "rejected": self.rejected,
        } | self.public()

    def details(self) -> dict:
        return asdict(self)


def summarize(result: RunResult) -> Summary:
    names = result.identities
    fair = shares(dict(zip(names, result.available_s, strict=True)))
    request_share = shares(dict(zip(names, map(float, result.served), strict=True)))
    ticks = max(len(result.bindings), 1)
    mean_bound = [sum(row[i] for row in result.bindings) / ticks for i in range(len(names))]
    session_share = shares(dict(zip(names, mean_bound, strict=True)))
    latencies = result.latencies_ms
    start, end = result.peak_s
    peak = [r for r in result.returning if start <= r[0] < end]
    peak_waits = [w for w, a in zip(result.waits_ms, result.turn_arrivals_s, strict=False) if start <= a < end]
    errors = result.upstream_errors
    return Summary(
        policy=result.policy,
        jain_sessions=fairness(session_share, fair),
        jain_requests=fairness(request_share, fair),
        starved=sorted(set(starved(request_share, fair)) | set(starved(session_share, fair))),
        mean_latency_ms=sum(latencies) / len(latencies) if latencies else 0.0,
        p95_latency_ms=percentile(latencies, 95),
        p95_wait_ms=percentile(result.waits_ms, 95),
        sessions_moved=result.sessions_moved,
        requests=result.requests,
        served=sum(result.served),
        rejected=sum(result.rejected.values()),
        upstream_errors=dict(result.upstream_errors),
        fair_share=fair,
        request_share=request_share,
        session_share=session_share,
        returning=len(result.returning),
        moved=sum(code != STAYED for _, code in result.returning),
        moved_crowded=sum(code == MOVED_CROWDED for _, code in result.returning),
        returning_peak=len(peak),
        moved_peak=sum(code != STAYED for _, code in peak),
        moved_crowded_peak=sum(code == MOVED_CROWDED for _, code in peak),
        p95_wait_peak_ms=percentile(peak_waits, 95),
        p95_first_token_ms=percentile([ms for _, ms in result.first_tokens], 95),
        p95_first_token_peak_ms=percentile([ms for a, ms in result.first_tokens if start <= a < end], 95),
        credits_spent=result.credits_spent,
        credits_wasted=result.credits_wasted,
        failed_calls=errors.get("retry_next", 0) + errors.get("fatal", 0),
        ejections=result.ejections,
        probes=result.probes,
        resets=list(result.resets),
        peak_s=result.peak_s,
    )


def dominating(summaries: Sequence[Summary], *, on: str, policy: str = "kiropool") -> list[str]:
    """Policies strictly better than ``policy`` on fairness ``on`` (``"jain_sessions"`` or
    ``"jain_requests"``) and on p95 queueing wait at once."""
    base = next(s for s in summaries if s.policy == policy)
    return [
        s.policy
        for s in summaries
        if s.policy != policy and getattr(s, on) > getattr(base, on) and s.p95_wait_ms < base.p95_wait_ms
    ]
