from datetime import UTC, datetime

import pytest

from routing.latency import latency_snapshot_build
from routing.selection import LatencyStats

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_empty_window_has_no_global_average():
    snapshot = latency_snapshot_build([], generated_at=NOW)
    assert snapshot.global_avg_ms is None
    assert snapshot.accounts == {} and snapshot.proxies == {}


def test_global_average_is_sample_weighted():
    samples = [("busy", "http://p1", 100.0)] * 9 + [("idle", None, 1000.0)]
    snapshot = latency_snapshot_build(samples, generated_at=NOW)
    # weighted: (9*100 + 1000) / 10, not the mean of the two account averages (550)
    assert snapshot.global_avg_ms == pytest.approx(190.0)
    assert snapshot.accounts == {"busy": LatencyStats(9, 100.0), "idle": LatencyStats(1, 1000.0)}
    assert snapshot.proxies == {"http://p1": LatencyStats(9, 100.0)}
    assert snapshot.generated_at == NOW


def test_proxy_averages_span_accounts():
    samples = [("a", "http://p", 200.0), ("b", "http://p", 400.0), ("b", "http://q", 100.0)]
    snapshot = latency_snapshot_build(samples, generated_at=NOW)
    assert snapshot.proxies["http://p"] == LatencyStats(2, 300.0)
    assert snapshot.accounts["b"] == LatencyStats(2, 250.0)
