"""The bench table's verdicts and the bounded-waiting tally, on hand-made
reports. No database, no server."""

from __future__ import annotations

import copy

import pytest

from bench.load.report import MET, MISSING, NOT_MET, rows, table
from bench.load.waiting import Waiter, waiters_served


def load(rps: float, **extra) -> dict:
    return {"rps": rps, "p50_ms": 5.0, "p99_ms": 20.0, "requests": 1000, "errors": 0, **extra}


def open_phase(p99: float, late: int = 0) -> dict:
    return {"rate_per_s": 100, "p50_ms": 4.0, "p99_ms": p99, "arrivals": 2000, "late_starts": late, "errors": 0}


GOOD = {
    "floor": load(1000),
    "dispatch": load(600, bindings=65_536),
    "dispatch_no_bindings": load(620),
    "pool_size": {
        "small": load(500, accounts=10),
        "large": load(450, accounts=1000),
        "banded": load(420, accounts=1000),
    },
    "open_loop": {
        "rate_per_s": 100,
        "accounts_50": open_phase(12),
        "accounts_1000": open_phase(19.5),
        "floor": {**open_phase(6), "rate_per_s": 200},
    },
    "wake_after_release_ms": {"p50": 4.0, "max": 9.0},
    "history": {
        "completed_leases": 200_000,
        "clean": load(400),
        "from_oldest": load(300),
        "from_mark": load(396),
    },
    "bounded_waiting": {
        "waiters": 96,
        "completion_ms": 40.0,
        "completion_status": 200,
        "healthz_ms": 3.0,
        "healthz_status": 200,
        "granted": 80,
        "refused_at_once": 16,
        "refused_later": 0,
        "other": {},
        "kendall_tau": 1.0,
        "inversion_fraction": 0.0,
    },
    "snapshot_refresh": {
        "samples": 360_000,
        "runs": 3,
        "wall_ms": 61.2,
        "cpu_ms": 4.5,
        "postgres_cpu_ms": 50.0,
        "lease_start_max_ms": 12.5,
        "bands_written": [6_424, 3, 0],
    },
    "binding_purge": {
        "expired": 6_000,
        "runs": 3,
        "wall_ms": 150.0,
        "cpu_ms": 20.0,
        "postgres_cpu_ms": 120.0,
        "lease_start_max_ms": 8.0,
    },
}


def verdicts(report: dict) -> dict[str, str]:
    return {row.what: row.verdict for row in rows(report) if row.verdict in (MET, NOT_MET, MISSING)}


def test_every_target_met():
    found = verdicts(GOOD)
    assert set(found.values()) == {MET}
    # every target of issues 14 and 11 §3 has its row
    assert set(found) == {
        "  ÷ floor (throughput)",
        "  65,536 ÷ 0 bindings",
        "  large ÷ small pool",
        "  large with latency bands ÷ small pool",
        "open loop 100/s, 50 accounts: dispatch",
        "open loop 100/s, 1,000 accounts: dispatch",
        "  client started late (> 5 ms)",
        "wake after release",
        "96 waiters on one slot: a completion answers in",
        "96 waiters on one slot: /healthz answers in",
        "96 waiters on one slot: answers",
        "96 waiters on one slot: 200s in arrival order",
    }


def test_each_target_missed_is_reported():
    bad = copy.deepcopy(GOOD)
    bad["dispatch"]["rps"] = 590  # 0.59 of the floor
    bad["pool_size"]["large"]["rps"] = 399  # 0.798 of the small pool
    bad["pool_size"]["banded"]["rps"] = 380
    bad["open_loop"]["accounts_1000"]["p99_ms"] = 20.1
    bad["open_loop"]["accounts_50"]["late_starts"] = 21  # over 1 % of 2000 arrivals
    bad["bounded_waiting"]["completion_status"] = 0  # never answered
    bad["bounded_waiting"]["other"] = {"0": 3}  # three waiters never answered
    bad["bounded_waiting"]["kendall_tau"] = 0.98
    bad["bounded_waiting"]["inversion_fraction"] = 0.01
    found = verdicts(bad)
    missed = {what for what, verdict in found.items() if verdict == NOT_MET}
    assert missed == {
        "  ÷ floor (throughput)",
        "  large ÷ small pool",
        "  large with latency bands ÷ small pool",
        "open loop 100/s, 1,000 accounts: dispatch",
        "  client started late (> 5 ms)",
        "96 waiters on one slot: a completion answers in",
        "96 waiters on one slot: answers",
        "96 waiters on one slot: 200s in arrival order",
    }
    assert found["  65,536 ÷ 0 bindings"] == MET  # 590 / 620 = 0.95
    assert "no answer: 3" in table(bad)


