"""The benchmark's maths, pure: the open-loop schedule, latency summaries,
how crowded the arrivals behind the tail were, closed-loop runs taken as
one, and how far an answer order is from the arrival order."""

from __future__ import annotations

import bisect
import contextlib
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from bench.simulate.metrics import percentile

T = TypeVar("T")


def poisson_schedule(rate: float, seconds: float, rng: random.Random) -> list[float]:
    """Arrival times (seconds from 0, ascending, all below ``seconds``) of a
    Poisson process of ``rate`` per second: exponential gaps of mean 1/rate."""
    if rate <= 0 or seconds < 0:
        raise ValueError("rate must be positive and seconds not negative")
    arrivals, at = [], rng.expovariate(rate)
    while at < seconds:
        arrivals.append(at)
        at += rng.expovariate(rate)
    return arrivals


def schedule_split(arrivals: Sequence[float], parts: int) -> list[list[float]]:
    """Deal the arrivals round-robin to ``parts`` client processes: each part
    is a thinned Poisson process and together they are the whole schedule."""
    return [list(arrivals[p::parts]) for p in range(parts)]


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds (``None`` when nothing was measured)."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(percentile(seconds, 50) * 1000, 2),
        "p99_ms": round(percentile(seconds, 99) * 1000, 2),
    }


def slowest_of(items: Sequence[T], *, key: Callable[[T], float], share: float) -> list[T]:
    """The slowest ``share`` of ``items`` by ``key`` (at least one), slowest
    first: the tail every open-loop figure of the slowest 1 % looks at."""
    return sorted(items, key=key, reverse=True)[: max(1, round(len(items) * share))]


def crowding(
    schedule: Sequence[float], measured: Sequence[tuple[float, float]], *, window: float, share: float = 0.01
) -> dict[str, float | None]:
    """How many arrivals of ``schedule`` (ascending) fell in the ``window``
    seconds up to each ``measured`` arrival (its scheduled time and its
    latency), itself included: on average over the slowest ``share`` of them
    (``slowest``), and over all of them (``all``, about ``1 + rate * window``).
    Then the measured arrivals split in two by that count: ``calm`` (at most
    the average, rounded) and ``crowded`` (more), with the p99 latency of
    each and the share that was crowded.

    It tells two kinds of tail apart. If the slowest arrivals came in bursts
    of the Poisson schedule, their figure is well above the average and the
    crowded arrivals' p99 well above the calm ones': the server could not
    serve a burst as fast as it came, and only a cheaper request lowers the
    tail. If both are near, the slow requests arrived like any other, and
    something else stalled them (a pause of a worker or of the database)."""
    found: dict[str, float | None] = {
        "window_ms": round(window * 1000, 3),
        "slowest": None,
        "all": None,
        "calm_p99_ms": None,
        "crowded_p99_ms": None,
        "crowded_share": None,
    }
    if not measured:
        return found

    def crowd(at: float) -> int:
        return bisect.bisect_right(schedule, at) - bisect.bisect_left(schedule, at - window)

    crowds = [crowd(at) for at, _ in measured]
    average = sum(crowds) / len(crowds)
    slowest = slowest_of(list(zip(measured, crowds, strict=True)), key=lambda item: item[0][1], share=share)
    found["slowest"] = round(sum(n for _, n in slowest) / len(slowest), 2)
    found["all"] = round(average, 2)
    # Rounded, not up: at 100/s over 30 ms the average is 4.0 give or take
    # a little, and rounding up would move the split between runs.
    calm_most = math.floor(average + 0.5)
    calm = [latency for (_, latency), n in zip(measured, crowds, strict=True) if n <= calm_most]
    crowded = [latency for (_, latency), n in zip(measured, crowds, strict=True) if n > calm_most]
    found["calm_p99_ms"] = latency_summary(calm)["p99_ms"]
    found["crowded_p99_ms"] = latency_summary(crowded)["p99_ms"]
    found["crowded_share"] = round(len(crowded) / len(measured), 3)
    return found


