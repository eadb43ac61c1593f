"""The load benchmark's maths and traffic mix, on hand-made cases. No database, no server."""

from __future__ import annotations

import random
import statistics

import pytest

from bench.load.clients import Plan
from bench.load.stats import (
    closed_merge,
    cpu_per_request,
    crowding,
    inversion_fraction,
    inversions,
    kendall_tau,
    latency_summary,
    p99_by_part,
    poisson_schedule,
    schedule_split,
    slowest_clusters,
    slowest_split,
)


def test_crowding_counts_the_arrivals_in_the_window_up_to_each_slowest_one():
    # A burst of four within 3 ms, then one arrival every 100 ms.
    schedule = [1.000, 1.001, 1.002, 1.003] + [1.1 + 0.1 * n for n in range(96)]
    latencies = {at: 0.005 for at in schedule}
    latencies[1.003] = 0.030  # the burst's last arrival is the slowest
    measured = [(at, latencies[at]) for at in schedule]
    found = crowding(schedule, measured, window=0.010, share=0.01)
    # The slowest 1 % of 100 is one arrival: 1.003, with the three before it in its 10 ms.
    assert found["slowest"] == 4
    # Over all: 1, 2, 3, 4 in the burst, 1 for each of the other 96.
    assert found["all"] == round((1 + 2 + 3 + 4 + 96) / 100, 2)


def test_crowding_counts_the_whole_schedule_and_the_window_edges():
    # The warm-up's arrivals are not measured but still crowd the first measured one.
    schedule = [0.990, 0.995, 1.000, 2.000]
    measured = [(1.000, 0.020), (2.000, 0.001)]
    found = crowding(schedule, measured, window=0.010, share=0.5)
    # 0.990 lies exactly 10 ms before: in. Average 2.0: 1.000 (3) was crowded, 2.000 (1) calm.
    assert found == {
        "window_ms": 10.0,
        "slowest": 3.0,
        "all": 2.0,
        "calm_p99_ms": 1.0,
        "crowded_p99_ms": 20.0,
        "crowded_share": 0.5,
    }
    assert crowding(schedule, [], window=0.010) == {
        "window_ms": 10.0,
        "slowest": None,
        "all": None,
        "calm_p99_ms": None,
        "crowded_p99_ms": None,
        "crowded_share": None,
    }


def test_crowding_splits_the_latencies_into_calm_and_crowded_arrivals():
    # Every 10 ms an arrival served in 5 ms, and five bursts of six arrivals
    # within 5 ms, whose later arrivals wait for the earlier ones.
    schedule, latency = [], {}
    for n in range(500):
        at = round(n * 0.010, 6)
        schedule.append(at)
        latency[at] = 0.005
    for burst in (1.0005, 2.0005, 3.0005, 4.0005, 4.5005):
        for k in range(6):
            at = round(burst + k * 0.001, 6)
            schedule.append(at)
            latency[at] = 0.005 + 0.004 * k
    schedule.sort()
    measured = [(at, latency[at]) for at in schedule]
    found = crowding(schedule, measured, window=0.030)
    # Average 4.1 (the steady arrivals count 4, the bursts up to 9): calm
    # counts at most 4, so a burst's first arrival (5 ms) is calm and the
    # other five crowded, the slowest 25 ms.
    assert found["all"] == pytest.approx(4.11, abs=0.01)
    assert found["calm_p99_ms"] == 5.0
    assert found["crowded_p99_ms"] == pytest.approx(25.0)
    assert 0 < found["crowded_share"] < 0.2
    # Evenly spread arrivals are all calm: each counts the same few (3 or 4,
    # the first ones fewer), and none counts more than the average rounded.
    even = [(n * 0.010, 0.005) for n in range(500)]
    steady = crowding([at for at, _ in even], even, window=0.030)
    assert steady["calm_p99_ms"] == 5.0 and steady["crowded_p99_ms"] is None and steady["crowded_share"] == 0.0


def test_poisson_schedule_has_the_rate_and_exponential_gaps():
    arrivals = poisson_schedule(100, 200, random.Random(7))
    assert arrivals == sorted(arrivals) and arrivals[0] > 0 and arrivals[-1] < 200
    # 20,000 expected; a Poisson count's standard deviation is its square root (141).
    assert abs(len(arrivals) - 20_000) < 600
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.01, rel=0.03)
    # Exponential gaps: standard deviation equals the mean (evenly spaced arrivals would give 0).
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)


def test_poisson_schedule_is_reproducible_and_refuses_nonsense():
    assert poisson_schedule(50, 3, random.Random(1)) == poisson_schedule(50, 3, random.Random(1))
    assert poisson_schedule(50, 0, random.Random(1)) == []
    with pytest.raises(ValueError):
        poisson_schedule(0, 3, random.Random(1))


