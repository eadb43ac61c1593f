"""Load generators of `make bench`, standard library only (they run in forked
client processes that never touch Django).

- :func:`closed_loop`: ``clients`` threads over ``processes`` processes, each
  starting its next cycle when the last one answered (throughput).
- :func:`open_loop`: Poisson arrivals at a fixed rate, each cycle started at
  its scheduled time by whichever client thread is free, and its latency taken
  from the *scheduled* start, so time spent queueing anywhere counts.

A cycle is one floor request, or a dispatch followed by its completion; the
latency reported is the floor request's or the dispatch's."""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

from bench.load import cpu
from bench.load.stats import (
    closed_figures,
    cpu_per_request,
    crowding,
    latency_summary,
    p99_by_part,
    poisson_schedule,
    schedule_split,
    server_timing_parse,
    slowest_clusters,
    slowest_split,
    status_counts,
)

DISPATCH = "/api/v1/dispatch"
# Fresh client processes need a moment to fork and connect before the clock starts.
START_DELAY_SECONDS = 0.5
# An open-loop cycle that starts later than this after its scheduled time
# started late: no client thread was free, or the client was not given a CPU.
LATE_START_SECONDS = 0.005
# The window in which the open loop counts the arrivals before each slow one
# (``bench.load.stats.crowding``): a few dispatches' service time, as long
# as a burst takes to drain. At 10 ms (one service time) the slowest 1 %
# counted 2.8-3.7 arrivals against 2.0 for any, and read as stalls; their
# arrival times showed bursts of 4-9 within 10-60 ms, and at 30 ms they
# count 6.4-7.0 against 3.9 (bench/HISTORY.md, 2026-12-04).
CROWD_WINDOW_SECONDS = 0.030
# How close together the slowest 1 %'s answers come to count as one cluster
# (``bench.load.stats.slowest_clusters``): about two dispatches' service
# time. A stall in one run answered seven dispatches that had started over
# 48 ms within 9 ms of one another (bench/HISTORY.md, 2026-12-06).
CLUSTER_GAP_SECONDS = 0.010


class Client:
    """One keep-alive HTTP connection to the server under test."""

    def __init__(self, port: int, key: str | None = None, *, timeout: float = 60) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.reused = False

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, http.client.HTTPMessage]:
        payload = None if body is None else json.dumps(body)
        for retry in (False, True):
            try:
                self.conn.request(method, path, payload, self.headers)
                response = self.conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                # A kept-alive connection the server closed while idle: nothing
                # was processed, so sending again on a new one is safe.
                if retry or not self.reused:
                    raise
                self.reused = False
                continue
            self.reused = not response.will_close
            if response.will_close:
                self.conn.close()
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                data = {}
            return response.status, data, response.headers  # case-insensitive, as HTTP header names are
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict) -> tuple[int, dict, http.client.HTTPMessage]:
        return self.request("POST", path, body)

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class Plan:
    """What every cycle of a phase does.

    ``traffic``: ``floor`` (POST the floor endpoint for account ``floor_pk``),
    ``mixed`` (80 % one of the ``bindings`` seeded sessions ``s-<n>``, 10 % a
    new session, 10 % no session) or ``new`` (every dispatch a new session)."""

    traffic: str
    key: str | None = None
    floor_pk: int = 0
    bindings: int = 0

    def body(self, rng: random.Random, tag: str, serial: int) -> dict:
        if self.traffic == "new":
            return {"session_id": f"new-{tag}-{serial}"}
        roll = rng.random()
        if roll < 0.8:
            return {"session_id": f"s-{rng.randrange(self.bindings)}"}
        if roll < 0.9:
            return {"session_id": f"new-{tag}-{serial}"}
        return {}


