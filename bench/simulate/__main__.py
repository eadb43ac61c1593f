"""``python -m bench.simulate``: run every policy on the same traffic, then
kiropool's dispatcher variants on the upkeep day (issue 12: credits that reset,
failing upstreams) and a sticky-patience sweep; print the tables, write the
JSON files and PNG plots to ``bench/out/``.

``--trace FILE`` replays a trace written by ``manage.py export_trace`` instead
of drawing synthetic traffic; the variants and the sweep then run on it as
recorded (a trace carries no credit plans).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from bench.simulate.metrics import summarize
from bench.simulate.policies import POLICY_NAMES
from bench.simulate.report import (
    patience_table,
    patience_verdict,
    table,
    upkeep_table,
    upkeep_verdict,
    verdict,
    write_json,
    write_upkeep_json,
)
from bench.simulate.runs import simulate_all, simulate_dispatchers
from bench.simulate.scenario import Knobs, Scenario, default_pool, upkeep_scenario
from bench.simulate.traffic import trace_load, traffic_generate
from bench.simulate.variants import PATIENCE_SWEEP_MS, dispatcher_variants, patience_sweep
from routing.selection import POOL_CREDIT_FIRST

OUT = Path(__file__).resolve().parent.parent / "out"
PARTS = ("fairness", "upkeep", "patience")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--trace", type=Path, help="replay this JSON-lines trace instead of synthetic traffic")
    p.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated, in table order")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="fairness (the six policies), upkeep (dispatcher variants), patience (the sweep)",
    )
    p.add_argument(
        "--patience-sweep",
        type=_ints,
        default=list(PATIENCE_SWEEP_MS),
        help="sticky patience values to sweep, in ms (default %(default)s)",
    )
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
    k.add_argument(
        "--sticky-patience-ms", type=int, default=defaults.sticky_patience_ms, help="the new dispatcher's patience"
    )
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
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        print(f"unknown parts: {args.parts}; choose from {', '.join(PARTS)}", file=sys.stderr)
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
        sticky_patience_ms=args.sticky_patience_ms,
        litellm_buffer=args.litellm_buffer,
        **({"quota_events": ()} if args.no_quota_event else {}),
    )
    if args.trace:
        with args.trace.open() as f:
            pool, traffic = trace_load(f, knobs=knobs, seed=args.seed, concurrency=args.concurrency)
        source = f"trace {args.trace}"
        upkeep = (pool, knobs, traffic)
    else:
        scenario = Scenario(pool=default_pool(), knobs=knobs, seed=args.seed)
        pool, traffic = scenario.pool, traffic_generate(scenario)
        source = f"synthetic, seed {args.seed}"
        day = upkeep_scenario(scenario)
        upkeep = (day.pool, day.knobs, traffic_generate(day))

    print(
        f"{source}: {traffic.duration_s / 3600:.1f} simulated hours, {len(pool.identities)} identities, "
        f"{len(pool.accounts)} accounts, {traffic.requests} requests in {len(traffic.scripts)} scripts; "
        f"{args.jobs} process(es)"
    )
    written: list[Path] = []
    if "fairness" in parts:
        written += _fairness(args, names, pool, knobs, traffic, source)
    if "upkeep" in parts or "patience" in parts:
        written += _upkeep(args, parts, *upkeep, source)
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _fairness(args, names, pool, knobs, traffic, source) -> list[Path]:
    results = simulate_all(names, pool, knobs, traffic, seed=args.seed, jobs=args.jobs)
    summaries = [summarize(r) for r in results]
    print()
    print(f"Fairness: {len(names)} policies, today's dispatcher")
    print(table(summaries))
    print()
    for line in verdict(summaries):
        print(line)
    meta = {"source": source, "knobs": dataclasses.asdict(knobs), "requests": traffic.requests}
    written = list(write_json(summaries, args.out, meta=meta))
    if not args.no_plots:
        from bench.simulate.plots import plots_write  # matplotlib loads only when plotting

        written += plots_write(summaries, results, args.out)
    return written


def _upkeep(args, parts, pool, knobs, traffic, source) -> list[Path]:
    variants = dispatcher_variants(knobs) if "upkeep" in parts else []
    sweep_ms = args.patience_sweep if "patience" in parts else []
    sweep = patience_sweep(sweep_ms)
    # One call, so runs the two share (same features) run once.
    results = simulate_dispatchers([*variants, *sweep], pool, knobs, traffic, seed=args.seed, jobs=args.jobs)
    summaries = [summarize(r) for r in results]
    by_variant, by_patience = summaries[: len(variants)], summaries[len(variants) :]
    start, end = by_patience[0].peak_s if by_patience else by_variant[0].peak_s
    peak = f"peak {start / 3600:02.0f}:00-{end / 3600:02.0f}:00"
    day = "the trace" if args.trace else "the upkeep day"
    if by_variant:
        print()
        print(f"{day.capitalize()}: kiropool's ordering, today's dispatcher against the new one ({peak})")
        print(upkeep_table(by_variant))
        print()
        for line in upkeep_verdict(by_variant):
            print(line)
    if by_patience:
        print()
        print(f"Sticky patience on {day}, with ejection and pacing ({peak})")
        print(patience_table(by_patience))
        print()
        for line in patience_verdict(by_patience, sweep_ms):
            print(line)
    meta = {
        "source": source,
        "knobs": dataclasses.asdict(knobs),
        "requests": traffic.requests,
        "peak_s": [start, end],
        "key_pools": dict(pool.key_pools),
        "credit_first": sorted({a.name for a in pool.accounts if a.pool == POOL_CREDIT_FIRST}),
    }
    written = write_upkeep_json(by_variant, by_patience, sweep_ms, args.out, meta=meta)
    if not args.no_plots:
        from bench.simulate.plots import upkeep_plots_write

        written += upkeep_plots_write(by_variant, by_patience, sweep_ms, args.out)
    return written


if __name__ == "__main__":
    sys.exit(main())
