"""The outputs: the table, fairness.json's exact keys, the PNGs. No database."""

from __future__ import annotations

import dataclasses
import json

from bench.simulate.__main__ import main
from bench.simulate.engine import simulate_all
from bench.simulate.metrics import summarize
from bench.simulate.plots import plots_write
from bench.simulate.policies import POLICY_NAMES
from bench.simulate.report import table, verdict, write_json
from bench.simulate.scenario import Knobs, Scenario
from bench.simulate.traffic import traffic_generate

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