def cycle(client: Client, plan: Plan, rng: random.Random, tag: str, serial: int) -> tuple[float, list[int], str | None]:
    """Run one cycle; return when its first answer arrived (monotonic),
    every status code (0: no answer at all) and the first answer's
    ``Server-Timing`` header as sent (None without it), read after the run
    (:func:`open_loop`) so no client CPU goes to it while it is measured."""
    try:
        if plan.traffic == "floor":
            status, _, _ = client.post(f"/floor/{plan.floor_pk}", {})
            return time.monotonic(), [status], None  # the floor sends no Server-Timing
        status, data, headers = client.post(DISPATCH, plan.body(rng, tag, serial))
        answered = time.monotonic()
        timing = headers.get("Server-Timing")
        if status != 200:
            return answered, [status], timing
        done, _, _ = client.post(
            f"/api/v1/leases/{data['lease_id']}/complete",
            {"outcome": "success", "first_token_ms": round(rng.uniform(300, 900), 1)},
        )
        return answered, [status, done], timing
    except OSError:
        client.close()
        return time.monotonic(), [0], None


@dataclass
class Tally:
    """What one client thread measured inside the phase's window."""

    latencies: list[float]
    statuses: Counter
    last_answer: float = 0.0
    service: list[float] | None = None  # open loop: from the actual start
    lags: list[float] | None = None  # open loop: actual start − scheduled start
    late_claims: int = 0  # open loop: no client thread was free at the scheduled time
    scheduled: list[float] | None = None  # open loop: each latency's scheduled start (seconds into the schedule)
    timings: list[str | None] | None = None  # open loop: each first answer's Server-Timing header


def _closed_thread(port: int, plan: Plan, seed: str, window: tuple[float, float], tally: Tally) -> None:
    rng = random.Random(seed)
    client = Client(port, plan.key)
    begin, end = window
    time.sleep(max(0.0, begin - time.monotonic()))
    serial = 0
    while (started := time.monotonic()) < end:
        serial += 1
        answered, statuses, _ = cycle(client, plan, rng, seed, serial)
        if started >= begin:
            tally.latencies.append(answered - started)
            tally.statuses.update(statuses)
            tally.last_answer = time.monotonic()
    client.close()


def _open_thread(port: int, plan: Plan, seed: str, arrivals: list[float], state: dict, tally: Tally) -> None:
    rng = random.Random(seed)
    client = Client(port, plan.key)
    while True:
        with state["lock"]:
            index = state["next"]
            state["next"] += 1
        if index >= len(arrivals):
            break
        scheduled = state["start"] + arrivals[index]
        claimed = time.monotonic()
        time.sleep(max(0.0, scheduled - claimed))
        started = time.monotonic()
        answered, statuses, timing = cycle(client, plan, rng, seed, index)
        if arrivals[index] >= state["warmup"]:
            tally.latencies.append(answered - scheduled)
            tally.timings.append(timing)
            tally.scheduled.append(arrivals[index])
            tally.service.append(answered - started)
            tally.lags.append(started - scheduled)
            tally.late_claims += claimed > scheduled
            tally.statuses.update(statuses)
            tally.last_answer = time.monotonic()
    client.close()


def _client_process(target, jobs: list[tuple], queue) -> None:
    tallies = [Tally([], Counter(), service=[], lags=[], scheduled=[], timings=[]) for _ in jobs]
    threads = [threading.Thread(target=target, args=(*job, tally)) for job, tally in zip(jobs, tallies, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put(tallies)


def _run_processes(target, jobs_per_process: list[list[tuple]]) -> list[Tally]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(target, jobs, queue)) for jobs in jobs_per_process]
    for proc in procs:
        proc.start()
    tallies = [tally for _ in procs for tally in queue.get()]
    for proc in procs:
        proc.join()
    return tallies


def _statuses(tallies: list[Tally]) -> Counter:
    return sum((t.statuses for t in tallies), Counter())


