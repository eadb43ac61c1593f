"""The web server (kiropool/serve.py, kiropool/wsgi.py): granian serving
kiropool's WSGI app as deployed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import granian.wsgi
import pytest
from django.db import connection

from kiropool import serve
from tests.drills.services import request
from tests.factories import AccountFactory, ApiKeyFactory
from tests.support import project_env, test_database_url, web_server

# Concurrent clients, each sending requests one after another on new connections.
CLIENTS = 4
REQUESTS_EACH = 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_every_request_gives_its_pooled_connection_back(tmp_path):
    """One pooled connection for eight threads: a thread that kept it after
    its request (a response closed in another thread than the one that ran
    the view keeps it: Django gives it back on ``request_finished``) would
    leave the others to wait out the pool's timeout and answer 503."""
    AccountFactory(name="a")
    key = ApiKeyFactory(name="gateway")
    auth = {"Authorization": f"Bearer {key.plaintext}"}
    env = project_env(
        tmp_path, DATABASE_URL=test_database_url(), KIROPOOL_DB_POOL_SIZE="1", KIROPOOL_DB_POOL_TIMEOUT="5"
    )
    connection.close()  # the server's connections see the rows committed above
    statuses: list[int] = []

    def client() -> None:
        for _ in range(REQUESTS_EACH):
            statuses.append(request(server.bind, "POST", "/api/v1/dispatch/explain", {}, auth)[0])

    with web_server(env, tmp_path, workers=1, threads=8) as server:
        clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()

    assert statuses == [200] * (CLIENTS * REQUESTS_EACH)


class _Protocol:
    """What granian's Rust side hands the WSGI runner: where the response goes."""

    def response_bytes(self, status, headers, body) -> None:
        self.status = status


def _request_environ() -> dict:
    """The WSGI environ granian's own runner builds for a request."""
    seen: dict = {}

    def app(environ, start_response):
        seen.update(environ)
        start_response("200 OK", [])
        return [b""]

    granian.wsgi._callback_wrapper(app, {})(_Protocol(), {"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz"})
    return seen


def test_the_servers_secrets_stay_out_of_every_requests_environ(monkeypatch):
    secrets = {
        "SECRET_KEY": "s" * 50,
        "KIROPOOL_FERNET_KEYS": "fernet",
        "DATABASE_URL": "postgres://kiropool:password@db/kiropool",
        "REDIS_URL": "redis://:password@cache:6379/0",
        "UPSTREAM_API_TOKEN": "token",
    }
    monkeypatch.setattr(os, "environ", {"PATH": "/usr/bin", "KIROPOOL_THREADS": "8", **secrets})
    # What the attack would read: granian puts the process environment in request.META.
    assert secrets.items() <= _request_environ().items()

    assert sorted(serve.environment_scrub(os.environ)) == sorted(secrets)

    meta = _request_environ()
    assert not set(secrets) & set(meta)
    assert meta["PATH"] == "/usr/bin" and meta["KIROPOOL_THREADS"] == "8" and meta["PATH_INFO"] == "/healthz"


