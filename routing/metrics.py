"""Prometheus metrics.

Two kinds:

- Events, counted where they happen: dispatches by result, dispatch and wait
  durations, completions by outcome. The gateway views call
  :func:`dispatch_observe` and :func:`completion_observe`. With several web
  workers each process counts its own; with ``PROMETHEUS_MULTIPROC_DIR``
  set (``kiropool/serve.py`` sets it) prometheus_client keeps the
  counts in files there and a scrape sums every worker's.
- State, read from the database by :class:`PoolStateCollector`: leases in
  flight and live bindings per identity, identities cooling down, the
  snapshot's age. The database is the truth shared by every process and host,
  so these are right whichever worker answers the scrape; a reading is reused
  for up to ``POOL_STATE_CACHE_SECONDS`` in a process.
"""

from __future__ import annotations

import logging
import os

from django.utils import timezone
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from core.database import database_errors, database_ping
from core.recent import RecentValue
from routing.selectors import operator as selectors

logger = logging.getLogger(__name__)

# A dispatch that got a lease:
#   sticky_hit     the session's bound account served it at once
#   sticky_waited  ... after the session waited for it (sticky patience)
#   sticky_moved   the session was bound, and moved to another account
#   new_session    a session id with no live binding got an account
#   acquired       no session id
# A dispatch that did not: rate_limited (429), all_failed (502), unavailable (503).
DISPATCH_RESULTS = (
    "acquired",
    "sticky_hit",
    "sticky_waited",
    "sticky_moved",
    "new_session",
    "rate_limited",
    "all_failed",
    "unavailable",
)
COMPLETION_OUTCOMES = ("success", "rate_limited", "quota_exhausted", "retry_next", "fatal")

# A dispatch answers in milliseconds unless it waits for a slot, which it may
# do for up to 300 s (max_wait_ms): buckets cover both ends.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

DISPATCHES = Counter("kiropool_dispatches", "Dispatch calls by result.", ["result"])
DISPATCH_SECONDS = Histogram(
    "kiropool_dispatch_duration_seconds", "Time to answer a dispatch, waiting included.", buckets=DURATION_BUCKETS
)
DISPATCH_WAIT_SECONDS = Histogram(
    "kiropool_dispatch_wait_seconds",
    "Time a dispatch waited for a concurrency or pacing slot.",
    buckets=(0,) + DURATION_BUCKETS,
)
COMPLETIONS = Counter("kiropool_lease_completions", "Lease completions by outcome.", ["outcome"])
STICKY_WAIT_SECONDS = Histogram(
    "kiropool_sticky_wait_seconds",
    "Time a returning turn waited for its busy bound account before it served (sticky patience).",
    buckets=DURATION_BUCKETS,
)
EJECTIONS = Counter("kiropool_identity_ejections", "Routing identities ejected after repeated failures.")

# Every label value exists from the start, so rates work from the first scrape.
for _result in DISPATCH_RESULTS:
    DISPATCHES.labels(result=_result)
for _outcome in COMPLETION_OUTCOMES:
    COMPLETIONS.labels(outcome=_outcome)


def dispatch_observe(result: str, seconds: float, waited_seconds: float) -> None:
    """Count one dispatch call. ``result`` is one of ``DISPATCH_RESULTS``;
    ``seconds`` the whole call, ``waited_seconds`` the part spent waiting."""
    if result not in DISPATCH_RESULTS:
        raise ValueError(f"unknown dispatch result {result!r}")
    DISPATCHES.labels(result=result).inc()
    DISPATCH_SECONDS.observe(max(0.0, seconds))
    DISPATCH_WAIT_SECONDS.observe(max(0.0, waited_seconds))


def sticky_wait_observe(seconds: float) -> None:
    STICKY_WAIT_SECONDS.observe(max(0.0, seconds))


def ejection_observe() -> None:
    EJECTIONS.inc()


def completion_observe(outcome: str) -> None:
    """Count one lease completion reported by a gateway."""
    if outcome not in COMPLETION_OUTCOMES:
        raise ValueError(f"unknown completion outcome {outcome!r}")
    COMPLETIONS.labels(outcome=outcome).inc()


