"""`make bench`: kiropool under load against the framework floor, on PostgreSQL.

One run, in this order (each load phase lasts BENCH_SECONDS after a short warm-up):

1. the floor (bench/floor: one indexed SELECT through DRF, CommonMiddleware
   only, persistent connections, 4 sync workers) and kiropool
   (kiropool/serve.py, 4 workers) are started side by side;
2. throughput, 16 closed-loop clients each: the floor, and kiropool running
   dispatch → complete (80 % existing sessions, 10 % new, 10 % none) with
   65,536 live bindings and with none. The three loads are measured in
   halves, in the order floor, bindings, none, none, bindings, floor: the
   machine's speed drifts, and one after the other the ratio to the floor
   measured the drift as much as kiropool;
3. the floor, open loop at 200 requests/s;
4. kiropool:
   - new-session traffic (every dispatch a fresh session, then complete) on a
     10-account key and on a 1,000-account key: both warmed, then measured
     10, 1,000, 1,000, 10 accounts (a fixed order favoured the second);
   - open loop, Poisson arrivals of 100 new-session dispatches/s (each then
     completed), latency from the scheduled start, on 50 and 1,000 accounts;
   - wake after release: how soon a waiting dispatch gets a released slot;
5. kiropool with 2 workers: 96 dispatches waiting on one held slot; how soon a
   completion and /healthz answer, then how the waiters are served;
6. two periodic tasks, over a minute's work at 100 new sessions a second:
   the latency refresh (an hour of samples) and the binding purge (6,000
   expired bindings); the wall time, their CPU and PostgreSQL's, and the
   longest a lease start waited for them.

A benchmark, not a test: it asserts nothing. It prints one table (figures,
targets, met or not) and writes bench/out/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time

from bench.load import report as tables
from bench.load import seed
from bench.load.phases import (
    CLIENTS,
    MAIN_ACCOUNTS,
    OPEN_PROCESSES,
    OPEN_SIZES,
    OPEN_THREADS,
    OUT,
    POOL_SIZES,
    WAITING_WORKERS,
    WORKERS,
    Run,
    connections_close,
)

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/kiropool_bench"
PHASES = ("floor", "throughput", "pool_size", "open_loop", "wake", "history", "waiting", "refresh", "purge")
REPORT_ORDER = (
    "settings",
    "floor",
    "dispatch",
    "dispatch_no_bindings",
    "pool_size",
    "open_loop",
    "wake_after_release_ms",
    "history",
    "bounded_waiting",
    "snapshot_refresh",
    "binding_purge",
    "checks",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", 20)))
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL))
    p.add_argument(
        "--profile",
        action="store_true",
        default=os.environ.get("BENCH_PROFILE", "") not in ("", "0"),
        help="py-spy flame graph of one kiropool worker during the 1,000-account phase (BENCH_PROFILE=1)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[name for name in os.environ.get("BENCH_ONLY", "").split(",") if name],
        help=f"run only these phases ({', '.join(PHASES)}; repeatable, or BENCH_ONLY=a,b);"
        " the table marks the rest not measured",
    )
    return p


def phases_chosen(names: list[str]) -> frozenset[str]:
    """The phases to run: those named (``--only`` / ``BENCH_ONLY``), or all."""
    unknown = set(names) - set(PHASES)
    if unknown:
        raise SystemExit(f"bench: unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    return frozenset(names or PHASES)


def environment_prepare(database_url: str) -> None:
    """The environment of this process (the seeding) and of every server it
    starts: the throwaway database, fresh secrets (so nothing runs on public
    defaults), no Redis (the cache is per process, as in `make run`)."""
    from cryptography.fernet import Fernet

    for name in ("REDIS_URL", "CELERY_BROKER_URL"):
        os.environ.pop(name, None)
    os.environ.update(
        DATABASE_URL=database_url,
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        KIROPOOL_FERNET_KEYS=Fernet.generate_key().decode(),
        # Every binding the run makes stays live: none is evicted mid-phase.
        KIROPOOL_AFFINITY_MAX_ENTRIES="1000000",
        LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=str(seed.ROOT / "var" / "bench-prometheus"),
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not args.database_url.startswith("postgres"):
        raise SystemExit("make bench runs on PostgreSQL: set BENCH_DATABASE_URL=postgres://...")
    only = phases_chosen(args.only)
    started = time.monotonic()
    say = _say(started)

    say(f"recreating {args.database_url} and seeding one pool per phase")
    environment_prepare(args.database_url)
    seed.database_recreate(args.database_url)
    seed.django_setup()
    seeded = seed.bench_seed(main_accounts=MAIN_ACCOUNTS, pool_sizes=POOL_SIZES, open_sizes=OPEN_SIZES)
    connections_close()  # the client processes are forked from this one
    report: dict = {
        "settings": {
            "seconds": args.seconds,
            "workers": WORKERS,
            "clients": CLIENTS,
            "open_loop_client_threads": OPEN_PROCESSES * OPEN_THREADS,
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    run = Run(
        env=dict(os.environ),
        seeded=seeded,
        seconds=args.seconds,
        profile=args.profile,
        say=say,
        only=only,
    )
    try:
        run.server_phases(report)
        run.waiting_phase(report)
        run.upkeep_phases(report)
    finally:
        # Also when a server would not start: the figures measured so far are kept.
        report_write(report, started)


def report_write(report: dict, started: float) -> None:
    report["checks"] = tables.checks(report)
    settings = report["settings"]
    settings["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    settings["wall_seconds"] = round(time.monotonic() - started, 1)
    # The phases ran in server order; the file reads in the table's order.
    ordered = {name: report[name] for name in REPORT_ORDER if name in report}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench.json").write_text(json.dumps(ordered, indent=2) + "\n")
    print()
    print(tables.table(report))
    print(
        f"\nkiropool: kiropool/serve.py (granian), {WORKERS} workers ({WAITING_WORKERS} for the waiters);"
        f" floor: {WORKERS} sync workers; {CLIENTS} closed-loop clients; open loop timed from the"
        f" scheduled start; {settings['seconds']:.0f} s per phase; load average"
        f" {settings['load_average_at_start'][0]} at start, {settings['load_average_at_end'][0]} at the end."
        "\nOn a shared machine the figures are indicative only."
    )
    print(f"written: {OUT / 'bench.json'}")


def _say(started: float):
    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message} ...", file=sys.stderr, flush=True)

    return say


if __name__ == "__main__":
    main()
