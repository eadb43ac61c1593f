"""The servers `make bench` measures, all started by kiropool's one helper,
:class:`core.webserver.WebServer`, and the optional py-spy profile of one
of their workers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from core.webserver import WebServer


def kiropool_server(env: dict[str, str], *, workers: int, log: Path) -> WebServer:
    """kiropool as deployed: ``kiropool/serve.py`` (granian, its threads),
    ``workers`` processes."""
    return WebServer(env={**env, "DJANGO_SETTINGS_MODULE": "kiropool.settings"}, workers=workers, log=log)


def floor_server(env: dict[str, str], *, workers: int, log: Path) -> WebServer:
    """The floor of issue 14: its own minimal project and gunicorn config
    (``bench/floor``, sync workers), ``workers`` processes like kiropool."""
    return WebServer(
        env={**env, "DJANGO_SETTINGS_MODULE": "bench.floor.settings"},
        workers=workers,
        app="bench.floor.wsgi:application",
        config="bench/floor/gunicorn.conf.py",
        log=log,
    )


def worker_pids(master: int) -> list[int]:
    """The server master's child processes, its workers (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces or parentheses: the ppid follows the last ")".
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == master:
            children.append(int(entry.name))
    return sorted(children)


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_start(server: WebServer, *, seconds: float, output: Path) -> subprocess.Popen:
    """Sample one worker of ``server`` for ``seconds`` into a flame graph (SVG).
    ``--nonblocking``: the worker is never paused, so the figures it serves
    are only slowed by the sampler's own CPU use."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed: make install (requirements-dev.txt pins it)")
    workers = worker_pids(server.process.pid)
    if not workers:
        raise RuntimeError("no web worker found to profile")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [binary, "record", "--pid", str(workers[0]), "--duration", str(max(1, round(seconds)))]
    command += ["--nonblocking", "--format", "flamegraph", "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
