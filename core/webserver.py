"""The one way kiropool starts its web app as a child process:
``python -m kiropool.serve`` (granian, ``kiropool/serve.py``) on a given or
spare port (or, for a reference server such as the benchmark's floor, another
WSGI app under gunicorn with its own config file).

``make demo``, ``make bench`` and the tests that need a real server (fuzzing,
drills, the Python client, bounded waiting) all use :class:`WebServer`, so a
change to how kiropool is served is made, and tested, in one place."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# An access log line, kiropool's (kiropool/serve.py) or gunicorn's default:
# host - user [time] "request line" status ...
ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(?:[^"\\]|\\.)*" (\d{3}) ', re.MULTILINE)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host.strip("[]") or "127.0.0.1", port)) == 0


class WebServerError(RuntimeError):
    pass


class WebServer:
    """kiropool's server (``kiropool/serve.py``), or another WSGI app under
    gunicorn, in its own process group.

    ``env`` is the child's whole environment (default: this process's);
    ``workers`` / ``threads`` override ``WEB_CONCURRENCY`` / ``KIROPOOL_THREADS``,
    which ``kiropool/serve.py`` reads. ``app`` and ``config`` (relative to the
    project) serve another WSGI app under gunicorn with that config file
    instead. The app must answer ``GET /healthz`` with 200. Output goes to
    ``log`` (or is inherited), and with ``access_log`` every request is
    logged there, for :meth:`statuses` (``KIROPOOL_ACCESS_LOG``)."""

    def __init__(
        self,
        *,
        bind: str | None = None,
        env: dict[str, str] | None = None,
        workers: int | None = None,
        threads: int | None = None,
        log: Path | None = None,
        access_log: Path | None = None,
        app: str | None = None,
        config: str | None = None,
    ) -> None:
        self.bind = bind or f"127.0.0.1:{free_port()}"
        self.app = app
        self.config = config
        self.log = log
        self.access_log = access_log
        self.env = dict(os.environ if env is None else env)
        self.env["KIROPOOL_BIND"] = self.bind
        self.workers = workers
        if workers is not None:
            self.env["WEB_CONCURRENCY"] = str(workers)
        if threads is not None:
            self.env["KIROPOOL_THREADS"] = str(threads)
        if access_log is not None:
            self.env["KIROPOOL_ACCESS_LOG"] = str(access_log)
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return self.bind.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])

    @property
    def url(self) -> str:
        return f"http://{self.bind}"

    def start(self, *, timeout: float = 60) -> WebServer:
        """Start the server and return once ``/healthz`` answers and, when
        ``workers`` was given, that many workers were forked: the first
        worker may answer before the others are up."""
        if port_in_use(self.host, self.port):
            raise WebServerError(f"something already listens on {self.bind}")
        output = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            output = self.log.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(),
                cwd=BASE_DIR,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                # Its own process group: a Ctrl-C meant for the caller does not
                # reach the workers first, and stop() takes down the whole group.
                start_new_session=True,
            )
        finally:
            if output is not None:
                output.close()
        deadline = time.monotonic() + timeout
        while not (self._healthy() and self._forked()):
            if not self.alive():
                raise WebServerError(f"the web server exited with {self.process.returncode}{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise WebServerError(
                    f"the web server did not answer /healthz with its workers forked within {timeout:.0f} s"
                    f"{self._log_tail()}"
                )
            time.sleep(0.2)
        return self

    def command(self) -> list[str]:
        if self.app is None:
            return [sys.executable, "-m", "kiropool.serve"]  # listens on KIROPOOL_BIND
        return [sys.executable, "-m", "gunicorn", "-c", self.config or "/dev/null", "--bind", self.bind, self.app]

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False

    def _log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return ":\n" + self.log.read_text(errors="replace")[-4000:]

    def worker_pids(self) -> list[int] | None:
        """The master's children, sorted; None where ``/proc`` does not list
        them (not Linux)."""
        if self.process is None:
            return []
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return sorted(int(pid) for pid in path.read_text().split())
        except OSError:
            return None

    def _forked(self) -> bool:
        pids = self.worker_pids()
        return pids is None or len(pids) >= (self.workers or 0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, timeout: float = 40) -> None:
        """SIGTERM to the group (a graceful stop), SIGKILL after ``timeout``."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def statuses(self) -> list[int]:
        """Status codes of the requests in the access log."""
        if self.access_log is None or not self.access_log.exists():
            return []
        return [int(code) for code in ACCESS_LINE.findall(self.access_log.read_text(errors="replace"))]

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
