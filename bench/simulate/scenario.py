"""The simulated pool and the knobs of its traffic.

Everything here is plain data: the engine reads it, the traffic generator
draws from it, and ``--trace`` replaces the traffic (and derives the pool)
from a recorded one. The defaults are the scenario the README's figures come
from; change them on the command line, not here, when exploring.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from routing.selection import POOL_BALANCED, POOL_CREDIT_FIRST

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True, slots=True)
class IdentitySpec:
    """One upstream Kiro user and how its upstream really behaves."""

    name: str
    # True first-token latency: lognormal with this median and shape. The
    # policy never sees these, only the samples they produce.
    latency_median_ms: float
    latency_sigma: float = 0.35
    max_concurrency: int = 2
    min_start_interval_ms: int = 0
    # Warm identities have an hour of samples before the day starts; cold
    # ones are new accounts the snapshot knows nothing about.
    warm: bool = True


@dataclass(frozen=True, slots=True)
class AccountSpec:
    name: str
    identity: str
    proxy_url: str | None = None
    pool: str = POOL_BALANCED


@dataclass(frozen=True, slots=True)
class ProxySpec:
    url: str
    extra_ms: float  # added to the first token of every request through it


@dataclass(frozen=True, slots=True)
class QuotaEvent:
    """The identity's upstream answers ``quota_exhausted`` to the first request
    it serves from ``at_s`` on; an operator resets the quota ``reset_after_s``
    later."""

    identity: str
    at_s: float
    reset_after_s: float


@dataclass(frozen=True, slots=True)
class CreditPlan:
    """The identity's upstream credits: ``credits`` at the start of the day,
    one spent per served request, topped up to ``allowance`` at ``reset_s``
    (whatever is left then is wasted); the next reset is a month later, past
    the simulated day. With ``reset_known`` the dispatcher knows the reset
    time (an operator set it, completions report it); without, it only sees
    the balance, and an account that ran dry comes back through probes."""

    identity: str
    credits: float
    reset_s: float
    allowance: float
    reset_known: bool = True


@dataclass(frozen=True, slots=True)
class FailureWindow:
    """The identity's upstream answers ``outcome`` (``retry_next`` or
    ``fatal``) to a share of the requests started in [start, end): those whose
    luck draw is under ``share``, the same requests under every policy."""

    identity: str
    start_s: float
    end_s: float
    outcome: str = "retry_next"
    share: float = 1.0


@dataclass(frozen=True, slots=True)
class Pool:
    identities: tuple[IdentitySpec, ...]
    accounts: tuple[AccountSpec, ...]
    proxies: tuple[ProxySpec, ...] = ()
    # (key, preferred pool); a key not named prefers the balanced pool.
    key_pools: tuple[tuple[str, str], ...] = ()

    def preferred_pool(self, key: str) -> str:
        return dict(self.key_pools).get(key, POOL_BALANCED)

    def identity(self, name: str) -> IdentitySpec:
        for spec in self.identities:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def proxy_extra_ms(self, url: str | None) -> float:
        for proxy in self.proxies:
            if proxy.url == url:
                return proxy.extra_ms
        return 0.0


@dataclass(frozen=True, slots=True)
class Knobs:
    """Traffic model and dispatcher settings. Times in seconds unless named."""

    hours: float = 24.0
    # Sessions: a Poisson process whose rate follows the day (a cosine with
    # its peak at ``peak_hour``, ``diurnal_amplitude`` = peak/mean - 1).
    sessions_per_hour: float = 170.0
    diurnal_amplitude: float = 0.5
    peak_hour: float = 14.0
    mean_turns: float = 8.0  # geometric, at least 1
    think_median_s: float = 45.0  # user's pause between a reply and the next turn
    think_sigma: float = 1.0
    # Share of all requests that carry no session id (a Poisson stream of its own).
    stateless_share: float = 0.2
    # Upstream time after the first token (streaming the reply).
    generation_median_s: float = 20.0
    generation_sigma: float = 0.6
    keys: int = 3  # gateway API keys the sessions are spread over
    # 429 bursts: per identity a Poisson process of windows during which its
    # upstream answers rate_limited; the gateway reports it and the identity
    # cools down for ``cooldown_s`` (SPEC's default) each time it is hit.
    bursts_per_identity_day: float = 1.5
    burst_mean_minutes: float = 10.0
    cooldown_s: float = 300.0
    quota_events: tuple[QuotaEvent, ...] = (QuotaEvent("mid2", at_s=13 * HOUR, reset_after_s=2 * HOUR),)
    # Credits and failing upstreams; the default day has none (see upkeep_scenario).
    credit_plans: tuple[CreditPlan, ...] = ()
    failures: tuple[FailureWindow, ...] = ()
    # Dispatcher settings (SPEC §2, §3), at kiropool/dispatcher_settings.py's defaults.
    max_wait_ms: int = 30_000
    affinity_ttl_s: float = 6 * HOUR
    affinity_max_entries: int = 4096
    snapshot_period_s: float = 60.0
    snapshot_window_s: float = HOUR
    ejection_failures: int = 5  # KIROPOOL_EJECTION_FAILURES
    ejection_base_s: float = 30.0  # KIROPOOL_EJECTION_BASE_SECONDS
    ejection_max_s: float = 15 * 60.0  # KIROPOOL_EJECTION_MAX_SECONDS
    slow_start_s: float = 60.0  # KIROPOOL_SLOW_START_SECONDS
    quota_probe_s: float = HOUR  # KIROPOOL_QUOTA_PROBE_SECONDS
    sticky_patience_ms: int = 500  # KIROPOOL_STICKY_PATIENCE_MS
    # Samples each warm account has in the hour before the day starts.
    warm_samples: int = 30
    # LiteLLM's lowest_latency_buffer (0 in LiteLLM by default, which makes
    # the policy plain greedy; its docs suggest e.g. 0.5 to spread load).
    litellm_buffer: float = 0.5
    litellm_window: int = 10  # LiteLLM keeps the last N latencies per deployment


PROXY_A = "http://proxy-a.internal:3128"
PROXY_B = "http://proxy-b.internal:3128"


def default_pool() -> Pool:
    """12 identities: two fast, six near the average (two of them with an
    alias account, two with tighter concurrency or pacing), two slow, and two
    new accounts with no latency samples yet. 14 accounts, 22 upstream slots."""
    identities = (
        IdentitySpec("fast1", 260, 0.30),
        IdentitySpec("fast2", 330, 0.30),
        IdentitySpec("mid1", 470),
        IdentitySpec("mid2", 500),
        IdentitySpec("mid3", 520),
        IdentitySpec("mid4", 480, max_concurrency=1),
        IdentitySpec("mid5", 540, min_start_interval_ms=2000),
        IdentitySpec("mid6", 560, max_concurrency=1, min_start_interval_ms=1000),
        IdentitySpec("slow1", 950, 0.40),
        IdentitySpec("slow2", 1250, 0.40),
        IdentitySpec("new1", 490, warm=False),
        IdentitySpec("new2", 530, warm=False),
    )
    proxy_of = {"fast1": PROXY_A, "fast2": PROXY_A, "mid1": PROXY_A, "mid2": PROXY_A}
    proxy_of |= {"mid3": PROXY_B, "mid4": PROXY_B, "mid5": PROXY_B, "mid6": PROXY_B}
    accounts = [AccountSpec(spec.name, spec.name, proxy_of.get(spec.name)) for spec in identities]
    accounts += [AccountSpec("mid1-alt", "mid1", PROXY_A), AccountSpec("mid3-alt", "mid3", PROXY_B)]
    return Pool(
        identities=identities,
        accounts=tuple(sorted(accounts, key=lambda a: a.name)),
        proxies=(ProxySpec(PROXY_A, 0.0), ProxySpec(PROXY_B, 60.0)),
    )


@dataclass(frozen=True, slots=True)
class Scenario:
    pool: Pool = field(default_factory=default_pool)
    knobs: Knobs = field(default_factory=Knobs)
    seed: int = 42


# The upkeep day (issue 12): the default day's traffic on the default pool,
# split into two pools, with credits that run out and reset, and two failing
# upstreams. Resets that are a month apart in reality are squeezed into the
# day so their effect shows: staggered from early morning to late evening,
# one after the day, one the dispatcher does not know.
UPKEEP_CREDIT_FIRST = ("mid3", "mid4", "mid5", "mid6", "slow2", "new2")
UPKEEP_CREDITS = (
    CreditPlan("mid3", 800.0, reset_s=8 * HOUR, allowance=3000.0),
    CreditPlan("mid4", 1200.0, reset_s=12 * HOUR, allowance=3000.0),
    CreditPlan("mid5", 2800.0, reset_s=16 * HOUR, allowance=3000.0),
    CreditPlan("mid6", 2300.0, reset_s=20 * HOUR, allowance=3000.0),
    CreditPlan("slow2", 4000.0, reset_s=DAY + 6 * HOUR, allowance=3000.0),
    CreditPlan("new2", 600.0, reset_s=9 * HOUR, allowance=3000.0, reset_known=False),
    # balanced: the fast account everyone prefers runs dry and waits for its reset
    CreditPlan("fast1", 1200.0, reset_s=11 * HOUR, allowance=3000.0),
)
UPKEEP_FAILURES = (
    # an upstream account broken outright for an hour
    FailureWindow("mid1", 10 * HOUR, 11 * HOUR, "retry_next", 1.0),
    # a half-broken one: most requests fail for 45 minutes
    FailureWindow("fast2", 15 * HOUR, 15.75 * HOUR, "fatal", 0.7),
)
# One key of three drains the credit_first pool first.
UPKEEP_KEY_POOLS = (("key-3", POOL_CREDIT_FIRST),)


def upkeep_pool(pool: Pool | None = None) -> Pool:
    pool = pool or default_pool()
    accounts = tuple(
        replace(a, pool=POOL_CREDIT_FIRST) if a.identity in UPKEEP_CREDIT_FIRST else a for a in pool.accounts
    )
    return replace(pool, accounts=accounts, key_pools=UPKEEP_KEY_POOLS)


def upkeep_scenario(scenario: Scenario) -> Scenario:
    """The upkeep day on the same traffic as ``scenario`` (same seed and knobs)."""
    knobs = replace(scenario.knobs, credit_plans=UPKEEP_CREDITS, failures=UPKEEP_FAILURES)
    return replace(scenario, pool=upkeep_pool(scenario.pool), knobs=knobs)
