"""The phases of one `make bench` run (``bench/load/__main__.py`` runs them
and writes the report): which servers are up, which loads run on them, in
what order, and where each figure goes in the report."""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from pathlib import Path

from bench.load import cpu, seed, servers, upkeep
from bench.load import report as tables
from bench.load.clients import Plan, closed_loop, open_loop
from bench.load.stats import closed_merge
from bench.load.waiting import bounded_waiting, wake_measure

OUT = Path(__file__).resolve().parent.parent / "out"
WORKERS = 4
CLIENTS, CLIENT_PROCESSES = 16, 4
MAIN_ACCOUNTS = 50
POOL_SIZES = (10, 1000)  # new-session throughput: small, large (and large again, ordered by latency bands)
LABELS = ("small", "large", "banded")
POOL_ORDER = ("small", "large", "banded", "banded", "large", "small")  # mirrored: a steady drift cancels
THROUGHPUT_LOADS = ("floor", "dispatch", "dispatch_no_bindings")  # measured in this order, then mirrored
POOL_WARMUP_SECONDS = 3.0  # a fresh worker's first dispatches compile the reads' shapes
OPEN_SIZES = (50, 1000)
OPEN_RATE = 100.0  # dispatches/s, each followed by its completion
# Enough client threads that 100 arrivals/s find one free unless a cycle takes
# over a second: then the late-start count says the client set the pace.
OPEN_PROCESSES, OPEN_THREADS = 4, 32
WARMUP_SECONDS = 1.0
WAKE_ROUNDS = 20
WAITING_WORKERS = 2
WAITERS, WAITER_MAX_WAIT_MS = 96, 60_000
WAITER_GAP_SECONDS, WAITER_SETTLE_SECONDS = 0.01, 1.0
LOAD_TITLES = {
    "floor": "floor",
    "dispatch": f"dispatch+complete, {seed.BINDINGS:,} live bindings",
    "dispatch_no_bindings": "dispatch+complete, 0 bindings",
}
HISTORY_LEASES = 200_000  # completed since the last vacuum: a day at a couple of leases a second
MAIN_SERVER_PHASES = frozenset({"throughput", "pool_size", "open_loop", "wake", "history"})  # one kiropool serves them


def phase(report: dict, name: str, run, *path: str) -> None:
    """Run one phase into ``report[*path][name]``; a failure is recorded and the run goes on."""
    into = report
    for part in path:
        into = into.setdefault(part, {})
    try:
        into[name] = run()
    except Exception as error:  # noqa: BLE001  one broken phase must not lose the others' figures
        into[name] = failed(error)


def failed(error: Exception) -> dict:
    """What a phase that raised leaves in the report (its traceback goes to stderr)."""
    traceback.print_exc()
    return {"error": f"{type(error).__name__}: {error}"}


