"""Traffic: drawn from the scenario's knobs, or read from a recorded trace.

Everything random about the traffic is drawn here, once, before any policy
runs, so every policy sees the same sessions, the same pauses, the same 429
bursts and the same per-request luck. A request's first-token latency is
stored as a standard-normal draw ``z`` rather than in milliseconds: the engine
turns it into ``median·exp(σ·z)`` of whichever identity serves it, so a policy
that picks a slower identity pays for it, and two policies that pick the same
one see the same number (common random numbers: the comparison is not drowned
in sampling noise). So is its ``luck``, the draw that decides whether a
half-broken upstream fails it.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from bench.simulate.scenario import (
    HOUR,
    AccountSpec,
    CreditPlan,
    FailureWindow,
    IdentitySpec,
    Knobs,
    Pool,
    QuotaEvent,
    Scenario,
)

# Outcomes whose request the gateway retried as a new lease (which is in the
# trace on its own), so replaying them would count the request twice.
_RETRIED_OUTCOMES = {"rate_limited", "quota_exhausted", "retry_next", "fatal"}


@dataclass(frozen=True, slots=True)
class Turn:
    z_latency: float  # standard-normal draw for the first-token latency
    generation_s: float  # upstream time after the first token
    think_s: float = 0.0  # pause after the previous turn finished; 0 for the first
    luck: float = 0.5  # uniform draw: a failing upstream fails the request when it is under the failing share


@dataclass(frozen=True, slots=True)
class Script:
    """A session's turns in order, or one stateless request (no session id)."""

    key: str
    session_id: str | None
    arrival_s: float
    turns: tuple[Turn, ...]


@dataclass(frozen=True, slots=True)
class Burst:
    """The identity's upstream answers rate_limited to requests started in [start, end)."""

    identity: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class Traffic:
    scripts: tuple[Script, ...]  # by arrival
    bursts: tuple[Burst, ...]
    quota_events: tuple[QuotaEvent, ...]
    # (recorded at, account, proxy url, first_token_ms), all before t = 0
    warm_samples: tuple[tuple[float, str, str | None, float], ...]
    duration_s: float
    credit_plans: tuple[CreditPlan, ...] = ()
    failures: tuple[FailureWindow, ...] = ()

    @property
    def requests(self) -> int:
        return sum(len(s.turns) for s in self.scripts)


def diurnal_rate(t_s: float, *, mean: float, amplitude: float, peak_hour: float) -> float:
    """Rate at ``t_s`` (seconds since midnight): a cosine over the day around ``mean``."""
    phase = 2 * math.pi * (t_s / HOUR - peak_hour) / 24.0
    return max(0.0, mean * (1.0 + amplitude * math.cos(phase)))


def poisson_arrivals(
    rng: random.Random, rate: Callable[[float], float], *, rate_max: float, duration_s: float
) -> list[float]:
    """Arrival times of a non-homogeneous Poisson process (Lewis–Shedler thinning).

    ``rate`` and ``rate_max`` are per second; ``rate(t) <= rate_max`` must hold."""
    times: list[float] = []
    if rate_max <= 0:
        return times
    t = 0.0
    while True:
        t += rng.expovariate(rate_max)
        if t >= duration_s:
            return times
        if rng.random() * rate_max < rate(t):
            times.append(t)


def geometric_turns(rng: random.Random, mean: float) -> int:
    """Turns in a session: geometric on 1, 2, ... with the given mean."""
    if mean <= 1:
        return 1
    p = 1.0 / mean
    return 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - p))


def lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(sigma * rng.gauss(0.0, 1.0))


def first_token_ms(spec: IdentitySpec, z: float, proxy_extra_ms: float = 0.0) -> float:
    return spec.latency_median_ms * math.exp(spec.latency_sigma * z) + proxy_extra_ms


