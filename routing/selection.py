"""The ordering contract: which candidate account serves a request.

Pure on purpose: no Django import, no I/O, and ``now`` is always passed in, so
the policy can be table-tested without a database and replayed by the
fairness simulator. The database orders the same way
(``routing/selectors/candidates.py``, checked against this module on random
pools); ``routing/leases.py`` takes a slot (``slots.py``) on the first candidate that can
start a lease.

The ordering (SPEC §2), highest precedence first; a key that ties passes to
the next:

1. Proxy health: a candidate whose proxy is cooling down sorts after all
   others. It stays in the list as a last resort rather than being dropped,
   because a cooling proxy is better than a 429 when nothing else is left.
2. Model preference: accounts the key prefers for the request's model first.
3. Fewest bound sessions (only when ``ctx.spread_sessions``): live bindings
   summed per *routing identity* over every account of the key, excluded ones
   included, ascending. Aliases of one upstream user share one load figure,
   otherwise a loaded identity keeps winning new sessions through whichever
   alias has no bindings yet (or through excluding the loaded alias).
4. Pool rank: the key's preferred pool, then the others in ``POOLS`` order.
5. Pool tie-breakers. ``balanced``: latency band, last started, remaining
   credits descending. ``credit_first``: credit pacing, remaining credits
   descending, latency band, last started. "Last started" (never first, then
   earliest) is what turns a tie into round-robin.
   Credit pacing: an account that reports a balance and the time its credits
   reset (``quota_resets_at``) has to burn ``balance / hours left`` credits
   an hour to use them before they are wasted at the reset; such accounts
   come first, the most urgent first. Accounts without a known reset keep
   the order they had before, after them.
6. Account name ascending, so equal candidates order the same in every
   process and the explain endpoint is reproducible.

Whether a candidate can start a lease now, and why not when none can, is
the other half of the policy: ``routing/readiness.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

POOL_BALANCED = "balanced"
POOL_CREDIT_FIRST = "credit_first"
# Fixed fallback order after the key's preferred pool; changing it reorders
# every key that prefers neither pool explicitly.
POOLS = (POOL_BALANCED, POOL_CREDIT_FIRST)

# The snapshot is rebuilt every 60 s. Five minutes rides out several missed
# rebuilds (a slow or restarting worker); older than that, the figures may describe
# a proxy or account that has since changed, and ordering by them is worse
# than falling back to round-robin.
SNAPSHOT_MAX_AGE = timedelta(minutes=5)

# Tolerance radius of a latency band, as a fraction of the global average:
# accounts within ±15 % of it share band 0 and fall through to round-robin.
# Ranking on exact scores let one marginally faster account win every request
# while accounts with no samples (scored at the average) starved. 15 % is the
# reference gateway's value: wide enough to absorb that edge, narrow enough
# that a clearly slow account still sorts behind.
BAND_FRACTION = 0.15

# Floor on the tolerance, in ms, so a near-zero global average (a test pool,
# a local stub upstream) cannot make every sub-millisecond wobble a new band.
MIN_TOLERANCE_MS = 1.0

# Prior weight, in samples, of the global average in a smoothed latency. A
# handful of samples cannot move an account far from the average, so one
# lucky or unlucky request does not decide its band for the next hour.
SMOOTHING_SAMPLES = 5

# The account's own latency dominates (the upstream user's region and load);
# the proxy's adds the egress path. Both sum to 1 so a score stays in ms.
ACCOUNT_WEIGHT = 0.7
PROXY_WEIGHT = 0.3

# Sort value of an unknown balance in the balanced pool: below any real
# balance, so accounts that report credits are preferred on a final tie.
UNKNOWN_BALANCED_CREDITS = -1.0

# Credit pacing divides by the hours left before the reset; a reset less than
# a minute away (or already past, not yet applied) counts as one minute away,
# so the burn rate stays finite and such an account simply comes first.
MIN_PACING_SECONDS = 60.0

# An identity back from an outlier ejection starts with one slot and gets
# the rest linearly over this window (the Django setting
# KIROPOOL_SLOW_START_SECONDS overrides it per context).
SLOW_START = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    samples: int
    avg_ms: float


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    generated_at: datetime
    global_avg_ms: float | None
    accounts: Mapping[str, LatencyStats]  # keyed by account name
    proxies: Mapping[str, LatencyStats]  # keyed by proxy url


@dataclass(frozen=True, slots=True)
class Candidate:
    account: str  # account name (unique)
    routing_identity: str  # identity name
    pool: str  # POOL_*
    proxy_url: str | None = None
    proxy_cooldown_until: datetime | None = None
    remaining_credits: float | None = None
    last_started_at: datetime | None = None  # of the identity
    identity_cooldown_until: datetime | None = None
    in_flight: int = 0  # live leases on the identity
    max_concurrency: int = 1  # identity limit
    min_start_interval_ms: int = 0  # identity pacing
    bound_sessions: int = 0  # live session bindings on THIS account (all keys)
    ejected_until: datetime | None = None  # outlier ejection of the identity; slow start follows it
    reserved: int = 0  # identity slots held for sticky sessions waiting on it
    quota_resets_at: datetime | None = None  # when the account's credits reset, if known
    quota_probe: bool = False  # quota-exhausted, let through once to see whether it recovered


@dataclass(frozen=True, slots=True)
class SelectionContext:
    now: datetime
    preferred_pool: str = POOL_BALANCED
    latency_routing_enabled: bool = True
    snapshot: LatencySnapshot | None = None
    # Model preference for this request; empty means none is active.
    preferred_accounts: frozenset[str] = frozenset()
    # Key 3: the request has a session id and the sticky fast path did not
    # serve it (a new session, or a bound one that has to move).
    spread_sessions: bool = False
    # Key 3's live sessions per routing identity, summed over every account
    # of the key, excluded ones included (an excluded alias still carries its
    # identity's load); None: summed over the candidates given.
    session_totals: Mapping[str, int] | None = None
    slow_start: timedelta = SLOW_START


@dataclass(frozen=True, slots=True)
class Ranked:
    """A candidate with the values the sort used; the explain endpoint prints these."""

    candidate: Candidate
    proxy_in_cooldown: bool
    model_preferred: bool
    session_count: int | None  # identity total; None when key 3 is inactive
    pool_rank: int
    latency_band: int | None
    latency_score_ms: float | None
    remaining_credits_sort: float
    credit_burn_per_hour: float | None = None  # credit pacing (credit_first, reset and balance known)


def round_half_away(x: float) -> int:
    """Round to the nearest integer, halves away from zero (Rust's ``f64::round``).

    Python's ``round`` rounds halves to even, which would put a score exactly
    on a band edge into a band that depends on the parity of its neighbour.
    """
    whole = math.floor(abs(x))
    # ``abs(x) - whole`` is exact, unlike ``floor(abs(x) + 0.5)``, which
    # rounds 0.49999999999999994 up to 1.
    magnitude = whole + 1 if abs(x) - whole >= 0.5 else whole
    return magnitude if x >= 0 else -magnitude


def _usable_global_avg(snapshot: LatencySnapshot | None, *, now: datetime, enabled: bool) -> float | None:
    if not enabled or snapshot is None:
        return None
    if now - snapshot.generated_at > SNAPSHOT_MAX_AGE:
        return None
    g = snapshot.global_avg_ms
    return g if g is not None and math.isfinite(g) else None


def latency_usable(snapshot: LatencySnapshot | None, *, now: datetime, enabled: bool) -> bool:
    """Whether latency may order candidates at all; if not, every band is absent."""
    return _usable_global_avg(snapshot, now=now, enabled=enabled) is not None


def _smoothed(stats: LatencyStats | None, g: float) -> float:
    # A corrupt aggregate (no samples, or a non-finite mean) counts as "no
    # information", never as fast or slow, and never leaks NaN into a sort key.
    if stats is None or stats.samples <= 0 or not math.isfinite(stats.avg_ms):
        return g
    n = stats.samples
    return (stats.avg_ms * n + g * SMOOTHING_SAMPLES) / (n + SMOOTHING_SAMPLES)


def account_score_part(stats: LatencyStats | None, g: float) -> float:
    """The account's share of a latency score: its smoothed latency, weighted."""
    return ACCOUNT_WEIGHT * _smoothed(stats, g)


def proxy_score_part(stats: LatencyStats | None, g: float) -> float:
    """The proxy's share of a latency score (no proxy, or no samples: G, weighted)."""
    return PROXY_WEIGHT * _smoothed(stats, g)


def latency_score(snapshot: LatencySnapshot, *, account: str, proxy_url: str | None) -> float:
    """Smoothed, weighted first-token latency in ms. Requires ``latency_usable``."""
    g = snapshot.global_avg_ms
    if g is None or not math.isfinite(g):
        raise ValueError("latency_score needs a snapshot with a finite global average")
    proxy = None if proxy_url is None else snapshot.proxies.get(proxy_url)
    return account_score_part(snapshot.accounts.get(account), g) + proxy_score_part(proxy, g)


def band_tolerance(global_avg_ms: float) -> float:
    """Radius of band 0 around the global average, in ms."""
    return max(global_avg_ms * BAND_FRACTION, MIN_TOLERANCE_MS)


def latency_band(score: float, global_avg_ms: float) -> int:
    """Band of a score, centred on the global average: band 0 is G ± tolerance.

    Centring matters: with bands anchored at zero the no-sample score (G)
    can sit just above a bucket edge, and an account barely faster lands a
    band lower and wins every time.
    """
    return round_half_away((score - global_avg_ms) / (2 * band_tolerance(global_avg_ms)))


def pool_ranks(preferred_pool: str) -> dict[str, int]:
    """Key 4: the preferred pool ranks 0, the others follow in ``POOLS`` order."""
    if preferred_pool not in POOLS:
        raise ValueError(f"unknown preferred pool {preferred_pool!r}")
    order = (preferred_pool, *(p for p in POOLS if p != preferred_pool))
    return {pool: rank for rank, pool in enumerate(order)}


def _known_credits(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def session_totals(candidates: Sequence[Candidate]) -> dict[str, int]:
    """Live bound sessions per routing identity, summed over ``candidates``."""
    totals: dict[str, int] = {}
    for c in candidates:
        totals[c.routing_identity] = totals.get(c.routing_identity, 0) + c.bound_sessions
    return totals


def order_candidates(candidates: Sequence[Candidate], ctx: SelectionContext) -> list[Ranked]:
    """Candidates in dispatch order, each with the values that placed it."""
    now = ctx.now
    ranks = pool_ranks(ctx.preferred_pool)
    for c in candidates:
        if c.pool not in ranks:
            raise ValueError(f"candidate {c.account!r} has unknown pool {c.pool!r}")

    identity_sessions: Mapping[str, int] = {}
    if ctx.spread_sessions:
        identity_sessions = ctx.session_totals if ctx.session_totals is not None else session_totals(candidates)

    # A fresh credit_first account reports no balance until its first
    # completion; valuing it at the best known balance keeps it from being
    # starved behind nearly exhausted accounts that did report one.
    known_credit_first = [
        v for c in candidates if c.pool == POOL_CREDIT_FIRST and (v := _known_credits(c.remaining_credits)) is not None
    ]
    unknown_credit_first = max(known_credit_first, default=0.0)

    snapshot = ctx.snapshot
    g = _usable_global_avg(snapshot, now=now, enabled=ctx.latency_routing_enabled)

    ranked: list[Ranked] = []
    for c in candidates:
        score: float | None = None
        band: int | None = None
        if snapshot is not None and g is not None:
            score = latency_score(snapshot, account=c.account, proxy_url=c.proxy_url)
            band = latency_band(score, g)

        known = _known_credits(c.remaining_credits)
        credits = known
        if credits is None:
            credits = unknown_credit_first if c.pool == POOL_CREDIT_FIRST else UNKNOWN_BALANCED_CREDITS
        burn = None
        if c.pool == POOL_CREDIT_FIRST and known is not None and c.quota_resets_at is not None:
            burn = credit_burn_per_hour(known, c.quota_resets_at, now)

        ranked.append(
            Ranked(
                candidate=c,
                proxy_in_cooldown=(c.proxy_cooldown_until is not None and c.proxy_cooldown_until > now),
                model_preferred=c.account in ctx.preferred_accounts,
                session_count=(identity_sessions.get(c.routing_identity, 0) if ctx.spread_sessions else None),
                pool_rank=ranks[c.pool],
                latency_band=band,
                latency_score_ms=score,
                remaining_credits_sort=credits,
                credit_burn_per_hour=burn,
            )
        )

    ranked.sort(key=_sort_key)
    return ranked


def _sort_key(r: Ranked) -> tuple[object, ...]:
    c = r.candidate
    # (False, x) sorts before (True, _): a band beats no band, never started
    # beats started. The second element is only compared when the first ties.
    band = (r.latency_band is None, r.latency_band or 0)
    started = (c.last_started_at is not None, c.last_started_at)
    credits = -r.remaining_credits_sort
    if c.pool == POOL_CREDIT_FIRST:
        burn = r.credit_burn_per_hour
        pacing = (burn is None, -(burn or 0.0))
        tie_breakers: tuple[object, ...] = (pacing, credits, band, started)
    else:
        tie_breakers = (band, started, credits)
    # Pool rank is unique per pool, so the two tie-breaker layouts are never
    # compared with each other.
    return (
        r.proxy_in_cooldown,
        not r.model_preferred,
        r.session_count or 0,
        r.pool_rank,
        tie_breakers,
        c.account,
    )


def credit_burn_per_hour(credits: float, resets_at: datetime, now: datetime) -> float:
    """Credits an hour the account must use to spend ``credits`` before they reset."""
    seconds = max((resets_at - now).total_seconds(), MIN_PACING_SECONDS)
    return credits * 3600.0 / seconds