def p99_by_part(
    measured: Sequence[tuple[float, float]], *, seconds: float, start: float, parts: int = 3
) -> list[float | None]:
    """The p99 latency (ms) of the ``measured`` arrivals (scheduled time,
    latency) in each of ``parts`` equal slices of the window from ``start``
    to ``start + seconds``, in order (``None`` for a slice with none).

    A tail that grows from the first slice to the last is something that
    builds up while the phase runs (dead row versions, bindings, a process's
    memory), not a burst of the schedule or a stall, which land anywhere."""
    if seconds <= 0 or parts < 1:
        raise ValueError("seconds and parts must be positive")
    slices: list[list[float]] = [[] for _ in range(parts)]
    for at, latency in measured:
        part = min(parts - 1, max(0, int((at - start) / seconds * parts)))
        slices[part].append(latency)
    return [latency_summary(latencies)["p99_ms"] for latencies in slices]


def status_counts(statuses: Mapping[int, int]) -> dict:
    """Requests, the ones not answered 2xx, and how many got each status."""
    requests = sum(statuses.values())
    errors = requests - sum(n for code, n in statuses.items() if 200 <= code < 300)
    return {"requests": requests, "errors": errors, "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def closed_figures(*, statuses: Mapping[int, int], latencies: Sequence[float], elapsed: float, clients: int) -> dict:
    """A closed-loop window's figures: every request per second of it, the
    dispatch latencies' percentiles, the statuses."""
    counted = status_counts(statuses)
    return {
        "rps": round(counted["requests"] / elapsed, 1) if elapsed > 0 else 0.0,
        **latency_summary(latencies),
        "cycles": len(latencies),
        **counted,
        "clients": clients,
        "elapsed_s": round(max(elapsed, 0.0), 3),
    }


def closed_merge(runs: Sequence[dict]) -> dict:
    """Several closed-loop runs of one load (``closed_loop(...,
    keep_latencies=True)``) as one window: requests over the sum of their
    windows, percentiles over every latency, statuses added up, and the CPU
    each side spent (``cpu_s``) added up when every run measured it. Each
    run's own rate stays in ``runs_rps``."""
    if not runs:
        raise ValueError("nothing to merge")
    statuses: Counter[int] = Counter()
    for run in runs:
        statuses.update({int(code): n for code, n in run["statuses"].items()})
    merged = closed_figures(
        statuses=statuses,
        latencies=[x for run in runs for x in run["latencies_s"]],
        elapsed=sum(run["elapsed_s"] for run in runs),
        clients=runs[0]["clients"],
    )
    merged["runs_rps"] = [run["rps"] for run in runs]
    if all(run.get("cpu_s") for run in runs):  # a split only when every run has one
        spent = {kind: round(sum(run["cpu_s"][kind] for run in runs), 3) for kind in runs[0]["cpu_s"]}
        merged["cpu_s"] = spent
        merged["cpu_ms_per_request"] = cpu_per_request(spent, merged["requests"])
    return merged


def cpu_per_request(spent_s: Mapping[str, float], requests: int) -> dict[str, float] | None:
    """Milliseconds of CPU per request by kind (``bench.load.cpu``), and
    ``all`` of them together; None without requests."""
    if not requests:
        return None
    split = {kind: round(1000 * seconds / requests, 3) for kind, seconds in spent_s.items()}
    return {**split, "all": round(sum(split.values()), 3)}


def inversions(ranks: Sequence[int]) -> int:
    """Pairs served in the opposite order of their arrival: ``ranks`` are the
    arrival ranks in the order the answers came. Quadratic: it is used on at
    most a few hundred waiters."""
    return sum(1 for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] > ranks[j])


def inversion_fraction(ranks: Sequence[int]) -> float | None:
    """Inversions over all pairs: 0 in arrival order, 1 in reverse; ``None`` under two answers."""
    pairs = math.comb(len(ranks), 2)
    return inversions(ranks) / pairs if pairs else None


def kendall_tau(ranks: Sequence[int]) -> float | None:
    """Kendall's tau between arrival and answer order (ranks are distinct):
    1 in arrival order, 0 for no relation, -1 in reverse."""
    fraction = inversion_fraction(ranks)
    return None if fraction is None else 1 - 2 * fraction