@pytest.mark.parametrize(
    ("bind", "parsed"),
    [("127.0.0.1:8000", ("127.0.0.1", 8000)), ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:8080", ("::1", 8080))],
)
def test_a_bind_is_host_and_port(bind, parsed):
    assert serve.bind_parse(bind) == parsed


@pytest.mark.parametrize(
    "bind", ["8000", "localhost", ":8000", "localhost:http", "unix:/tmp/kiropool.sock", "localhost:-1", "localhost:80²"]
)
def test_a_bind_without_host_and_port_is_refused_with_its_value(bind):
    with pytest.raises(SystemExit, match="KIROPOOL_BIND must be host:port"):
        serve.bind_parse(bind)


@pytest.mark.parametrize("bind", ["127.0.0.1:65536", "127.0.0.1:70000", "[::1]:99999999999", "0.0.0.0:0"])
def test_a_bind_with_a_port_out_of_range_is_refused_with_its_value(bind):
    with pytest.raises(SystemExit, match=re.escape(f"with a port of 1 to 65535, not {bind!r}")):
        serve.bind_parse(bind)


def test_the_ports_at_either_end_of_the_range_are_taken():
    assert serve.bind_parse("127.0.0.1:1") == ("127.0.0.1", 1)
    assert serve.bind_parse("127.0.0.1:65535") == ("127.0.0.1", 65535)


def test_worker_and_thread_counts_are_whole_numbers_of_at_least_one(monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    assert serve.count_read("WEB_CONCURRENCY", 2) == 4
    monkeypatch.delenv("WEB_CONCURRENCY")
    assert serve.count_read("WEB_CONCURRENCY", 2) == 2
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("KIROPOOL_THREADS", bad)
        with pytest.raises(SystemExit, match=f"KIROPOOL_THREADS must be a whole number of at least 1, not '{bad}'"):
            serve.count_read("KIROPOOL_THREADS", 32)


# The launcher run to the point where granian would start serving: the
# server class records what it was given instead (the launcher's choices are
# under test here, not granian).
LAUNCH_RECORDED = """
import json, granian
class Recorded:
    def __init__(self, target, **options):
        self.options = options
    def serve(self):
        from django.conf import settings
        print(json.dumps({"threads": self.options["blocking_threads"], "workers": self.options["workers"],
                          "settings_threads": settings.KIROPOOL_THREADS,
                          "max_waiters": settings.KIROPOOL_MAX_WAITERS}))
granian.Granian = Recorded
from kiropool import serve
serve.main()
"""


def _launched(tmp_path, **overrides: str) -> dict:
    env = project_env(tmp_path, **overrides)
    for name in ("KIROPOOL_THREADS", "WEB_CONCURRENCY", "KIROPOOL_MAX_WAITERS"):
        if name not in overrides:
            env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH_RECORDED], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_server_runs_the_threads_the_waiters_cap_was_sized_for(tmp_path):
    """A waiting dispatch holds a thread; the cap on waiters leaves a reserve
    of threads for completions only if the server runs as many threads as
    the settings assumed, by default too."""
    launched = _launched(tmp_path)
    assert launched["threads"] == launched["settings_threads"]
    assert launched["max_waiters"] < launched["threads"]
    assert launched["workers"] == 2

    launched = _launched(tmp_path, KIROPOOL_THREADS="12", WEB_CONCURRENCY="3")
    assert (launched["threads"], launched["settings_threads"], launched["workers"]) == (12, 12, 3)
    assert launched["max_waiters"] < launched["threads"]


# The launcher run to the point where granian would fork its workers: what a
# worker's database connections would be opened with, the settings'
# parameters and, for what they leave out, libpq's rule: the variables of the
# process environment, which the launcher has scrubbed by then.
LAUNCH_CONNECTIONS = """
import json, os, granian
from psycopg import pq
NAMES = ("password", "passfile", "sslkey")
class Recorded:
    def __init__(self, target, **options):
        pass
    def serve(self):
        from django.db import connection
        from core import listener
        defaults = pq.Conninfo.get_defaults()
        environment = {option.keyword.decode(): option.val.decode() for option in defaults if option.val}
        def effective(params):
            return {name: params.get(name) or environment.get(name) for name in NAMES}
        print(json.dumps({"app": effective(connection.get_connection_params()),
                          "listener": effective(listener._connection_params()),
                          "environ": sorted(name for name in os.environ if name.startswith("PG"))}))
granian.Granian = Recorded
from kiropool import serve
serve.main()
"""


def test_the_workers_connect_with_libpqs_own_secrets_the_launcher_scrubbed(tmp_path):
    """A password (or the file holding one, or the client certificate's key)
    given the libpq way, PGPASSWORD / PGPASSFILE / PGSSLKEY beside a
    DATABASE_URL without one. Their names match the secrets the launcher
    removes from its environment before granian copies it into every
    request (above), and libpq reads them at each connection, in the workers,
    after that: every connection a worker opened went without them, and every
    request answered 503."""
    libpq = {
        "PGPASSWORD": "db-password",
        "PGPASSFILE": str(tmp_path / "pgpass"),
        "PGSSLKEY": str(tmp_path / "client.key"),
    }
    env = project_env(tmp_path, DATABASE_URL="postgres://kiropool@127.0.0.1:1/kiropool", **libpq)
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH_CONNECTIONS], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    launched = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {"password": "db-password", "passfile": libpq["PGPASSFILE"], "sslkey": libpq["PGSSLKEY"]}
    assert launched["app"] == expected
    assert launched["listener"] == expected
    assert not set(libpq) & set(launched["environ"])  # still out of every request's environ

    # The URL's own password wins, as it does over PGPASSWORD in libpq.
    env["DATABASE_URL"] = "postgres://kiropool:url-password@127.0.0.1:1/kiropool"
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH_CONNECTIONS], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["app"]["password"] == "url-password"