class PoolStateCollector:
    """Gauges (and the counter drift) read from the database (a ping and
    three queries), at most once per ``POOL_STATE_CACHE_SECONDS`` in this
    process."""

    def collect(self):
        yield from pool_state.get()


def _pool_state_families():
    """The pool-state families, read from the database (a ping and three
    queries). The ping first: the reads take a pooled connection, which for
    a database that is down waits until the pool's own attempt to connect
    fails (``core/postgresql``: 5 s for a host that does not answer) and in
    a busy pool up to its timeout (10 s, about a Prometheus scrape's own);
    the ping finds out within its 2 s."""
    now = timezone.now()
    try:
        database_ping()
        identities = list(
            selectors.identity_operator_list(now=now).values_list(
                "name", "live_leases", "live_sessions", "cooldown_until", "ejected_until"
            )
        )
        snapshot = selectors.latency_snapshot_newest_state()
        drift = selectors.counter_drift_list()
    except database_errors():
        logger.warning("metrics: the database could not be read", exc_info=True)
        yield GaugeMetricFamily("kiropool_database_up", "Whether the pool state could be read.", value=0)
        return
    yield GaugeMetricFamily("kiropool_database_up", "Whether the pool state could be read.", value=1)
    in_flight = GaugeMetricFamily(
        "kiropool_identity_leases_in_flight", "Leases in flight per routing identity.", labels=["identity"]
    )
    sessions = GaugeMetricFamily(
        "kiropool_identity_live_bindings", "Live session bindings per routing identity.", labels=["identity"]
    )
    cooling = ejected = 0
    for name, leases, live_sessions, cooldown_until, ejected_until in identities:
        in_flight.add_metric([name], leases)
        sessions.add_metric([name], max(0, live_sessions))
        cooling += cooldown_until is not None and cooldown_until > now
        ejected += ejected_until is not None and ejected_until > now
    yield in_flight
    yield sessions
    yield GaugeMetricFamily("kiropool_identities", "Routing identities.", value=len(identities))
    yield GaugeMetricFamily("kiropool_identities_cooling_down", "Routing identities cooling down.", value=cooling)
    yield GaugeMetricFamily(
        "kiropool_identities_ejected", "Routing identities ejected after repeated failures.", value=ejected
    )
    if snapshot is not None:
        snapshot_at, global_avg_ms, bands_whole_at = snapshot
        yield GaugeMetricFamily(
            "kiropool_latency_snapshot_age_seconds",
            "Age of the newest latency snapshot; over 300 s, latency bands are off.",
            value=(now - snapshot_at).total_seconds(),
        )
        if global_avg_ms is not None:
            yield GaugeMetricFamily(
                "kiropool_latency_bands_whole",
                "1 once the refresh has checked every order row's band under the newest snapshot; "
                "at 0, large pools' dispatches read every account until it has.",
                value=int(bands_whole_at is not None),
            )
    corrected = CounterMetricFamily(
        "kiropool_counter_drift",
        "How far the reconcile task found a hot counter off from the rows it counts, summed over its runs "
        "(anything but 0 means something wrote a counter outside its owners).",
        labels=["counter"],
    )
    for name, total in drift:
        corrected.add_metric([name], total)
    yield corrected


# /metrics is open to scrapers, so to anyone: a burst of scrapes reuses one
# reading for a few seconds (core/recent.py) instead of running the
# aggregates each time. Prometheus scrapes every 15-60 s; 5 s old is fresh.
POOL_STATE_CACHE_SECONDS = 5.0
pool_state = RecentValue(lambda: list(_pool_state_families()), seconds=POOL_STATE_CACHE_SECONDS)


class _ThisProcess:
    """The default registry's collectors (ours plus process and platform)."""

    def collect(self):
        yield from REGISTRY.collect()


def exposition() -> tuple[bytes, str]:
    """The text a scrape gets, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(PoolStateCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