def server_timing_parse(value: str | None) -> dict[str, float]:
    """The metrics of a ``Server-Timing`` header's value, by name, in
    milliseconds; a metric without a readable duration is left out.
    kiropool sends one when ``KIROPOOL_SERVER_TIMING`` is on
    (``core/server_timing.py``)."""
    metrics = {}
    for metric in (value or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if key.strip() == "dur":
                with contextlib.suppress(ValueError):
                    metrics[name] = float(number)
    return metrics


SPLIT_PARTS = ("db", "cpu", "wait")


def slowest_split(
    service: Sequence[float], timings: Sequence[Mapping[str, float]], *, share: float = 0.01
) -> dict[str, dict[str, float]] | None:
    """Where the dispatches' time went, by the server's own ``Server-Timing``
    (its ``app`` time split into ``db``, ``cpu`` and ``wait``): the medians,
    in ms, over the slowest ``share`` of them by ``service`` time (seconds,
    from the actual start) and over all of them. ``outside`` is the service
    time the app did not see: the network, the server's queue before a
    thread took the request, the client's own wait for a CPU. None when no
    answer carried the header (kiropool ran without it)."""
    pairs = [(s, t) for s, t in zip(service, timings, strict=True) if "app" in t]
    if not pairs:
        return None

    def medians(chosen: list[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
        found = {"service": round(percentile([s * 1000 for s, _ in chosen], 50), 2)}
        found["outside"] = round(percentile([max(0.0, s * 1000 - t["app"]) for s, t in chosen], 50), 2)
        for part in ("app", *SPLIT_PARTS):
            found[part] = round(percentile([t.get(part, 0.0) for _, t in chosen], 50), 2)
        return found

    slowest = slowest_of(pairs, key=lambda pair: pair[0], share=share)
    return {"slowest": medians(slowest), "all": medians(pairs), "count": len(slowest)}


def slowest_clusters(
    measured: Sequence[tuple[float, float]],
    timings: Sequence[Mapping[str, float]],
    *,
    gap: float,
    share: float = 0.01,
) -> dict[str, float | int | None] | None:
    """How the slowest ``share`` of the ``measured`` arrivals (scheduled
    time, latency, in seconds) group by when they were answered: each
    *cluster* is a run of them whose answers came at most ``gap`` seconds
    after the one before. The largest (the earliest of equal size): how
    many, how far apart its arrivals were scheduled and its answers came
    (ms), and the medians of its ``Server-Timing`` statements (``db``) and
    waits (None where no answer carried the header; ``timings`` runs
    beside ``measured``). None without arrivals.

    It tells a stall from a burst. Dispatches that arrived over tens of
    milliseconds at the usual pace and were all answered at once, their
    statements long and their waits in the app short, were held by
    something in the database all together; a burst's dispatches queue for
    the interpreter and the CPUs, and their waits are long."""
    if len(measured) != len(timings):
        raise ValueError("measured and timings must run side by side")
    if not measured:
        return None
    slowest = slowest_of(list(zip(measured, timings, strict=True)), key=lambda item: item[0][1], share=share)
    slowest.sort(key=lambda item: sum(item[0]))  # by when each was answered
    clusters: list[list[tuple[tuple[float, float], Mapping[str, float]]]] = [[slowest[0]]]
    for item in slowest[1:]:
        if sum(item[0]) - sum(clusters[-1][-1][0]) <= gap:
            clusters[-1].append(item)
        else:
            clusters.append([item])
    largest = max(clusters, key=len)

    def median_of(part: str) -> float | None:
        found = [timing[part] for _, timing in largest if part in timing]
        return round(percentile(found, 50), 2) if found else None

    starts = [at for (at, _), _ in largest]
    ends = [at + latency for (at, latency), _ in largest]
    return {
        "gap_ms": round(gap * 1000, 3),
        "count": len(slowest),
        "clusters": len(clusters),
        "largest": len(largest),
        "largest_started_over_ms": round((max(starts) - min(starts)) * 1000, 2),
        "largest_answered_within_ms": round((max(ends) - min(ends)) * 1000, 2),
        "largest_db_ms": median_of("db"),
        "largest_wait_ms": median_of("wait"),
    }
