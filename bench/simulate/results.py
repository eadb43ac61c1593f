"""What a run produces: the raw record the metrics are computed from."""

from __future__ import annotations

from dataclasses import dataclass, field

# What became of a returning turn (one whose session had a live binding when
# it arrived), once served.
STAYED, MOVED_CROWDED, MOVED_OTHER = 0, 1, 2


@dataclass(slots=True)
class RunResult:
    """What one run did with the traffic. Per-identity lists follow ``identities``."""

    policy: str  # the run's name: a policy, or a dispatcher variant of kiropool
    identities: list[str]
    served: list[int]  # successful requests per identity
    available_s: list[float]  # time each identity was selectable (not cooling, ejected or spent)
    binding_ticks: list[float]  # tick times (s)
    bindings: list[list[int]]  # live bindings per identity at each tick
    latencies_ms: list[float]  # first-token latency of every successful request
    waits_ms: list[float]  # total dispatch wait of every request (served or not)
    sessions_moved: int  # bindings re-pointed to another account
    requests: int
    rejected: dict[str, int]  # reason -> requests that got no account
    upstream_errors: dict[str, int]  # outcome -> leases that did not succeed
    turn_arrivals_s: list[float] = field(default_factory=list)  # of every request, as waits_ms
    returning: list[tuple[float, int]] = field(default_factory=list)  # (arrival, STAYED | MOVED_*) when served
    # (arrival, ms from arrival to the first token) of every served request:
    # its waits, its failed attempts and the first token of the one that served
    first_tokens: list[tuple[float, float]] = field(default_factory=list)
    peak_s: tuple[float, float] = (0.0, 0.0)  # the busiest hours of the traffic
    credits_spent: float = 0.0
    credits_wasted: float = 0.0  # left at a reset
    resets: list[tuple[float, str, float]] = field(default_factory=list)  # (at, identity, wasted)
    ejections: int = 0
    probes: int = 0
