"""Metric maths on hand-made cases. No database."""

from __future__ import annotations

import pytest

from bench.simulate.metrics import dominating, fairness, jain_index, percentile, shares, starved, summarize
from bench.simulate.results import RunResult


def test_jain_index_hand_cases():
    assert jain_index([5, 5, 5, 5]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)  # one of n got everything: 1/n
    assert jain_index([1, 2, 3]) == pytest.approx(36 / 42)
    assert jain_index([2, 2, 0, 0]) == pytest.approx(0.5)  # half the identities share it all
    assert jain_index([0, 0]) == 1.0 and jain_index([]) == 1.0
    # scale-free
    assert jain_index([1, 2, 3]) == pytest.approx(jain_index([100, 200, 300]))


@pytest.mark.parametrize("bad", [[1, -1], [1, float("nan")], [float("inf")]])
def test_jain_index_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        jain_index(bad)


def test_percentile_interpolates_between_ranks():
    values = list(range(1, 101))
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 0) == 1 and percentile(values, 100) == 100
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 95) == 0.0
    assert percentile([3, 1, 2], 50) == 2  # order does not matter
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_fair_share_follows_availability():
    fair = shares({"a": 3600.0, "b": 3600.0, "c": 1800.0})  # c was cooling half the time
    assert fair == pytest.approx({"a": 0.4, "b": 0.4, "c": 0.2})
    assert fairness({"a": 0.4, "b": 0.4, "c": 0.2}, fair) == pytest.approx(1.0)
    # equal shares are not fair to the ones that were there the whole time
    assert fairness({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, fair) < 1.0
    # an identity that was never selectable is left out rather than divided by zero
    assert fairness({"a": 0.5, "b": 0.5, "z": 0.0}, {"a": 0.5, "b": 0.5, "z": 0.0}) == pytest.approx(1.0)


def test_starved_is_under_a_quarter_of_fair_share():
    fair = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    assert starved({"a": 0.5, "b": 0.3, "c": 0.14, "d": 0.06}, fair) == ["d"]
    assert starved({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.0625}, fair) == []  # exactly a quarter is not starved


def result(**fields: object) -> RunResult:
    base = dict(
        policy="p",
        identities=["a", "b"],
        served=[30, 10],
        available_s=[100.0, 100.0],
        binding_ticks=[0.0, 60.0],
        bindings=[[2, 2], [4, 0]],
        latencies_ms=[100.0, 200.0, 300.0, 400.0],
        waits_ms=[0.0, 0.0, 0.0, 1000.0],
        sessions_moved=3,
        requests=41,
        rejected={"429 wait budget spent": 1},
        upstream_errors={},
    )
    base.update(fields)
    return RunResult(**base)  # type: ignore[arg-type]


def test_summarize_hand_made_run():
    s = summarize(result())
    assert s.request_share == pytest.approx({"a": 0.75, "b": 0.25})
    # bindings averaged over the ticks: a 3, b 1
    assert s.session_share == pytest.approx({"a": 0.75, "b": 0.25})
    assert s.jain_requests == pytest.approx(jain_index([1.5, 0.5]))
    assert s.jain_sessions == pytest.approx(0.8)
    assert s.starved == []
    assert s.mean_latency_ms == pytest.approx(250.0)
    assert s.p95_latency_ms == pytest.approx(385.0)
    assert s.p95_wait_ms == pytest.approx(850.0)
    assert (s.sessions_moved, s.served, s.rejected, s.requests) == (3, 40, 1, 41)
    assert s.public() == {
        "jain_sessions": 0.8,
        "jain_requests": 0.8,
        "starved": 0,
        "mean_latency_ms": 250.0,
        "p95_latency_ms": 385.0,
        "p95_wait_ms": 850.0,
        "sessions_moved": 3,
    }


def test_summarize_counts_starved_on_either_measure():
    s = summarize(result(served=[95, 5], bindings=[[1, 1]]))
    assert s.starved == ["b"]


def test_dominating_needs_both_at_once():
    base = summarize(result(policy="kiropool"))
    fairer_but_slower = summarize(result(policy="x", bindings=[[2, 2]], waits_ms=[5000.0]))
    fairer_and_faster = summarize(result(policy="y", bindings=[[2, 2]], waits_ms=[0.0]))
    assert dominating([base, fairer_but_slower, fairer_and_faster], on="jain_sessions") == ["y"]
    assert dominating([base, fairer_but_slower], on="jain_requests") == []