def test_targets_are_inclusive():
    edge = copy.deepcopy(GOOD)
    edge["dispatch"]["rps"] = 600.0
    edge["floor"]["rps"] = 1000.0  # exactly 0.6
    edge["open_loop"]["accounts_50"]["p99_ms"] = 15.0
    edge["bounded_waiting"]["healthz_ms"] = 1000.0
    assert set(verdicts(edge).values()) == {MET}


def test_the_slowest_arrivals_crowding_is_shown_for_every_open_loop_without_a_verdict():
    report = copy.deepcopy(GOOD)
    for name, slowest in (("accounts_50", 4.31), ("accounts_1000", 3.0), ("floor", 2.5)):
        report["open_loop"][name]["crowding"] = {"window_ms": 10.0, "slowest": slowest, "all": 2.0}
    (row,) = [row for row in rows(report) if "slowest 1%" in row.what]
    assert row.what == "  arrivals in the 10 ms up to each of the slowest 1%"
    assert row.value == "4.3 / 3.0 / 2.5 (up to any arrival: 2.0 / 2.0 / 2.0)"
    assert (row.target, row.verdict) == ("", "")
    # An older bench.json has no calm / crowded split: no row for it.
    assert not [row for row in rows(report) if "calm" in row.what]
    assert verdicts(report) == verdicts(GOOD)  # a diagnostic: no target changes

    for name, calm, crowded in (("accounts_50", 14.2, 26.7), ("accounts_1000", 17.6, 28.6), ("floor", 5.0, 6.12)):
        split = {"calm_p99_ms": calm, "crowded_p99_ms": crowded, "crowded_share": 0.34}
        report["open_loop"][name]["crowding"].update(split)
    (row,) = [row for row in rows(report) if "calm" in row.what]
    assert row.what == "  p99, calm (at most that average) / after a burst"
    assert row.value == "calm 14.2 / 17.6 / 5.0 · after a burst 26.7 / 28.6 / 6.1 ms (34% / 34% / 34% of arrivals)"
    assert (row.target, row.verdict) == ("", "")
    assert verdicts(report) == verdicts(GOOD)
    # A loop none of whose arrivals came after a burst keeps its place in the row.
    report["open_loop"]["floor"]["crowding"].update(crowded_p99_ms=None, crowded_share=0.0)
    (row,) = [row for row in rows(report) if "calm" in row.what]
    assert row.value == "calm 14.2 / 17.6 / 5.0 · after a burst 26.7 / 28.6 / — ms (34% / 34% / 0% of arrivals)"

    # A report without the figure (an older bench.json, or a phase that failed) has no row.
    del report["open_loop"]["floor"]["crowding"]
    assert not [row for row in rows(report) if "slowest 1%" in row.what or "calm" in row.what]


def test_the_history_phase_shows_each_probe_against_no_history_without_a_verdict():
    history = [
        row for row in rows(GOOD) if "history" in row.what or "completed leases" in row.what or "÷ no" in row.what
    ]
    assert [(row.what, row.value.split(" rps")[0]) for row in history] == [
        ("new sessions, 50 accounts, no history", "400"),
        ("  200,000 completed leases, probe from 1970", "300"),
        ("    ÷ no history", "0.75"),
        ("  200,000 completed leases, probe from the reap mark", "396"),
        ("    ÷ no history", "0.99"),
    ]
    assert {row.verdict for row in history} == {"reference"}

    broken = copy.deepcopy(GOOD)
    broken["history"] = {"error": "OperationalError: disk full"}
    assert verdicts(broken)["new sessions, 50 accounts, no history"] == MISSING


def test_the_periodic_tasks_show_their_time_both_sides_cpu_and_the_wait_without_a_verdict():
    found = [row for row in rows(GOOD) if row.what.startswith(("latency refresh", "binding purge"))]
    assert [(row.what, row.value) for row in found] == [
        (
            "latency refresh, 360,000 samples",
            "61.2 ms · its CPU 4.5 · PostgreSQL's 50.0 ms · a lease start waits ≤ 12.5 ms"
            " · bands written 6,424 / 3 / 0",
        ),
        (
            "binding purge, 6,000 expired bindings",
            "150.0 ms · its CPU 20.0 · PostgreSQL's 120.0 ms · a lease start waits ≤ 8.0 ms",
        ),
    ]
    assert {row.verdict for row in found} == {"reference"}
    without_proc = copy.deepcopy(GOOD)
    without_proc["snapshot_refresh"]["postgres_cpu_ms"] = None
    assert "PostgreSQL's — ms" in table(without_proc)
    broken = copy.deepcopy(GOOD)
    broken["binding_purge"] = {"error": "OperationalError: disk full"}
    assert verdicts(broken)["binding purge, 6,000 expired bindings"] == MISSING


