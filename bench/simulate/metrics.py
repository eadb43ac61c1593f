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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from bench.simulate.engine import RunResult

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
