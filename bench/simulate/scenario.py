"""The simulated pool and the knobs of its traffic.

Everything here is plain data: the engine reads it, the traffic generator
draws from it, and ``--trace`` replaces the traffic (and derives the pool)
from a recorded one. The defaults are the scenario the README's figures come
from; change them on the command line, not here, when exploring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOUR = 3600.0


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
class Pool:
    identities: tuple[IdentitySpec, ...]
    accounts: tuple[AccountSpec, ...]
    proxies: tuple[ProxySpec, ...] = ()

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
    # Dispatcher settings (SPEC §2, §3).
    max_wait_ms: int = 30_000
    affinity_ttl_s: float = 6 * HOUR
    affinity_max_entries: int = 4096
    snapshot_period_s: float = 60.0
    snapshot_window_s: float = HOUR
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
