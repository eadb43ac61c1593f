"""Latency snapshot maths, pure: the Celery task feeds it database rows and
the fairness simulator feeds it simulated samples, so both rank with exactly
the same figures."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from routing.selection import LatencySnapshot, LatencyStats

# Samples older than this do not count: an account's latency an hour ago says
# little about the upstream user's load now.
SNAPSHOT_WINDOW = timedelta(hours=1)


def latency_snapshot_build(
    samples: Iterable[tuple[str, str | None, float]], *, generated_at: datetime
) -> LatencySnapshot:
    """Aggregate ``(account name, proxy url or None, first_token_ms)`` samples.

    The global average is sample-weighted (every sample counts once, so a busy
    account weighs more than an idle one); per account and per proxy URL it
    is the plain mean of their own samples."""
    accounts: dict[str, list[float]] = {}
    proxies: dict[str, list[float]] = {}
    total, count = 0.0, 0
    for account, proxy_url, first_token_ms in samples:
        total += first_token_ms
        count += 1
        _accumulate(accounts, account, first_token_ms)
        if proxy_url:
            _accumulate(proxies, proxy_url, first_token_ms)
    return LatencySnapshot(
        generated_at=generated_at,
        global_avg_ms=total / count if count else None,
        accounts=_stats(accounts),
        proxies=_stats(proxies),
    )


def _accumulate(sums: dict[str, list[float]], name: str, value: float) -> None:
    entry = sums.setdefault(name, [0.0, 0])
    entry[0] += value
    entry[1] += 1


def _stats(sums: dict[str, list[float]]) -> dict[str, LatencyStats]:
    return {name: LatencyStats(samples=int(n), avg_ms=total / n) for name, (total, n) in sums.items()}