class Run:
    def __init__(
        self, *, env: dict[str, str], seeded: seed.Seeded, seconds: float, profile: bool, say, only: frozenset[str]
    ) -> None:
        self.env, self.seeded, self.profile, self.say, self.only = env, seeded, profile, say, only
        self.servers: list = []  # every server up (the CPU split counts the idle ones apart)
        self.closed = dict(seconds=seconds, warmup=WARMUP_SECONDS, clients=CLIENTS, processes=CLIENT_PROCESSES)
        # Loads measured in two halves, each half's latencies kept to merge them.
        self.half = {**self.closed, "seconds": seconds / 2, "keep_latencies": True}
        self.opened = dict(
            rate=OPEN_RATE, seconds=seconds, warmup=WARMUP_SECONDS, processes=OPEN_PROCESSES, threads=OPEN_THREADS
        )

    def server_phases(self, report: dict) -> None:
        """Every phase of the floor and of the 4-worker kiropool, both
        servers up together (an idle one costs the other nothing)."""
        with contextlib.ExitStack() as stack:
            floor = server = None
            if "floor" in self.only:
                floor = stack.enter_context(
                    servers.floor_server(self.env, workers=WORKERS, log=OUT / "server-floor.log")
                )
            if self.only & MAIN_SERVER_PHASES:
                server = stack.enter_context(
                    servers.kiropool_server(self.env, workers=WORKERS, log=OUT / "server-kiropool.log")
                )
            self.servers = [s for s in (floor, server) if s is not None]
            self.throughput_phases(report, floor, server)
            if floor is not None:
                self.floor_open_loop(report, floor)
            if server is None:
                return
            if "pool_size" in self.only:
                self.vacuum()
                self.pool_size_phases(report, server)
            if "open_loop" in self.only:
                self.vacuum()
                self.open_loop_phases(report, server.port)
            if "wake" in self.only:
                self.say(f"wake after release: {WAKE_ROUNDS} rounds")
                phase(
                    report,
                    "wake_after_release_ms",
                    lambda: wake_measure(server.port, self.seeded.wake_key, WAKE_ROUNDS),
                )
            if "history" in self.only:
                phase(report, "history", lambda: self.history_phases(server))

    def vacuum(self) -> None:
        """What autovacuum would have done for the phases that follow.

        The machine's PostgreSQL runs without autovacuum, and every phase
        rewrites the order table's rows (a claim moves the identity's last
        start, a new session the binding counter: indexed columns, so no
        update is HOT). After the throughput and pool-size phases the table
        held 70,442 dead row versions beside 6,324 live ones, and each head
        read stepped over their index entries; in production autovacuum
        visits such a table about once a minute. Vacuuming here did not by
        itself end the open loop's saturation (bench/HISTORY.md),
        but no phase measures a bloat production would not have."""
        self.say("vacuum, as autovacuum would between phases")
        seed.statistics_refresh()
        connections_close()

    def throughput_phases(self, report: dict, floor, server) -> None:
        """The closed loops the throughput targets compare: the floor's and
        kiropool's mixed traffic with and without bindings, each measured in
        two halves, in ``THROUGHPUT_LOADS`` order and then back. The machine's
        speed drifts by tens of percent within minutes (the floor measured
        1,152 and 1,956 rps a quarter of an hour apart); mirrored, a steady
        drift weighs on every load alike."""
        seeded = self.seeded
        loads: dict[str, tuple[int, Plan]] = {}
        meters: dict[str, cpu.Meter | None] = {}
        extra: dict[str, dict] = {}
        if floor is not None:
            loads["floor"] = (floor.port, Plan("floor", floor_pk=seeded.floor_pk))
            meters["floor"] = cpu.Meter.of(floor, self.servers)
        if server is not None and "throughput" in self.only:
            for name, key, key_id in (
                ("dispatch", seeded.key, seeded.key_id),
                ("dispatch_no_bindings", seeded.empty_key, seeded.empty_key_id),
            ):
                loads[name] = (server.port, Plan("mixed", key=key, bindings=seed.BINDINGS))
                meters[name] = cpu.Meter.of(server, self.servers)
                extra[name] = {"bindings": seed.live_bindings(key_id)}
            connections_close()
        order = [name for name in THROUGHPUT_LOADS if name in loads]
        runs: dict[str, list[dict]] = {name: [] for name in order}
        for n, name in enumerate(order + order[::-1]):
            if name in report:
                continue  # failed in its first half
            port, plan = loads[name]
            self.say(f"{LOAD_TITLES[name]}, {CLIENTS} closed-loop clients (run {n + 1} of {2 * len(order)})")
            try:
                runs[name].append(closed_loop(port, plan, name=f"{name}.{n}", **self.half, meter=meters[name]))
            except Exception as error:  # noqa: BLE001  one broken load must not lose the others' figures
                report[name] = failed(error)
        for name in order:
            if name not in report:
                report[name] = {**extra.get(name, {}), **closed_merge(runs[name])}

    def floor_open_loop(self, report: dict, floor) -> None:
        rate = 2 * OPEN_RATE  # kiropool's dispatches and completions together
        self.say(f"floor: open loop at {rate:.0f} requests/s")
        plan = Plan("floor", floor_pk=self.seeded.floor_pk)
        opened = {**self.opened, "rate": rate}
        phase(report, "floor", lambda: open_loop(floor.port, plan, name="floor-open", **opened, seed=3), "open_loop")

    def pool_size_phases(self, report: dict, server) -> None:
        """New-session traffic on a small pool, a large one, and a large one
        ordered by latency bands (the production path: its gateways report
        first-token times). Each key is served unmeasured first, then
        measured in the order small, large, banded, banded, large, small,
        each for half the phase. In a fixed order whichever key ran first
        lost: BENCH_ONLY=pool_size runs of 10 s gave a ratio of 0.89-0.94
        small first and 0.59-0.65 large first. The warm-up takes the
        server's first requests out of the figures, and the mirrored order
        cancels a steady drift of the machine."""
        small, large = POOL_SIZES
        keys = {
            "small": (small, self.seeded.pool_keys[small]),
            "large": (large, self.seeded.pool_keys[large]),
            "banded": (large, self.seeded.banded_key),
        }
        runs: dict[str, list[dict]] = {label: [] for label in LABELS}
        sizes = report.setdefault("pool_size", {})
        measured = {**self.half, "meter": cpu.Meter.of(server, self.servers)}
        warm = {**self.closed, "seconds": POOL_WARMUP_SECONDS}
        try:
            seed.latency_refresh()  # fresh, so its bands order throughout
            for label, (accounts, key) in keys.items():
                self.say(f"new sessions, {accounts:,}-account key ({label}): warm-up, not counted")
                closed_loop(server.port, Plan("new", key=key), name=f"warm-{label}", **warm)
            profile = None
            for n, label in enumerate(POOL_ORDER):
                accounts, key = keys[label]
                self.say(
                    f"new sessions, {accounts:,}-account key ({label}), {CLIENTS} closed-loop clients"
                    f" (run {n + 1} of {len(POOL_ORDER)})"
                )
                if self.profile and label == "large" and not runs[label]:
                    # The profile covers the large key's first run and the two banded
                    # runs after it. The sampler costs CPU the server would otherwise
                    # have, so those figures read a little low.
                    seconds = 3 * (self.half["warmup"] + self.half["seconds"] + 1)
                    profile = Profile(server, seconds=seconds, output=OUT / f"profile-{accounts}-accounts.svg")
                runs[label].append(pool_size_run(server, key, label, measured, n))
                if profile is not None and len(runs["banded"]) == 2:
                    sizes["profile"], profile = profile.finish(), None
        except Exception as error:  # noqa: BLE001  one broken phase must not lose the others' figures
            error_row = failed(error)
            for label in LABELS:
                sizes[label] = error_row
        else:
            for label, (accounts, _) in keys.items():
                sizes[label] = {"accounts": accounts, **closed_merge(runs[label])}
        for label, field in (("large", "ratio"), ("banded", "ratio_banded")):
            if all("rps" in sizes.get(name, {}) for name in ("small", label)) and sizes["small"]["rps"]:
                sizes[field] = round(sizes[label]["rps"] / sizes["small"]["rps"], 3)
        sizes["target_ratio"] = tables.POOL_RATIO

    def open_loop_phases(self, report: dict, port: int) -> None:
        report.setdefault("open_loop", {})["rate_per_s"] = OPEN_RATE
        for accounts in OPEN_SIZES:
            self.say(f"open loop: {OPEN_RATE:.0f} new-session dispatches/s on {accounts:,} accounts")
            plan = Plan("new", key=self.seeded.open_keys[accounts])
            phase(
                report,
                f"accounts_{accounts}",
                lambda plan=plan, accounts=accounts: open_loop(
                    port, plan, name=f"open{accounts}", **self.opened, seed=accounts
                ),
                "open_loop",
            )

    def history_phases(self, server) -> dict:
        """New-session traffic on a pool with no history, then with
        ``HISTORY_LEASES`` completed leases not yet vacuumed, the reads'
        probe for unreaped leases reading from 1970, then the same once the
        reaper has run and the probe starts at its mark (README, Decisions).
        Last of the server's phases: nothing vacuums after it. Not mirrored
        (the leases cannot be taken back without a vacuum), so a drift of
        the machine shows in the ratios."""
        from routing.selectors import reaped  # Django is set up by now

        plan = Plan("new", key=self.seeded.history_key)
        run = {**self.closed, "seconds": self.closed["seconds"] / 2}
        self.say("history: warm-up, not counted")
        closed_loop(server.port, plan, name="warm-history", **{**self.closed, "seconds": POOL_WARMUP_SECONDS})
        self.say(f"history: new sessions, {CLIENTS} closed-loop clients, no completed leases")
        clean = closed_loop(server.port, plan, name="history-clean", **run)
        self.say(f"history: {HISTORY_LEASES:,} completed leases, not vacuumed")
        seed.history_seed(HISTORY_LEASES)
        self.say("history: the same, the probe reading from 1970 (no reap has run)")
        oldest = closed_loop(server.port, plan, name="history-oldest", **run)
        self.say("history: the reaper runs once, and every worker reads its mark")
        seed.reap()
        time.sleep(reaped.REFRESH_SECONDS + 1)
        self.say("history: the same, the probe reading from the reap mark")
        marked = closed_loop(server.port, plan, name="history-mark", **run)
        return {"completed_leases": HISTORY_LEASES, "clean": clean, "from_oldest": oldest, "from_mark": marked}

    def waiting_phase(self, report: dict) -> None:
        if "waiting" not in self.only:
            return
        self.say(f"bounded waiting: kiropool with {WAITING_WORKERS} workers, {WAITERS} waiters on one slot")
        log = OUT / "server-waiting.log"
        with servers.kiropool_server(self.env, workers=WAITING_WORKERS, log=log) as server:
            phase(
                report,
                "bounded_waiting",
                lambda: {
                    "workers": WAITING_WORKERS,
                    **bounded_waiting(
                        server.port,
                        self.seeded.waiting_key,
                        waiters=WAITERS,
                        max_wait_ms=WAITER_MAX_WAIT_MS,
                        gap=WAITER_GAP_SECONDS,
                        settle=WAITER_SETTLE_SECONDS,
                    ),
                },
            )

    def upkeep_phases(self, report: dict) -> None:
        """The periodic tasks that write the rows a lease start moves, each
        timed over a minute's worth of work at 100 new sessions a second
        (``bench/load/upkeep.py``). Last: they leave the pools changed."""
        url = self.env["DATABASE_URL"]
        if "refresh" in self.only:
            self.say(f"latency refresh: {upkeep.REFRESH_SAMPLES:,} samples in its window, {upkeep.RUNS} runs")
            phase(report, "snapshot_refresh", lambda: upkeep.refresh_measure(database_url=url))
        if "purge" in self.only:
            self.say(f"binding purge: {upkeep.PURGE_EXPIRED:,} expired bindings, {upkeep.RUNS} runs")
            phase(report, "binding_purge", lambda: upkeep.purge_measure(key_id=self.seeded.key_id, database_url=url))


def connections_close() -> None:
    from django.db import connections

    connections.close_all()


def pool_size_run(server, key: str, label: str, closed: dict, run: int) -> dict:
    """Run ``run`` of new-session traffic on ``key`` (its number keeps its
    session ids apart from the other runs', so every one is new)."""
    return closed_loop(server.port, Plan("new", key=key), name=f"size-{label}.{run}", **closed)


class Profile:
    """A py-spy profile of one worker of ``server`` into ``output``, or why
    there is none (``note``)."""

    def __init__(self, server, *, seconds: float, output: Path) -> None:
        self.output, self.process, self.note = output, None, None
        try:
            self.process = servers.profile_start(server, seconds=seconds, output=output)
        except RuntimeError as error:
            self.note = f"not recorded: {error}"

    def finish(self) -> str:
        if self.process is not None:
            _, stderr = self.process.communicate(timeout=60)
            ok = self.process.returncode == 0
            self.note = str(self.output) if ok else f"py-spy failed: {stderr.decode()[-300:]}"
        print(f"profile: {self.note}", file=sys.stderr)
        return self.note
