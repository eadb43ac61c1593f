"""Latency snapshot maths, pure: the Celery task feeds it database rows and
the fairness simulator feeds it simulated samples, so both rank with exactly
the same figures."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import NamedTuple

from routing.selection import LatencySnapshot, LatencyStats

# Samples older than this do not count: an account's latency an hour ago says
# little about the upstream user's load now.
SNAPSHOT_WINDOW = timedelta(hours=1)


class SampleGroup(NamedTuple):
    """Samples of one account through one proxy URL (None or "" for none):
    their first-token times summed, and how many. One sample is a group of
    one (:meth:`of`); the refresh has the database sum them
    (``maintenance.latency_snapshot_refresh``)."""

    account: int | str
    proxy_url: str | None
    total_ms: float
    samples: int

    @classmethod
    def of(cls, account: int | str, proxy_url: str | None, first_token_ms: float) -> SampleGroup:
        return cls(account, proxy_url, first_token_ms, 1)


def latency_snapshot_build(groups: Iterable[SampleGroup], *, generated_at: datetime) -> LatencySnapshot:
    """Aggregate groups of samples (a group's account or proxy may recur).

    The global average is sample-weighted (every sample counts once, so a busy
    account weighs more than an idle one); per account and per proxy URL it
    is the plain mean of their own samples."""
    accounts: dict[int | str, list[float]] = {}
    proxies: dict[int | str, list[float]] = {}
    total, count = 0.0, 0
    for account, proxy_url, total_ms, samples in groups:
        total += total_ms
        count += samples
        _accumulate(accounts, account, total_ms, samples)
        if proxy_url:
            _accumulate(proxies, proxy_url, total_ms, samples)
    return LatencySnapshot(
        generated_at=generated_at,
        global_avg_ms=total / count if count else None,
        accounts=_stats(accounts),
        proxies=_stats(proxies),
    )


def _accumulate(sums: dict[int | str, list[float]], name: int | str, total_ms: float, samples: int) -> None:
    entry = sums.setdefault(name, [0.0, 0])
    entry[0] += total_ms
    entry[1] += samples


def _stats(sums: dict[int | str, list[float]]) -> dict[int | str, LatencyStats]:
    return {name: LatencyStats(samples=int(n), avg_ms=total / n) for name, (total, n) in sums.items()}
