"""Reads of the latency snapshot: the newest one as the pure
``selection.LatencySnapshot``, cached per process for the hot path."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from routing import selection
from routing.models import AccountLatency, LatencySnapshot, ProxyLatency

# The snapshot is rebuilt every 60 s by a task. A process keeps the one it
# read and asks this often whether a newer one exists (one read of a table of
# a few rows): the dispatch hot path rarely touches the stats, and a process
# orders by the snapshot whose bands the order table holds (walk.py) within
# a second of a refresh.
SNAPSHOT_CHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """The newest snapshot: its row's id (the dispatch query joins its stats
    by it) and its pure form (explain, the dashboards, the simulator's maths)."""

    id: int
    sample_count: int
    window_seconds: int
    snapshot: selection.LatencySnapshot


def snapshot_load(row: LatencySnapshot) -> StoredSnapshot:
    accounts = {
        name: selection.LatencyStats(samples=n, avg_ms=avg)
        for name, n, avg in AccountLatency.objects.filter(snapshot=row).values_list(
            "account__name", "samples", "avg_ms"
        )
    }
    proxies = {
        url: selection.LatencyStats(samples=n, avg_ms=avg)
        for url, n, avg in ProxyLatency.objects.filter(snapshot=row).values_list("proxy_id", "samples", "avg_ms")
    }
    return StoredSnapshot(
        id=row.pk,
        sample_count=row.sample_count,
        window_seconds=row.window_seconds,
        snapshot=selection.LatencySnapshot(
            generated_at=row.generated_at, global_avg_ms=row.global_avg_ms, accounts=accounts, proxies=proxies
        ),
    )


def latency_snapshot_latest() -> StoredSnapshot | None:
    """The newest stored snapshot, uncached: what an operator asked to see."""
    row = LatencySnapshot.objects.newest_first().first()
    return snapshot_load(row) if row else None


def _latest_id() -> int | None:
    return LatencySnapshot.objects.newest_first().values_list("id", flat=True).first()


@dataclass(frozen=True, slots=True)
class _Cached:
    checked: float  # time.monotonic() of the last check
    stored: StoredSnapshot | None


_lock = threading.Lock()
_cache: _Cached | None = None


def latency_snapshot_current() -> StoredSnapshot | None:
    """The newest snapshot, kept in this process and loaded again only when
    a check (at most every ``SNAPSHOT_CHECK_SECONDS``) finds a newer one."""
    global _cache
    cached = _cache
    now = time.monotonic()
    if cached is not None and now - cached.checked < SNAPSHOT_CHECK_SECONDS:
        return cached.stored
    if cached is not None and (cached.stored.id if cached.stored else None) == _latest_id():
        stored = cached.stored
    else:
        stored = latency_snapshot_latest()
    with _lock:
        _cache = _Cached(checked=now, stored=stored)
    return stored


def latency_snapshot_cache_clear() -> None:
    global _cache
    with _lock:
        _cache = None
