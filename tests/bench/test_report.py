"""The outputs: the tables, the JSON files' exact keys, the PNGs. No database."""

from __future__ import annotations

import dataclasses
import json

from bench.simulate.__main__ import main
from bench.simulate.metrics import summarize
from bench.simulate.plots import plots_write, upkeep_plots_write
from bench.simulate.policies import POLICY_NAMES
from bench.simulate.report import (
    patience_meets,
    patience_table,
    patience_verdict,
    table,
    upkeep_table,
    upkeep_verdict,
    verdict,
    write_json,
    write_upkeep_json,
)
from bench.simulate.results import MOVED_CROWDED, STAYED, RunResult
from bench.simulate.runs import simulate_all, simulate_dispatchers
from bench.simulate.scenario import Knobs, Scenario, upkeep_scenario
from bench.simulate.traffic import traffic_generate
from bench.simulate.variants import dispatcher_variants, patience_sweep

KEYS = {
    "jain_sessions",
    "jain_requests",
    "starved",
    "mean_latency_ms",
    "p95_latency_ms",
    "p95_wait_ms",
    "sessions_moved",
}


def short_run():
    scenario = Scenario(knobs=dataclasses.replace(Knobs(), hours=0.5, sessions_per_hour=200), seed=3)
    results = simulate_all(POLICY_NAMES, scenario.pool, scenario.knobs, traffic_generate(scenario), seed=3)
    return results, [summarize(r) for r in results]


def test_json_table_and_plots(tmp_path):
    results, summaries = short_run()
    fairness, details = write_json(summaries, tmp_path, meta={"source": "test"})
    data = json.loads(fairness.read_text())
    assert list(data) == list(POLICY_NAMES)
    assert all(set(figures) == KEYS for figures in data.values())
    assert isinstance(data["kiropool"]["starved"], int)
    assert set(json.loads(details.read_text())["policies"]["kiropool"]["fair_share"]) == set(results[0].identities)

    lines = table(summaries).splitlines()
    assert lines[0].split()[:3] == ["policy", "jain_sess", "jain_req"]
    assert [line.split()[0] for line in lines[2:]] == list(POLICY_NAMES)
    assert any("exact score" in line for line in verdict(summaries))

    for png in plots_write(summaries, results, tmp_path):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_runs_end_to_end(tmp_path, capsys):
    code = main(
        ["--hours", "0.25", "--policies", "kiropool,round_robin", "--jobs", "1", "--no-plots", "--out", str(tmp_path)]
    )
    assert code == 0
    assert set(json.loads((tmp_path / "fairness.json").read_text())) == {"kiropool", "round_robin"}
    assert "kiropool" in capsys.readouterr().out
    assert main(["--policies", "nope", "--out", str(tmp_path)]) == 2


UPKEEP_KEYS = KEYS | {
    "credits_wasted",
    "credits_spent",
    "failed_calls",
    "ejections",
    "probes",
    "returning_turns",
    "moved_share",
    "returning_turns_peak",
    "moved_share_peak",
    "moved_crowded_share_peak",
    "p95_wait_peak_ms",
    "p95_first_token_ms",
    "p95_first_token_peak_ms",
    "rejected",
}


def test_upkeep_and_patience_outputs(tmp_path):
    day = upkeep_scenario(Scenario(knobs=dataclasses.replace(Knobs(), hours=1.0, sessions_per_hour=250), seed=3))
    traffic = traffic_generate(day)
    variants = dispatcher_variants(day.knobs)
    sweep_ms = [0, day.knobs.sticky_patience_ms]
    results = simulate_dispatchers([*variants, *patience_sweep(sweep_ms)], day.pool, day.knobs, traffic, seed=3)
    summaries = [summarize(r) for r in results]
    by_variant, by_patience = summaries[:5], summaries[5:]
    written = write_upkeep_json(by_variant, by_patience, sweep_ms, tmp_path, meta={"source": "test"})
    upkeep = json.loads((tmp_path / "upkeep.json").read_text())
    assert list(upkeep) == ["today", "+ejection", "+pacing", "+patience", "new"]
    assert all(set(figures) == UPKEEP_KEYS for figures in upkeep.values())
    patience = json.loads((tmp_path / "patience.json").read_text())
    default = f"patience {sweep_ms[1] / 1000:g} s"
    assert [(name, f["patience_ms"]) for name, f in patience.items()] == [("patience 0 s", 0), (default, sweep_ms[1])]
    # the default patience is the "new" run itself
    assert patience[default] | {"patience_ms": 0} == upkeep["new"] | {"patience_ms": 0}
    assert set(json.loads((tmp_path / "upkeep-details.json").read_text())["runs"]) == set(upkeep) | set(patience)
    assert len(written) == 3

    lines = upkeep_table(by_variant).splitlines()
    assert lines[0].split()[:3] == ["run", "wasted", "failed"]
    assert [line.split()[0] for line in lines[2:]] == ["today", "+ejection", "+pacing", "+patience", "new"]
    assert any(line.startswith("credits wasted at reset: today") for line in upkeep_verdict(by_variant))
    assert patience_table(by_patience).splitlines()[2].startswith("patience 0 s")
    assert patience_verdict(by_patience, sweep_ms)[-1].startswith("under 10% moved")

    for png in upkeep_plots_write(by_variant, by_patience, sweep_ms, tmp_path):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_patience_aim_needs_both_figures():
    base = summarize(result_with(moved=50, waits=[0.0] * 19 + [10_000.0]))
    few_moves_cheap = summarize(result_with(moved=5, waits=[0.0] * 19 + [10_500.0]))
    few_moves_dear = summarize(result_with(moved=5, waits=[0.0] * 19 + [12_000.0]))
    many_moves_cheap = summarize(result_with(moved=20, waits=[0.0] * 19 + [10_000.0]))
    assert patience_meets(few_moves_cheap, base)
    assert not patience_meets(few_moves_dear, base)
    assert not patience_meets(many_moves_cheap, base)


def result_with(*, moved: int, waits: list[float]) -> RunResult:
    """100 returning turns at peak, ``moved`` of them moved; ``waits`` all at peak."""
    return RunResult(
        policy="p",
        identities=["a"],
        served=[100],
        available_s=[3600.0],
        binding_ticks=[0.0],
        bindings=[[1]],
        latencies_ms=[500.0],
        waits_ms=waits,
        sessions_moved=moved,
        requests=100,
        rejected={},
        upstream_errors={},
        turn_arrivals_s=[10.0] * len(waits),
        returning=[(10.0, MOVED_CROWDED)] * moved + [(10.0, STAYED)] * (100 - moved),
        peak_s=(0.0, 3600.0),
    )


def test_command_line_parts_and_sweep(tmp_path, capsys):
    argv = ["--hours", "0.25", "--parts", "patience", "--patience-sweep", "0,2000", "--jobs", "1", "--no-plots"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Sticky patience" in out and "Fairness" not in out and "against the new one" not in out
    assert list(json.loads((tmp_path / "patience.json").read_text())) == ["patience 0 s", "patience 2 s"]
    assert not (tmp_path / "fairness.json").exists() and not (tmp_path / "upkeep.json").exists()
    assert main(["--parts", "nope", "--out", str(tmp_path)]) == 2
