from datetime import UTC, datetime

import pytest

from routing.latency import SampleGroup, latency_snapshot_build
from routing.selection import LatencyStats

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_empty_window_has_no_global_average():
    snapshot = latency_snapshot_build([], generated_at=NOW)
    assert snapshot.global_avg_ms is None
    assert snapshot.accounts == {} and snapshot.proxies == {}


def test_global_average_is_sample_weighted():
    samples = [SampleGroup.of("busy", "http://p1", 100.0)] * 9 + [SampleGroup.of("idle", None, 1000.0)]
    snapshot = latency_snapshot_build(samples, generated_at=NOW)
    # weighted: (9*100 + 1000) / 10, not the mean of the two account averages (550)
    assert snapshot.global_avg_ms == pytest.approx(190.0)
    assert snapshot.accounts == {"busy": LatencyStats(9, 100.0), "idle": LatencyStats(1, 1000.0)}
    assert snapshot.proxies == {"http://p1": LatencyStats(9, 100.0)}
    assert snapshot.generated_at == NOW


def test_proxy_averages_span_accounts():
    samples = [SampleGroup.of("a", "http://p", 200.0), SampleGroup.of("b", "http://p", 400.0)]
    samples.append(SampleGroup.of("b", "http://q", 100.0))
    snapshot = latency_snapshot_build(samples, generated_at=NOW)
    assert snapshot.proxies["http://p"] == LatencyStats(2, 300.0)
    assert snapshot.accounts["b"] == LatencyStats(2, 250.0)


def test_a_group_counts_as_its_samples_wherever_its_account_and_proxy_recur():
    one_by_one = [SampleGroup.of("a", "http://p", ms) for ms in (100.0, 200.0, 600.0)]
    one_by_one += [SampleGroup.of("a", None, 50.0), SampleGroup.of("b", "http://p", 1000.0)]
    grouped = [
        SampleGroup("a", "http://p", 900.0, 3),
        SampleGroup("a", "", 50.0, 1),  # the database's "no proxy"
        SampleGroup("b", "http://p", 1000.0, 1),
    ]
    expected = latency_snapshot_build(one_by_one, generated_at=NOW)
    snapshot = latency_snapshot_build(grouped, generated_at=NOW)
    assert snapshot == expected
    assert snapshot.accounts == {"a": LatencyStats(4, 237.5), "b": LatencyStats(1, 1000.0)}
    assert snapshot.proxies == {"http://p": LatencyStats(4, 475.0)}
    assert snapshot.global_avg_ms == pytest.approx(390.0)
