"""The bench's throughput phase measures the floor and kiropool's two mixed
loads in mirrored halves and takes each load's halves together
(bench/load/phases.py). The load generator is replaced by a recorder: what
is checked is the order of the loads and where their figures go."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.load import phases
from bench.load.seed import Seeded

pytestmark = pytest.mark.django_db  # the mixed loads count their key's live bindings first

FLOOR, KIROPOOL = SimpleNamespace(port=1), SimpleNamespace(port=2)
SEEDED = Seeded(
    key="kp_main",
    key_id=1,
    empty_key="kp_empty",
    empty_key_id=2,
    floor_pk=7,
    pool_keys={},
    open_keys={},
    wake_key="",
    waiting_key="",
)


def _recorder(calls: list[tuple], fail: str | None = None):
    def closed_loop(port, plan, *, name, seconds, warmup, clients, processes, keep_latencies=False, meter=None):
        load = name.split(".")[0]
        calls.append((load, port, plan.traffic, plan.key or plan.floor_pk, seconds))
        if load == fail:
            raise ConnectionError("server gone")
        rps = 100.0 * len(calls)  # each half its own rate
        return {
            "rps": rps,
            "statuses": {"200": int(rps * seconds)},
            "latencies_s": [0.01] * 10,
            "elapsed_s": seconds,
            "clients": clients,
        }

    return closed_loop


def _run(only: set[str]) -> phases.Run:
    return phases.Run(env={}, seeded=SEEDED, seconds=20, profile=False, say=lambda message: None, only=frozenset(only))


def test_the_floor_and_both_mixed_loads_run_in_mirrored_halves(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(phases, "closed_loop", _recorder(calls))
    report: dict = {}
    _run({"floor", "throughput"}).throughput_phases(report, FLOOR, KIROPOOL)
    order = ["floor", "dispatch", "dispatch_no_bindings"]
    assert [call[0] for call in calls] == order + order[::-1]
    assert {call[0]: call[1:4] for call in calls} == {
        "floor": (1, "floor", 7),
        "dispatch": (2, "mixed", "kp_main"),
        "dispatch_no_bindings": (2, "mixed", "kp_empty"),
    }
    assert {call[4] for call in calls} == {10}  # halves of the 20 s phase
    # Each load's figures are its two halves together: (100 + 600) rps over 2 × 10 s.
    assert report["floor"]["runs_rps"] == [100.0, 600.0]
    assert report["floor"]["rps"] == 350.0
    assert report["dispatch"]["runs_rps"] == [200.0, 500.0]
    assert report["dispatch"]["bindings"] == 0  # live bindings of the key, counted before
    assert report["dispatch_no_bindings"]["runs_rps"] == [300.0, 400.0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the CPU split reads Linux's /proc")
def test_each_load_splits_the_cpu_of_its_own_server_and_counts_the_other_apart(monkeypatch):
    meters: dict[str, object] = {}
    recorder = _recorder([])

    def closed_loop(*args, meter=None, **kwargs):
        meters[kwargs["name"].split(".")[0]] = meter
        return recorder(*args, **kwargs)

    monkeypatch.setattr(phases, "closed_loop", closed_loop)
    floor = SimpleNamespace(port=1, process=SimpleNamespace(pid=101))
    kiropool = SimpleNamespace(port=2, process=SimpleNamespace(pid=202))
    run = _run({"floor", "throughput"})
    run.servers = [floor, kiropool]  # as server_phases leaves them
    run.throughput_phases({}, floor, kiropool)
    assert {load: (m.server, m.servers) for load, m in meters.items()} == {
        "floor": (101, (101, 202)),
        "dispatch": (202, (101, 202)),
        "dispatch_no_bindings": (202, (101, 202)),
    }


def test_without_the_floor_the_mixed_loads_still_run_mirrored(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(phases, "closed_loop", _recorder(calls))
    report: dict = {}
    _run({"throughput"}).throughput_phases(report, None, KIROPOOL)
    assert [call[0] for call in calls] == ["dispatch", "dispatch_no_bindings", "dispatch_no_bindings", "dispatch"]
    assert "floor" not in report


def test_a_load_that_fails_is_recorded_and_not_run_again_and_the_others_keep_their_figures(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(phases, "closed_loop", _recorder(calls, fail="dispatch_no_bindings"))
    report: dict = {}
    _run({"floor", "throughput"}).throughput_phases(report, FLOOR, KIROPOOL)
    assert [call[0] for call in calls] == ["floor", "dispatch", "dispatch_no_bindings", "dispatch", "floor"]
    assert report["dispatch_no_bindings"] == {"error": "ConnectionError: server gone"}
    assert len(report["floor"]["runs_rps"]) == len(report["dispatch"]["runs_rps"]) == 2


def test_the_pool_sizes_run_mirrored_with_the_banded_pool_between_and_the_snapshot_fresh_first(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(phases, "closed_loop", _recorder(calls))
    monkeypatch.setattr(phases.seed, "latency_refresh", lambda: calls.append(("latency_refresh",)))
    seeded = Seeded(**{**SEEDED.__dict__, "pool_keys": {10: "kp_10", 1000: "kp_1000"}, "banded_key": "kp_bands"})
    run = phases.Run(env={}, seeded=seeded, seconds=20, profile=False, say=lambda message: None, only=frozenset())
    report: dict = {}
    run.pool_size_phases(report, KIROPOOL)
    assert calls[0] == ("latency_refresh",)
    keys = [call[3] for call in calls[1:]]
    warm, measured = keys[:3], keys[3:]
    assert warm == ["kp_10", "kp_1000", "kp_bands"]
    assert measured == ["kp_10", "kp_1000", "kp_bands", "kp_bands", "kp_1000", "kp_10"]
    sizes = report["pool_size"]
    # The recorder's rate is 100 × the call's rank (the refresh and the three
    # warm-ups first): small 500 and 1,000, large 600 and 900, banded 700 and
    # 800, each over 2 × 10 s.
    assert sizes["small"]["runs_rps"] == [500.0, 1000.0] and sizes["small"]["rps"] == 750.0
    assert sizes["banded"]["runs_rps"] == [700.0, 800.0] and sizes["banded"]["accounts"] == 1000
    assert sizes["ratio"] == 1.0
    assert sizes["ratio_banded"] == 1.0