def traffic_generate(scenario: Scenario) -> Traffic:
    knobs, pool = scenario.knobs, scenario.pool
    duration = knobs.hours * HOUR
    # One stream per concern, so turning one knob does not reshuffle the others.
    rng_sessions = random.Random(f"{scenario.seed}:sessions")
    rng_stateless = random.Random(f"{scenario.seed}:stateless")
    rng_bursts = random.Random(f"{scenario.seed}:bursts")
    rng_warm = random.Random(f"{scenario.seed}:warm")
    rng_luck = random.Random(f"{scenario.seed}:luck")

    keys = [f"key-{k + 1}" for k in range(max(1, knobs.keys))]
    amplitude = max(0.0, knobs.diurnal_amplitude)
    scripts: list[Script] = []

    session_mean = knobs.sessions_per_hour / HOUR
    arrivals = poisson_arrivals(
        rng_sessions,
        lambda t: diurnal_rate(t, mean=session_mean, amplitude=amplitude, peak_hour=knobs.peak_hour),
        rate_max=session_mean * (1 + amplitude),
        duration_s=duration,
    )
    for n, at in enumerate(arrivals):
        turns = []
        for i in range(geometric_turns(rng_sessions, knobs.mean_turns)):
            think = 0.0 if i == 0 else lognormal(rng_sessions, knobs.think_median_s, knobs.think_sigma)
            gen = lognormal(rng_sessions, knobs.generation_median_s, knobs.generation_sigma)
            z = rng_sessions.gauss(0.0, 1.0)
            turns.append(Turn(z_latency=z, generation_s=gen, think_s=think, luck=rng_luck.random()))
        scripts.append(Script(rng_sessions.choice(keys), f"session-{n + 1:06d}", at, tuple(turns)))

    share = min(max(knobs.stateless_share, 0.0), 0.95)
    stateless_mean = session_mean * max(knobs.mean_turns, 1.0) * share / (1.0 - share)
    for at in poisson_arrivals(
        rng_stateless,
        lambda t: diurnal_rate(t, mean=stateless_mean, amplitude=amplitude, peak_hour=knobs.peak_hour),
        rate_max=stateless_mean * (1 + amplitude),
        duration_s=duration,
    ):
        gen = lognormal(rng_stateless, knobs.generation_median_s, knobs.generation_sigma)
        turn = Turn(z_latency=rng_stateless.gauss(0.0, 1.0), generation_s=gen, luck=rng_luck.random())
        scripts.append(Script(rng_stateless.choice(keys), None, at, (turn,)))

    bursts: list[Burst] = []
    burst_rate = knobs.bursts_per_identity_day / (24 * HOUR)
    for spec in pool.identities:
        for start in poisson_arrivals(rng_bursts, lambda _t: burst_rate, rate_max=burst_rate, duration_s=duration):
            length = rng_bursts.expovariate(1.0 / (knobs.burst_mean_minutes * 60.0))
            bursts.append(Burst(spec.name, start, start + length))

    warm: list[tuple[float, str, str | None, float]] = []
    for account in pool.accounts:
        spec = pool.identity(account.identity)
        if not spec.warm:
            continue
        extra = pool.proxy_extra_ms(account.proxy_url)
        for _ in range(knobs.warm_samples):
            at = -rng_warm.random() * knobs.snapshot_window_s
            warm.append((at, account.name, account.proxy_url, first_token_ms(spec, rng_warm.gauss(0.0, 1.0), extra)))

    scripts.sort(key=lambda s: (s.arrival_s, s.session_id or ""))
    names = {i.name for i in pool.identities}
    return Traffic(
        scripts=tuple(scripts),
        bursts=tuple(sorted(bursts, key=lambda b: (b.start_s, b.identity))),
        quota_events=tuple(e for e in knobs.quota_events if e.identity in names),
        warm_samples=tuple(sorted(warm)),
        duration_s=duration,
        credit_plans=tuple(c for c in knobs.credit_plans if c.identity in names),
        failures=tuple(f for f in knobs.failures if f.identity in names),
    )


# The peak the figures "at peak" are taken over: the busiest hours in a row.
PEAK_HOURS = 4