def test_a_failed_phase_is_shown_not_measured_and_the_rest_still_judged():
    broken = copy.deepcopy(GOOD)
    broken["floor"] = {"error": "WebServerError: gunicorn exited with 3"}
    del broken["bounded_waiting"]
    found = verdicts(broken)
    assert found["floor, closed loop"] == MISSING
    assert found["  ÷ floor (throughput)"] == MISSING
    assert found["96 waiters on one slot"] == MISSING
    assert found["  large ÷ small pool"] == MET
    text = table(broken)
    assert "gunicorn exited with 3" in text and "phase not run" in text


def test_waiters_served_counts_and_orders_the_answers():
    released = 100.0
    crowd = [
        Waiter(rank=0, sent=1.0, status=200, answered=100.01),
        Waiter(rank=1, sent=1.1, status=429, answered=1.12, retry_after="1"),  # refused at once
        Waiter(rank=2, sent=1.2, status=200, answered=100.03),  # served before rank 3: in order
        Waiter(rank=3, sent=1.3, status=200, answered=100.02),  # ... but after rank 2's turn: one inversion
        Waiter(rank=4, sent=1.4, status=429, answered=161.0),  # waited out its max_wait_ms
        Waiter(rank=5, sent=1.5, status=0, answered=190.0),  # no answer at all
        Waiter(rank=6, sent=1.6),  # still waiting when the phase ended
    ]
    served = waiters_served(crowd, released)
    assert served["granted"] == 3
    assert (served["refused_at_once"], served["refused_later"], served["refused_with_retry_after"]) == (1, 1, 1)
    assert served["other"] == {"0": 1, "None": 1}
    # answer order: ranks 0, 3, 2 → one inverted pair of three
    assert served["inversion_fraction"] == round(1 / 3, 4)
    assert served["kendall_tau"] == round(1 / 3, 4)
    assert served["all_granted_after_ms"] == 30.0


def test_bench_runs_only_the_phases_asked_for_and_refuses_unknown_ones():
    from bench.load.__main__ import PHASES, _parser, phases_chosen

    assert phases_chosen([]) == frozenset(PHASES)
    args = _parser().parse_args(["--only", "open_loop", "--only", "wake"])
    assert phases_chosen(args.only) == {"open_loop", "wake"}
    with pytest.raises(SystemExit, match="opne_loop"):
        phases_chosen(["open_loop", "opne_loop"])


def test_bench_only_reads_the_environment(monkeypatch):
    from bench.load.__main__ import _parser

    monkeypatch.setenv("BENCH_ONLY", "floor,throughput")
    assert _parser().parse_args([]).only == ["floor", "throughput"]


def test_an_unknown_phase_on_the_command_line_is_refused_too():
    from bench.load.__main__ import _parser, phases_chosen

    with pytest.raises(SystemExit, match="opne_loop"):
        phases_chosen(_parser().parse_args(["--only", "opne_loop"]).only)


def test_a_phase_measured_in_several_runs_shows_each_runs_rate():
    report = copy.deepcopy(GOOD)
    report["pool_size"]["large"]["runs_rps"] = [440.2, 459.8]
    shown = {row.what: row.value for row in rows(report)}
    assert shown["new sessions, 1,000 accounts"].startswith("450 rps (runs: 440 / 460) · p50")
    assert "runs:" not in shown["new sessions, 10 accounts"]


def test_a_load_with_a_cpu_split_shows_it_beneath_without_a_verdict():
    report = copy.deepcopy(GOOD)
    split = {"server": 1.4, "postgres": 0.79, "clients": 0.25, "other": 0.01, "all": 2.45}
    report["dispatch"]["cpu_ms_per_request"] = split
    lines = rows(report)
    at = next(n for n, row in enumerate(lines) if row.what.startswith("dispatch+complete, 65,536"))
    beneath = lines[at + 1]
    assert beneath.what == "  CPU per request"
    assert beneath.value == "server 1.40 · PostgreSQL 0.79 · clients 0.25 · all 2.45 ms"
    assert (beneath.target, beneath.verdict) == ("", "")
    # the floor has none here: no line for it, and the verdicts are the same
    assert lines[1].what.startswith("dispatch+complete")
    assert verdicts(report) == verdicts(GOOD)
    assert "CPU per request" in table(report)


