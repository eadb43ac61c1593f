"""Where a load's CPU goes: every process's CPU time read from ``/proc`` at
the start and at the end of the load's measured window, summed by whose it
is (the web server under load, PostgreSQL, the bench's own clients, the
rest of the machine). Per request, beside the floor's, it shows what a
kiropool request costs the machine and which side pays for it.

Linux only: where ``/proc`` has no process entries a window measures
nothing (``None``), and the report shows no split."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
KINDS = ("server", "postgres", "clients", "other")
POSTGRES = "postgres"  # the name (comm) of the postmaster and of every backend and helper


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    ppid: int
    name: str
    cpu_s: float  # user + system, since the process started
    started: int  # clock ticks after boot: with the pid, which process this is


def processes(proc: Path = PROC) -> dict[int, Process]:
    """Every process's parent, name and CPU seconds so far, by pid."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone since the directory was listed
        # "pid (name) state ppid ...": the name may hold spaces and parentheses.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, utime, stime, started = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[19])
        found[int(entry.name)] = Process(int(entry.name), ppid, name, (utime + stime) / ticks, started)
    return found


def kinds(table: Mapping[int, Process], *, server: int, servers: Iterable[int], bench: int) -> dict[int, str]:
    """Whose each process is: under ``server`` (the one under load),
    PostgreSQL's (by name), under ``bench`` but under none of ``servers``
    (the bench and its client processes), or the rest of the machine
    (``other``, idle servers included)."""
    children: dict[int, list[int]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process.pid)

    def tree(root: int) -> set[int]:
        found, todo = set(), [root]
        while todo:
            pid = todo.pop()
            if pid in table and pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, ()))
        return found

    loaded = tree(server)
    idle = set().union(*(tree(pid) for pid in servers if pid != server)) - loaded
    clients = tree(bench) - loaded - idle
    whose = {}
    for pid, process in table.items():
        if pid in loaded:
            whose[pid] = "server"
        elif process.name == POSTGRES:
            whose[pid] = "postgres"
        elif pid in clients:
            whose[pid] = "clients"
        else:
            whose[pid] = "other"
    return whose


def spent(before: Mapping[int, Process], after: Mapping[int, Process], whose: Mapping[int, str]) -> dict[str, float]:
    """CPU seconds each kind spent between two readings: a process alive at
    both counts its difference, one started in between all of its time; one
    that ended in between is not counted (its last moments are lost)."""
    totals = dict.fromkeys(KINDS, 0.0)
    for pid, process in after.items():
        earlier = before.get(pid)
        if earlier is not None and earlier.started != process.started:
            earlier = None  # the pid was reused: another process (a name can change: kernel workers rename themselves)
        totals[whose.get(pid, "other")] += process.cpu_s - (earlier.cpu_s if earlier else 0.0)
    return {kind: round(max(0.0, seconds), 3) for kind, seconds in totals.items()}


def scaled(spent_s: Mapping[str, float], *, window_s: float, read_s: float) -> dict[str, float]:
    """What was spent between two readings ``read_s`` apart, as the
    ``window_s`` of the load would have spent at the same rate: the
    requests are counted over the window, and the readings never fall
    exactly on its ends (the thread wakes late, and a scan takes a few
    milliseconds). Under the closed loop they came 7-28 ms after the
    window's start and 2-5 ms after its end, a correction under 1 % of a
    5 s window."""
    scale = window_s / read_s if read_s > 0 else 1.0
    return {kind: round(seconds * scale, 3) for kind, seconds in spent_s.items()}


@dataclass(frozen=True)
class Meter:
    """Measures windows of load on the server whose master process is
    ``server``; ``servers`` are every server the bench started (the idle
    ones count as ``other``)."""

    server: int
    servers: tuple[int, ...]
    bench: int
    proc: Path = PROC

    @classmethod
    def of(cls, server, servers: Iterable) -> Meter | None:
        """For ``core.webserver.WebServer``s; None without ``/proc`` or a started server."""
        pids = [s.process.pid for s in servers if getattr(s, "process", None) is not None]
        if getattr(server, "process", None) is None or not any(PROC.glob("[0-9]*/stat")):
            return None
        return cls(server.process.pid, tuple(pids), os.getpid())

    def watch(self, window: tuple[float, float]) -> Watch:
        """Start watching ``window`` (``time.monotonic()`` seconds, begin and end)."""
        return Watch(self, window)


class Watch:
    """One window being measured, in a thread that sleeps until each of its
    ends: :meth:`result` waits for the end and gives the CPU seconds by kind."""

    def __init__(self, meter: Meter, window: tuple[float, float]) -> None:
        self.meter, self.window = meter, window
        self._spent: dict[str, float] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        begin, end = self.window
        time.sleep(max(0.0, begin - time.monotonic()))
        before, read_at = self._read()
        time.sleep(max(0.0, end - time.monotonic()))
        after, read_again_at = self._read()
        whose = kinds(after, server=self.meter.server, servers=self.meter.servers, bench=self.meter.bench)
        self._spent = scaled(spent(before, after, whose), window_s=end - begin, read_s=read_again_at - read_at)

    def _read(self) -> tuple[dict[int, Process], float]:
        """Every process, and when (the middle of the scan, which takes a while)."""
        started = time.monotonic()
        table = processes(self.meter.proc)
        return table, (started + time.monotonic()) / 2

    def result(self) -> dict[str, float] | None:
        self._thread.join()
        return self._spent