def peak_window(traffic: Traffic, hours: int = PEAK_HOURS) -> tuple[float, float]:
    """The ``hours`` whole hours in a row (from the start of the traffic) in
    which the most scripts arrive; the whole traffic when it is shorter."""
    buckets = [0] * max(1, math.ceil(traffic.duration_s / HOUR))
    for script in traffic.scripts:
        buckets[min(int(script.arrival_s // HOUR), len(buckets) - 1)] += 1
    if len(buckets) <= hours:
        return 0.0, traffic.duration_s
    sums = [sum(buckets[i : i + hours]) for i in range(len(buckets) - hours + 1)]
    first = sums.index(max(sums))
    return first * HOUR, (first + hours) * HOUR


def trace_load(
    lines: Iterable[str],
    *,
    knobs: Knobs,
    seed: int,
    concurrency: int = 2,
    burst_s: float = 60.0,
    quota_reset_s: float = 2 * HOUR,
) -> tuple[Pool, Traffic]:
    """A recorded trace (``manage.py export_trace``) as a pool and its traffic.

    Arrivals keep their recorded times, keys and session ids; generation time
    is what the upstream took after the first token. The pool is every
    identity and account the trace names; an identity's true latency is the
    lognormal fitted to its recorded first tokens (identities without any are
    new accounts at the trace's median).

    A recorded 429 becomes a burst on its identity, ``burst_s`` long: a policy
    that sends a request there around then is throttled too (and the identity
    cools down for ``cooldown_s``), one that does not is spared. A recorded
    quota exhaustion becomes a quota event, reset ``quota_reset_s`` later.
    Concurrency and pacing are not in the trace: every identity gets
    ``concurrency`` slots and no pacing."""
    rows = [json.loads(line) for line in lines if line.strip()]
    if not rows:
        raise ValueError("the trace has no requests")
    rng = random.Random(f"{seed}:trace")
    started = [_parse_time(r["started_at"]) for r in rows]
    t0 = min(started)

    identity_of: dict[str, str] = {}
    latencies: dict[str, list[float]] = {}
    for r in rows:
        account = r["account_name"]
        identity = r.get("routing_identity") or account
        identity_of.setdefault(account, identity)
        ms = r.get("first_token_ms")
        if r.get("outcome") == "success" and isinstance(ms, int | float) and ms > 0:
            latencies.setdefault(identity, []).append(float(ms))
    every = [ms for values in latencies.values() for ms in values]
    overall = statistics.median(every) if every else 500.0

    identities = []
    for name in sorted(set(identity_of.values())):
        logs = [math.log(ms) for ms in latencies.get(name, [])]
        median = math.exp(statistics.fmean(logs)) if logs else overall
        sigma = statistics.stdev(logs) if len(logs) >= 2 else 0.35
        identities.append(IdentitySpec(name, median, sigma, max_concurrency=concurrency, warm=False))
    pool = Pool(
        identities=tuple(identities),
        accounts=tuple(AccountSpec(a, i) for a, i in sorted(identity_of.items())),
    )

    scripts: list[Script] = []
    bursts: list[Burst] = []
    quota: list[QuotaEvent] = []
    last = 0.0
    for r, when in zip(rows, started, strict=True):
        at = (when - t0).total_seconds()
        last = max(last, at)
        outcome = r.get("outcome") or ""
        identity = identity_of[r["account_name"]]
        if outcome == "rate_limited":
            bursts.append(Burst(identity, at, at + burst_s))
        elif outcome == "quota_exhausted":
            quota.append(QuotaEvent(identity, at, quota_reset_s))
        if outcome in _RETRIED_OUTCOMES:
            continue
        gen = _recorded_generation_s(r, when)
        if gen is None:
            gen = lognormal(rng, knobs.generation_median_s, knobs.generation_sigma)
        session = (r.get("session_id") or "").strip() or None
        key = r.get("api_key") or "key-unknown"
        scripts.append(Script(key, session, at, (Turn(z_latency=rng.gauss(0.0, 1.0), generation_s=gen),)))

    scripts.sort(key=lambda s: (s.arrival_s, s.session_id or ""))
    traffic = Traffic(
        scripts=tuple(scripts),
        bursts=tuple(sorted(bursts, key=lambda b: (b.start_s, b.identity))),
        quota_events=tuple(sorted(quota, key=lambda e: (e.at_s, e.identity))),
        warm_samples=(),
        duration_s=last + 900.0,  # room for the last requests to finish
    )
    return pool, traffic


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _recorded_generation_s(row: dict, started: datetime) -> float | None:
    if row.get("outcome") != "success" or not row.get("completed_at"):
        return None
    total = (_parse_time(row["completed_at"]) - started).total_seconds()
    first = (row.get("first_token_ms") or 0.0) / 1000.0
    return max(0.1, total - first)
