"""``python -m bench.simulate``: run every policy on the same traffic, print the
table, write ``bench/out/fairness.json``, ``details.json`` and the PNG plots.

``--trace FILE`` replays a trace written by ``manage.py export_trace`` instead
of drawing synthetic traffic.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from bench.simulate.engine import simulate_all
from bench.simulate.metrics import summarize
from bench.simulate.policies import POLICY_NAMES
from bench.simulate.report import table, verdict, write_json
from bench.simulate.scenario import Knobs, Scenario, default_pool
from bench.simulate.traffic import trace_load, traffic_generate

OUT = Path(__file__).resolve().parent.parent / "out"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--trace", type=Path, help="replay this JSON-lines trace instead of synthetic traffic")
    p.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated, in table order")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    p.add_argument("--no-plots", action="store_true")
    k = p.add_argument_group("traffic knobs (synthetic traffic)")
    defaults = Knobs()
    k.add_argument("--hours", type=float, default=defaults.hours)
    k.add_argument("--sessions-per-hour", type=float, default=defaults.sessions_per_hour)
    k.add_argument("--diurnal-amplitude", type=float, default=defaults.diurnal_amplitude)
    k.add_argument("--mean-turns", type=float, default=defaults.mean_turns)
    k.add_argument("--think-median-s", type=float, default=defaults.think_median_s)
    k.add_argument("--stateless-share", type=float, default=defaults.stateless_share)
    k.add_argument("--generation-median-s", type=float, default=defaults.generation_median_s)
    k.add_argument("--bursts-per-identity-day", type=float, default=defaults.bursts_per_identity_day)
    k.add_argument("--no-quota-event", action="store_true", help="drop the default quota exhaustion")
    k.add_argument("--max-wait-ms", type=int, default=defaults.max_wait_ms)
    k.add_argument("--litellm-buffer", type=float, default=defaults.litellm_buffer)
    k.add_argument("--concurrency", type=int, default=2, help="slots per identity when replaying a trace")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = sorted(set(names) - set(POLICY_NAMES))
    if unknown:
        print(f"unknown policies: {', '.join(unknown)}; choose from {', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    knobs = dataclasses.replace(
        Knobs(),
        hours=args.hours,
        sessions_per_hour=args.sessions_per_hour,
        diurnal_amplitude=args.diurnal_amplitude,
        mean_turns=args.mean_turns,
        think_median_s=args.think_median_s,
        stateless_share=args.stateless_share,
        generation_median_s=args.generation_median_s,
        bursts_per_identity_day=args.bursts_per_identity_day,
        max_wait_ms=args.max_wait_ms,
        litellm_buffer=args.litellm_buffer,
        **({"quota_events": ()} if args.no_quota_event else {}),
    )
    if args.trace:
        with args.trace.open() as f:
            pool, traffic = trace_load(f, knobs=knobs, seed=args.seed, concurrency=args.concurrency)
        source = f"trace {args.trace}"
    else:
        scenario = Scenario(pool=default_pool(), knobs=knobs, seed=args.seed)
        pool, traffic = scenario.pool, traffic_generate(scenario)
        source = f"synthetic, seed {args.seed}"

    print(
        f"{source}: {traffic.duration_s / 3600:.1f} simulated hours, {len(pool.identities)} identities, "
        f"{len(pool.accounts)} accounts, {traffic.requests} requests in {len(traffic.scripts)} scripts; "
        f"{len(names)} policies on {args.jobs} process(es)"
    )
    results = simulate_all(names, pool, knobs, traffic, seed=args.seed, jobs=args.jobs)
    summaries = [summarize(r) for r in results]
    print()
    print(table(summaries))
    print()
    for line in verdict(summaries):
        print(line)

    meta = {"source": source, "knobs": dataclasses.asdict(knobs), "requests": traffic.requests}
    written = list(write_json(summaries, args.out, meta=meta))
    if not args.no_plots:
        from bench.simulate.plots import plots_write  # matplotlib loads only when plotting

        written += plots_write(summaries, results, args.out)
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