def test_schedule_split_deals_every_arrival_once_in_order():
    arrivals = poisson_schedule(40, 5, random.Random(2))
    parts = schedule_split(arrivals, 4)
    assert sorted(a for part in parts for a in part) == arrivals
    assert all(part == sorted(part) for part in parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize(
    ("ranks", "inverted", "tau"),
    [
        ([0, 1, 2, 3], 0, 1.0),  # served in arrival order
        ([3, 2, 1, 0], 6, -1.0),  # last come, first served
        ([1, 0, 2], 1, 1 / 3),  # one adjacent swap out of 3 pairs
        ([0, 5, 9], 0, 1.0),  # gaps (refused waiters) do not count
        ([2, 0, 1], 2, -1 / 3),
    ],
)
def test_inversions_and_kendall_tau(ranks, inverted, tau):
    assert inversions(ranks) == inverted
    assert inversion_fraction(ranks) == pytest.approx(inverted / (len(ranks) * (len(ranks) - 1) / 2))
    assert kendall_tau(ranks) == pytest.approx(tau)


def test_order_needs_two_answers():
    assert kendall_tau([]) is None and kendall_tau([4]) is None and inversion_fraction([4]) is None


def test_latency_summary_in_milliseconds():
    seconds = [n / 1000 for n in range(1, 101)]  # 1 .. 100 ms
    assert latency_summary(seconds) == {"p50_ms": 50.5, "p99_ms": 99.01}
    assert latency_summary([]) == {"p50_ms": None, "p99_ms": None}


def closed_run(rps: float, elapsed: float, latencies: list[float], statuses: dict[str, int]) -> dict:
    requests = sum(statuses.values())
    errors = requests - statuses.get("200", 0)
    return {"rps": rps, "elapsed_s": elapsed, "latencies_s": latencies, "requests": requests, "errors": errors,
            "statuses": statuses, "clients": 16}  # fmt: skip


def test_closed_runs_merge_over_their_summed_windows_and_every_latency():
    fast = closed_run(100.0, 1.0, [0.010] * 50, {"200": 100})
    slow = closed_run(150.0, 2.0, [0.100] * 150, {"200": 290, "503": 10})
    merged = closed_merge([fast, slow])
    # 400 requests in 3 s, not the mean of the two rates (125)
    assert merged["rps"] == 133.3 and merged["requests"] == 400 and merged["elapsed_s"] == 3.0
    assert merged["runs_rps"] == [100.0, 150.0]
    # a quarter of the latencies are 10 ms: the median and the p99 are the slow run's
    assert (merged["p50_ms"], merged["p99_ms"], merged["cycles"]) == (100.0, 100.0, 200)
    assert merged["statuses"] == {"200": 390, "503": 10} and merged["errors"] == 10
    assert "latencies_s" not in merged  # the raw samples stay out of bench.json
    # the order of the runs does not matter
    assert closed_merge([slow, fast]) | {"runs_rps": None} == merged | {"runs_rps": None}


def test_closed_merge_needs_a_run():
    with pytest.raises(ValueError):
        closed_merge([])


def test_mixed_traffic_is_80_10_10_and_new_sessions_never_repeat():
    plan = Plan("mixed", key="k", bindings=65_536)
    rng = random.Random(5)
    bodies = [plan.body(rng, "t", n) for n in range(20_000)]
    existing = [b for b in bodies if b.get("session_id", "").startswith("s-")]
    new = [b for b in bodies if b.get("session_id", "").startswith("new-")]
    assert len(existing) / len(bodies) == pytest.approx(0.8, abs=0.02)
    assert len(new) / len(bodies) == pytest.approx(0.1, abs=0.02)
    assert sum(1 for b in bodies if b == {}) / len(bodies) == pytest.approx(0.1, abs=0.02)
    assert all(0 <= int(b["session_id"][2:]) < 65_536 for b in existing)
    assert len({b["session_id"] for b in new}) == len(new)

    fresh = Plan("new", key="k")
    sessions = [fresh.body(rng, "t", n)["session_id"] for n in range(1000)]
    assert len(set(sessions)) == 1000


def test_closed_runs_add_up_their_cpu_and_split_it_per_request():
    first = closed_run(100.0, 1.0, [0.01] * 50, {"200": 100}) | {
        "cpu_s": {"server": 0.10, "postgres": 0.05, "clients": 0.02, "other": 0.0}
    }
    second = closed_run(100.0, 3.0, [0.01] * 150, {"200": 300}) | {
        "cpu_s": {"server": 0.30, "postgres": 0.15, "clients": 0.06, "other": 0.01}
    }
    merged = closed_merge([first, second])
    assert merged["cpu_s"] == {"server": 0.4, "postgres": 0.2, "clients": 0.08, "other": 0.01}
    # 400 requests: 1 ms of the server's each, 0.5 of PostgreSQL's ...
    assert merged["cpu_ms_per_request"] == {
        "server": 1.0,
        "postgres": 0.5,
        "clients": 0.2,
        "other": 0.025,
        "all": 1.725,
    }


def test_no_cpu_split_unless_every_run_measured_one():
    measured = closed_run(100.0, 1.0, [0.01] * 50, {"200": 100}) | {
        "cpu_s": {"server": 0.1, "postgres": 0.0, "clients": 0.0, "other": 0.0}
    }
    unmeasured = closed_run(100.0, 1.0, [0.01] * 50, {"200": 100})
    merged = closed_merge([measured, unmeasured])
    assert "cpu_s" not in merged and "cpu_ms_per_request" not in merged


def test_cpu_per_request_needs_requests():
    assert cpu_per_request({"server": 1.0}, 0) is None


def test_p99_by_part_slices_the_window_by_scheduled_time():
    # A window of 30 s from 2 s: the thirds are [2, 12), [12, 22), [22, 32].
    early = [(2.0 + i * 0.1, 0.010) for i in range(100)]  # 10 ms, first third
    late = [(22.0 + i * 0.1, 0.030) for i in range(99)] + [(32.0, 0.090)]  # the last third, its end included
    assert p99_by_part(early + late, seconds=30, start=2.0) == [10.0, None, 30.6]
    # Arrivals are placed by when they were scheduled, not by list order.
    assert p99_by_part(late + early, seconds=30, start=2.0) == [10.0, None, 30.6]
    assert p99_by_part([], seconds=30, start=2.0, parts=2) == [None, None]


def test_p99_by_part_refuses_nonsense():
    with pytest.raises(ValueError):
        p99_by_part([], seconds=0, start=0)
    with pytest.raises(ValueError):
        p99_by_part([], seconds=10, start=0, parts=0)


def test_slowest_split_takes_the_medians_of_the_slowest_and_of_all():
    # 200 dispatches: 198 served in 5 ms, two in 40 and 50 ms (the slowest 1 %).
    service = [0.005] * 198 + [0.040, 0.050]
    timings = [{"app": 4.0, "db": 2.0, "cpu": 1.5, "wait": 0.5}] * 198 + [
        {"app": 36.0, "db": 30.0, "cpu": 2.0, "wait": 4.0},
        {"app": 44.0, "db": 34.0, "cpu": 2.0, "wait": 8.0},
    ]
    split = slowest_split(service, timings)
    assert split["count"] == 2
    assert split["slowest"] == {"service": 45.0, "outside": 5.0, "app": 40.0, "db": 32.0, "cpu": 2.0, "wait": 6.0}
    assert split["all"] == {"service": 5.0, "outside": 1.0, "app": 4.0, "db": 2.0, "cpu": 1.5, "wait": 0.5}


def test_slowest_split_needs_the_header():
    # The floor, or kiropool without KIROPOOL_SERVER_TIMING: nothing to split.
    assert slowest_split([0.005, 0.006], [{}, {}]) is None
    # Answers without it (an error page before the middleware) are left out.
    split = slowest_split([0.005, 0.100], [{"app": 4.0, "db": 1.0, "cpu": 2.0, "wait": 1.0}, {}])
    assert split["slowest"]["service"] == 5.0


def _steady(n: int) -> tuple[list[tuple[float, float]], list[dict]]:
    """``n`` arrivals every 10 ms from 0, each answered in 5 ms."""
    return [(i * 0.010, 0.005) for i in range(n)], [{"app": 4.0, "db": 2.0, "cpu": 1.5, "wait": 0.0}] * n


def test_slowest_clusters_find_dispatches_answered_all_at_once():
    # A stall: three arrivals 10 ms apart, held until 0.580 s and answered
    # within a millisecond; a fourth slow one alone, a second later.
    measured, timings = _steady(296)
    measured += [(0.500, 0.080), (0.510, 0.0705), (0.520, 0.061), (1.500, 0.030)]
    timings += [{"app": 79.0, "db": 70.0, "cpu": 1.5, "wait": 0.5}] * 3 + [{"app": 29.0, "db": 5.0, "wait": 20.0}]
    found = slowest_clusters(measured, timings, gap=0.010, share=4 / 300)
    assert found == {
        "gap_ms": 10.0,
        "count": 4,
        "clusters": 2,
        "largest": 3,
        "largest_started_over_ms": 20.0,
        "largest_answered_within_ms": 1.0,
        "largest_db_ms": 70.0,
        "largest_wait_ms": 0.5,
    }


def test_slowest_clusters_keep_answers_further_apart_than_the_gap_apart():
    measured, timings = _steady(297)
    measured += [(0.500, 0.050), (0.540, 0.050), (0.580, 0.050)]  # answered 40 ms apart
    timings += [{}] * 3  # the floor: no Server-Timing header
    found = slowest_clusters(measured, timings, gap=0.010, share=0.01)
    assert (found["count"], found["clusters"], found["largest"]) == (3, 3, 1)
    assert found["largest_started_over_ms"] == found["largest_answered_within_ms"] == 0.0
    assert found["largest_db_ms"] is None and found["largest_wait_ms"] is None
    # A gap a little wider than theirs joins them.
    assert slowest_clusters(measured, timings, gap=0.041, share=0.01)["clusters"] == 1


def test_slowest_clusters_need_arrivals_measured_beside_their_timings():
    assert slowest_clusters([], [], gap=0.010) is None
    with pytest.raises(ValueError):
        slowest_clusters([(0.0, 0.005)], [], gap=0.010)