def test_each_open_loops_p99_by_thirds_of_its_window_is_shown_without_a_verdict():
    report = copy.deepcopy(GOOD)
    # An older bench.json has no thirds: no row.
    assert not [row for row in rows(report) if "third" in row.what]

    thirds = {"accounts_50": [9.44, 12.0, 21.3], "accounts_1000": [10.0, None, 15.25], "floor": [3.5, 3.6, 3.7]}
    for name, p99s in thirds.items():
        report["open_loop"][name]["p99_by_third_ms"] = p99s
    (row,) = [row for row in rows(report) if "third" in row.what]
    assert row.what == "  p99 in the window's first → middle → last third"
    assert row.value == "9.4 → 12.0 → 21.3 / 10.0 → — → 15.2 / 3.5 → 3.6 → 3.7 ms"
    assert (row.target, row.verdict) == ("", "")
    assert verdicts(report) == verdicts(GOOD)

    del report["open_loop"]["floor"]["p99_by_third_ms"]
    assert not [row for row in rows(report) if "third" in row.what]


def test_where_the_slowest_dispatches_spent_their_time_is_shown_when_kiropool_sent_it():
    report = copy.deepcopy(GOOD)
    # Without KIROPOOL_SERVER_TIMING (or an older bench.json): no rows.
    assert not [row for row in rows(report) if "Server-Timing" in row.what]

    def found(service: float, db: float) -> dict:
        return {"service": service, "outside": 1.0, "app": service - 1, "db": db, "cpu": 3.0, "wait": service - 4 - db}

    report["open_loop"]["accounts_50"]["server_timing"] = {"slowest": found(30, 20), "all": found(7, 3), "count": 20}
    report["open_loop"]["accounts_1000"]["server_timing"] = {"slowest": found(25, 15), "all": found(6, 2), "count": 19}
    slowest, everyone = [row for row in rows(report) if "Server-Timing" in row.what]
    assert slowest.what == "  slowest 1%, medians (Server-Timing)"
    assert slowest.value == (
        "30.0 = outside the app 1.0 + statements 20.0 + CPU 3.0 + waits 6.0 / "
        "25.0 = outside the app 1.0 + statements 15.0 + CPU 3.0 + waits 6.0 ms"
    )
    assert everyone.value.startswith("7.0 = outside the app 1.0 + statements 3.0 + CPU 3.0 + waits 0.0 / 6.0")
    assert (slowest.target, slowest.verdict, everyone.verdict) == ("", "", "")
    assert verdicts(report) == verdicts(GOOD)


def test_how_the_slowest_dispatches_cluster_is_shown_for_every_open_loop_without_a_verdict():
    report = copy.deepcopy(GOOD)
    # An older bench.json: no row.
    assert not [row for row in rows(report) if "answered within" in row.what]

    def clusters(largest: int, db: float | None) -> dict:
        return {
            "gap_ms": 10.0,
            "count": 20,
            "clusters": 6,
            "largest": largest,
            "largest_started_over_ms": 48.0,
            "largest_answered_within_ms": 9.0,
            "largest_db_ms": db,
            "largest_wait_ms": None if db is None else 0.5,
        }

    report["open_loop"]["accounts_50"]["clusters"] = clusters(7, 54.2)
    report["open_loop"]["accounts_1000"]["clusters"] = clusters(5, 20.0)
    report["open_loop"]["floor"]["clusters"] = clusters(2, None)  # the floor sends no Server-Timing
    (row,) = [row for row in rows(report) if "answered within" in row.what]
    assert row.what == "  slowest 1%, answered within 10 ms of the one before"
    assert row.value == (
        "20 in 6, the largest 7: started over 48.0, answered within 9.0, statements 54.2 + waits 0.5 / "
        "20 in 6, the largest 5: started over 48.0, answered within 9.0, statements 20.0 + waits 0.5 / "
        "20 in 6, the largest 2: started over 48.0, answered within 9.0 ms"
    )
    assert (row.target, row.verdict) == ("", "")
    assert verdicts(report) == verdicts(GOOD)