def closed_loop(
    port: int,
    plan: Plan,
    *,
    name: str,
    seconds: float,
    warmup: float,
    clients: int,
    processes: int,
    keep_latencies: bool = False,
    meter: cpu.Meter | None = None,
) -> dict:
    """Throughput: every request (dispatch and completion) per second, in the
    window after ``warmup``; latencies are the dispatch's (or floor request's).
    ``name`` keeps the phase's new session ids apart from other phases'.
    ``keep_latencies``: the raw latencies too (``latencies_s``), for
    :func:`bench.load.stats.closed_merge`. ``meter``: the CPU each side
    spent in the window too (``cpu_s``, and ``cpu_ms_per_request``)."""
    begin = time.monotonic() + START_DELAY_SECONDS + warmup
    window = (begin, begin + seconds)
    watch = meter.watch(window) if meter is not None else None
    per_process = clients // processes
    jobs = [[(port, plan, f"{name}.{p}.{t}", window) for t in range(per_process)] for p in range(processes)]
    tallies = _run_processes(_closed_thread, jobs)
    latencies = [x for t in tallies for x in t.latencies]
    elapsed = max((t.last_answer for t in tallies), default=0.0) - begin
    result = closed_figures(statuses=_statuses(tallies), latencies=latencies, elapsed=elapsed, clients=clients)
    if watch is not None and (spent := watch.result()) is not None:
        result["cpu_s"] = spent
        result["cpu_ms_per_request"] = cpu_per_request(spent, result["requests"])
    if keep_latencies:
        result["latencies_s"] = latencies
    return result


def open_loop(
    port: int,
    plan: Plan,
    *,
    name: str,
    rate: float,
    seconds: float,
    warmup: float,
    seed: int,
    processes: int,
    threads: int,
) -> dict:
    """Latency at a fixed offered rate, from each arrival's scheduled start
    (``service_*``: from its actual start). ``late_starts`` counts the cycles
    that started over 5 ms late, ``no_free_thread`` those no client thread
    was free for: when they are not near 0 the client, not the server, set
    part of the pace. ``crowding``: how many arrivals came in the 10 ms up
    to each of the slowest 1 %, against all of them
    (:func:`bench.load.stats.crowding`). ``server_timing``: where the
    slowest 1 % and all of them spent their time in the server, when it sent
    a ``Server-Timing`` header (:func:`bench.load.stats.slowest_split`).
    ``clusters``: how the slowest 1 % group by when they were answered
    (:func:`bench.load.stats.slowest_clusters`)."""
    arrivals = poisson_schedule(rate, warmup + seconds, random.Random(seed))
    start = time.monotonic() + START_DELAY_SECONDS
    jobs = []
    for p, mine in enumerate(schedule_split(arrivals, processes)):
        # One state per process (it is copied by fork): the next arrival to take.
        state = {"lock": threading.Lock(), "next": 0, "start": start, "warmup": warmup}
        jobs.append([(port, plan, f"{name}.{p}.{t}", mine, state) for t in range(threads)])
    tallies = _run_processes(_open_thread, jobs)
    latencies = [x for t in tallies for x in t.latencies]
    services = [x for t in tallies for x in t.service]
    service = latency_summary(services)
    lags = [x for t in tallies for x in t.lags]
    measured = [pair for t in tallies for pair in zip(t.scheduled, t.latencies, strict=True)]
    timings = [server_timing_parse(x) for t in tallies for x in t.timings]
    elapsed = max((t.last_answer for t in tallies), default=0.0) - (start + warmup)
    return {
        "rate_per_s": rate,
        **latency_summary(latencies),
        "service_p50_ms": service["p50_ms"],
        "service_p99_ms": service["p99_ms"],
        "arrivals": len(latencies),
        # Below rate_per_s when the answers fell behind the arrivals.
        "answered_per_s": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "late_starts": sum(1 for lag in lags if lag > LATE_START_SECONDS),
        "no_free_thread": sum(t.late_claims for t in tallies),
        "start_lag_p99_ms": latency_summary(lags)["p99_ms"],
        "client_threads": processes * threads,
        "crowding": crowding(arrivals, measured, window=CROWD_WINDOW_SECONDS),
        "p99_by_third_ms": p99_by_part(measured, seconds=seconds, start=warmup),
        "server_timing": slowest_split(services, timings),
        "clusters": slowest_clusters(measured, timings, gap=CLUSTER_GAP_SECONDS),
        **status_counts(_statuses(tallies)),
    }
