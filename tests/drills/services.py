"""Real services a drill (or the fuzz run) starts for itself, and stops.

- ``PrivatePostgres``: a throwaway cluster made with ``initdb`` in a temp dir,
  on a spare port, listening on 127.0.0.1 only. PostgreSQL refuses to run as
  root, so as root it runs as the ``postgres`` OS user (``runuser``).
- ``PrivateRedis``: a ``redis-server`` on a spare port, no persistence.
- ``CeleryWorker``: a worker process of the project's Celery app.

Nothing here touches the machine's own PostgreSQL or Redis: a drill may stop
and restart what it started, never anything else."""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

APP_PORTS = range(8030, 8050)
PG_PORTS = range(55432, 55500)
REDIS_PORTS = range(56379, 56400)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port(ports: range) -> int:
    for port in ports:
        if port_is_free(port):
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def wait_for(predicate, *, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen | None, *, sig=signal.SIGTERM, timeout: float = 15) -> None:
    """Stop a process this module started (its own process group)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# --- PostgreSQL -------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def postgres_missing() -> str | None:
    """Why a private cluster cannot be made here, or None."""
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        return "initdb/pg_ctl not found (install PostgreSQL server binaries)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (PostgreSQL refuses to run as root)"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres OS user to run PostgreSQL as"
    return None


class PrivatePostgres:
    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port(PG_PORTS)
        self.dir = Path(tempfile.mkdtemp(prefix="kiropool-drill-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        else:
            self.as_owner = []

    def _run(self, *args, timeout: float = 120) -> None:
        subprocess.run([*self.as_owner, *map(str, args)], check=True, capture_output=True, timeout=timeout)

    def init(self) -> PrivatePostgres:
        self._run(self.bindir / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> None:
        # fsync off: nothing here survives a machine crash anyway, and a crashed
        # server process still leaves its WAL in the page cache. synchronous_commit
        # stays on: with it off, a crash-restart loses acknowledged commits, which
        # is exactly what the restart drill checks never happens.
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True, connect_timeout=5)

    def query(self, database: str, sql: str, params=None) -> list[tuple]:
        with self.connect(database) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str, template: str | None = None) -> str:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)


# --- Redis -----------------------------------------------------------------------


def redis_missing() -> str | None:
    return None if shutil.which("redis-server") else "redis-server not found (install redis-server)"


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port(REDIS_PORTS)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: not port_is_free(self.port), timeout=20, what="redis-server to listen")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        wait_for(lambda: port_is_free(self.port), timeout=20, what="redis-server to stop")

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


# --- the project's own processes ------------------------------------------------


def manage(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def django_run(env: dict[str, str], code: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh Django process; returns its stdout."""
    script = "import django\ndjango.setup()\n" + code
    result = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"django process failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


class CeleryWorker:
    def __init__(self, env: dict[str, str], tmp: Path, *, pool: str = "prefork") -> None:
        self.env = env
        self.log = tmp / "celery-worker.log"
        self.pool = pool
        self.proc: subprocess.Popen | None = None

    def start(self) -> CeleryWorker:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "celery",
                    "-A",
                    "kiropool",
                    "worker",
                    f"--pool={self.pool}",
                    "--concurrency=1",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel=INFO",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: "ready." in self.log.read_text(errors="replace"), timeout=60, what="the worker to be ready")
        return self

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)


def request(base: str, method: str, path: str, body=None, headers=None, timeout: float = 30):
    """(status, parsed JSON or None, headers) of one HTTP request; the
    headers are looked up by name in any case, as HTTP's are."""
    conn = http.client.HTTPConnection(base, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/json", **(headers or {})} if payload else dict(headers or {})
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return response.status, data, response.headers  # case-insensitive, as HTTP header names are
    finally:
        conn.close()
