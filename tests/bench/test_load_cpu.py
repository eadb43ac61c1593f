"""The bench's CPU split (bench/load/cpu.py): reading /proc, telling whose
each process is, the CPU spent between two readings, and a real process's
CPU landing on its side. Linux's /proc for the last one; the rest on a
hand-made one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import cpu
from bench.load.cpu import Process, kinds, processes, spent

TICKS = os.sysconf("SC_CLK_TCK")


def stat_line(pid: int, name: str, ppid: int, utime: int, stime: int, started: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    # cutime cstime priority nice num_threads itrealvalue starttime vsize rss
    return f"{pid} ({name}) S {ppid} {pid} {pid} 0 -1 4194304 10 0 0 0 {utime} {stime} 0 0 20 0 1 0 {started} 0 0\n"


def fake_proc(tmp_path: Path, entries: list[tuple[int, str, int, int, int, int]]) -> Path:
    for pid, name, ppid, utime, stime, started in entries:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(stat_line(pid, name, ppid, utime, stime, started))
    (tmp_path / "self").mkdir()  # not a pid: skipped
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")
    (tmp_path / "77").mkdir()  # a process that ended while the directory was read: no stat
    return tmp_path


def test_processes_reads_parent_name_and_cpu_even_when_the_name_has_spaces_and_parentheses(tmp_path):
    proc = fake_proc(tmp_path, [(10, "postgres", 1, 3 * TICKS, TICKS, 500), (11, "py (x) y", 10, TICKS // 2, 0, 900)])
    found = processes(proc)
    assert found == {
        10: Process(10, 1, "postgres", 4.0, 500),
        11: Process(11, 10, "py (x) y", 0.5, 900),
    }


def test_each_process_is_the_loaded_servers_postgres_the_benchs_or_the_machines():
    table = {
        pid: Process(pid, ppid, name, 0.0, 0)
        for pid, ppid, name in [
            (1, 0, "init"),
            (100, 1, "python"),  # the bench
            (101, 100, "python"),  # its client process
            (200, 100, "python"),  # the server under load: master
            (201, 200, "python"),  # its worker
            (300, 100, "python"),  # the other server, idle
            (301, 300, "python"),
            (400, 1, "postgres"),
            (401, 400, "postgres"),
            (500, 1, "beam.smp"),
        ]
    }
    whose = kinds(table, server=200, servers=[200, 300], bench=100)
    assert whose == {
        1: "other",
        100: "clients",
        101: "clients",
        200: "server",
        201: "server",
        300: "other",
        301: "other",
        400: "postgres",
        401: "postgres",
        500: "other",
    }


def test_spent_counts_each_living_process_difference_and_a_new_ones_whole_time():
    before = {
        1: Process(1, 0, "postgres", 10.0, 100),
        2: Process(2, 0, "python", 5.0, 200),
        3: Process(3, 0, "python", 9.0, 300),
    }
    after = {
        1: Process(1, 0, "postgres", 10.75, 100),
        2: Process(2, 0, "python", 5.5, 200),  # 3 ended meanwhile: its last moments are lost, nothing negative
        4: Process(4, 0, "python", 0.25, 400),  # started within the window
        5: Process(5, 0, "sshd", 1.0, 500),  # not classified: the rest of the machine
    }
    whose = {1: "postgres", 2: "server", 4: "clients"}
    assert spent(before, after, whose) == {"server": 0.5, "postgres": 0.75, "clients": 0.25, "other": 1.0}


def test_a_reused_pid_is_another_process_and_counts_from_zero():
    before = {7: Process(7, 0, "postgres", 50.0, 100)}
    after = {7: Process(7, 0, "postgres", 0.2, 9000)}  # the same name, started later: another process
    assert spent(before, after, {7: "postgres"})["postgres"] == 0.2


def test_a_process_that_renames_itself_is_still_the_same_one():
    # A kernel worker's name carries the work it is doing ("kworker/1:1-events"
    # then "kworker/1:1-mm_percpu_wq"): only what it spent in between counts,
    # not the minutes it has run since the boot.
    before = {43: Process(43, 2, "kworker/1:1-events", 74.0, 12)}
    after = {43: Process(43, 2, "kworker/1:1-mm_percpu_wq", 74.01, 12)}
    assert spent(before, after, {43: "other"})["other"] == 0.01


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux's /proc")
def test_a_real_servers_cpu_is_counted_on_its_side():
    # The "server": a child process that burns 0.3 s of its own CPU once told
    # to, then waits. CPU time, not wall time: a busy machine only makes it
    # take longer. The 0.3 s count from the "go", not from the process's
    # start: the interpreter's own start-up is spent before the first reading.
    burn = (
        "import sys, time\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "start = time.process_time()\n"
        "while time.process_time() - start < 0.3: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    server = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n"
        before = processes()
        server.stdin.write("go\n")
        server.stdin.flush()
        assert server.stdout.readline() == "done\n"
        after = processes()
    finally:
        server.stdin.close()
        server.wait(10)
    whose = kinds(after, server=server.pid, servers=[server.pid], bench=os.getpid())
    assert whose[server.pid] == "server" and whose[os.getpid()] == "clients"
    split = spent(before, after, whose)
    # At least the 0.3 s it burned, less a clock tick of rounding at each end.
    assert split["server"] >= 0.3 - 2 / TICKS


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux's /proc")
def test_a_watch_counts_what_was_spent_inside_its_window():
    # This process plays the server and burns 0.1 s of CPU inside a 2 s
    # window: twenty times the wall time it needs on an idle core.
    meter = cpu.Meter(server=os.getpid(), servers=(os.getpid(),), bench=os.getpid())
    begin = time.monotonic() + 0.1
    watch = meter.watch((begin, begin + 2.0))
    time.sleep(0.3)  # well inside the window: the first reading is taken
    start = time.process_time()
    while time.process_time() - start < 0.1:
        pass
    result = watch.result()
    assert time.monotonic() >= begin + 2.0  # it read again at the window's end
    assert set(result) == set(cpu.KINDS)
    # Scaled to the window (this reading thread may wake late at its end),
    # so half of it at least, even if the reading came a second late.
    assert result["server"] >= 0.05


def test_a_late_reading_is_scaled_back_to_the_window():
    # Read 2.5 s apart for a 2 s window: four fifths of what was spent.
    assert cpu.scaled({"server": 1.0, "postgres": 0.5}, window_s=2.0, read_s=2.5) == {"server": 0.8, "postgres": 0.4}
    assert cpu.scaled({"server": 1.0}, window_s=2.0, read_s=0.0) == {"server": 1.0}


def test_no_meter_for_a_server_that_was_not_started():
    class NotStarted:
        process = None

    assert cpu.Meter.of(NotStarted(), [NotStarted()]) is None
