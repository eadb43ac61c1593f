"""Helpers shared by the tests that start other processes against the test
database (workers, a real web server), or wait for another thread."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from django.db import connection, connections

from core.webserver import WebServer

# The secrets of every server, worker or manage.py process a test starts: with
# DEBUG off they refuse to start without them (kiropool/secrets_guard.py).
# Public, so for tests only.
PROCESS_SECRETS = {
    "SECRET_KEY": "test-only-secret-key-c5N8rW2qLx7vT0bZ4mJ9hK3sD6fG1aQ8eY5uI2oP7",
    "KIROPOOL_FERNET_KEYS": "dGVzdC1vbmx5LWZlcm5ldC1rZXktMzItYnl0ZXMtISE=",
}


# A database URL whose host refuses every connection: nobody serves port 1.
REFUSED_DATABASE_URL = "postgres://nobody@127.0.0.1:1/nothing"


def clean_env(**environment: str) -> dict[str, str]:
    """A process environment with nothing of the developer's or CI's settings:
    PATH and HOME, plus ``environment``. PYTEST_VERSION is kept so that the
    process, like this one, ignores the development secrets `make run` keeps
    in var/local-secrets.env (kiropool/settings.py)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    if "PYTEST_VERSION" in os.environ:
        env["PYTEST_VERSION"] = os.environ["PYTEST_VERSION"]
    return {**env, **environment}


def test_database_url() -> str:
    """DATABASE_URL of the PostgreSQL database this test run is using."""
    s = connection.settings_dict
    auth = quote(s["USER"] or "")
    if s["PASSWORD"]:
        auth += ":" + quote(s["PASSWORD"])
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


test_database_url.__test__ = False  # a helper, not a test


def project_env(tmp: Path, **overrides: str) -> dict[str, str]:
    """The environment of a server or worker process: the caller's, minus
    anything naming the machine's shared services, with the test secrets
    (DEBUG is off), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env.update(
        PROCESS_SECRETS,
        DJANGO_SETTINGS_MODULE="kiropool.settings",
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "prometheus"),
        STATICFILES_STORAGE="django.contrib.staticfiles.storage.StaticFilesStorage",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    (tmp / "prometheus").mkdir(parents=True, exist_ok=True)
    return env


def web_server(env: dict[str, str], tmp: Path, *, workers: int = 2, threads: int = 8) -> WebServer:
    """kiropool's own server helper, logging into ``tmp`` (access log included)."""
    return WebServer(env=env, workers=workers, threads=threads, log=tmp / "server.log", access_log=tmp / "access.log")


def until(
    condition: Callable[[], object], timeout: float = 5.0, *, what: str = "timed out", step: float = 0.001
) -> None:
    """Poll ``condition`` every ``step`` seconds until it holds; fail with
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(step)


def lock_wait_seen(seconds: float = 10) -> None:
    """Return once some backend of this test database waits for a lock (a
    statement another thread sent, queued on a row a test's own connection
    holds), or after ``seconds``: the caller then asserts its thread is
    still waiting."""
    deadline = time.monotonic() + seconds
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return
            time.sleep(0.01)


def run_queued_behind(writes: Callable, work: Callable):
    """Run ``work`` in a thread while a connection of its own holds
    ``writes`` (called with its cursor) uncommitted; once ``work``'s
    statement waits for their rows, commit them. Returns what ``work``
    returned: what it did with the database as the writes left it."""
    done: list = []

    def run() -> None:
        try:
            done.append(work())
        finally:
            connections.close_all()

    holder = connections.create_connection("default")
    try:
        holder.set_autocommit(False)
        with holder.cursor() as cursor:
            writes(cursor)
        thread = threading.Thread(target=run)
        thread.start()
        lock_wait_seen()
        assert thread.is_alive(), done  # it waits for the held rows
        holder.commit()
    finally:
        holder.close()
    thread.join(30)
    assert done, "the work raised (its traceback is above)"
    return done[0]


def lease_row_insert(cursor, *, identity_id: int, api_key_id: int | None = None) -> None:
    """An open lease on ``identity_id`` inserted as a claim inserts it, on a
    raw connection (a claim that holds its rows while another statement
    queues behind them)."""
    cursor.execute(
        "INSERT INTO routing_lease (id, api_key_id, account_name, identity_id, proxy_url, session_id, model,"
        " started_at, expires_at, waited_ms, outcome, error_message) VALUES (gen_random_uuid(), %s, 'a', %s,"
        " '', '', '', now(), now() + interval '15 minutes', 0, '', '')",
        [api_key_id, identity_id],
    )
