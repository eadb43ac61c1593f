"""/healthz, /readyz, and /metrics when the database is down."""

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.test import Client
from django.urls import URLResolver, get_resolver

from kiropool.health import readiness
from tests.support import REFUSED_DATABASE_URL, clean_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_healthz_answers_without_credentials_or_database(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def test_another_method_is_refused_in_the_error_shape(path, method):
    # The module promises JSON "errors in the one error shape", like every
    # other endpoint; Django's require_GET answers an empty text/html 405.
    # With CSRF checked as in production (the test client skips it): a
    # POST, PUT, PATCH or DELETE got the CSRF check's 403 HTML page first.
    response = Client(enforce_csrf_checks=True).generic(method, path)
    assert response.status_code == 405
    assert response["Allow"] == "GET"
    if method != "HEAD":  # a HEAD answer has no body
        message = f'Method "{method}" not allowed.'
        assert response.json() == {"error": {"type": "invalid_request_error", "message": message}}


def test_only_the_get_only_views_are_exempt_from_csrf():
    """The probes' exemption (kiropool.health.get_only) reaches no other
    view: every other view that skips Django's CSRF check is DRF's, which
    checks CSRF itself when a session logs the caller in."""
    exempt = set()

    def walk(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif getattr(pattern.callback, "csrf_exempt", False) and not hasattr(pattern.callback, "cls"):
                exempt.add(prefix + str(pattern.pattern))

    walk(get_resolver().url_patterns)
    assert exempt == {"healthz", "readyz", "metrics"}


@pytest.mark.django_db
def test_readyz_checks_database_and_broker(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


@pytest.mark.django_db
def test_readyz_names_an_unreachable_broker(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["type"] == "api_error"
    assert "broker" in body["error"]["message"] and "database" not in body["error"]["message"]
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("down")


@pytest.mark.django_db
def test_readyz_names_a_missing_filesystem_broker_folder(client, settings, tmp_path):
    settings.CELERY_BROKER_URL = "filesystem://"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
    assert client.get("/readyz").status_code == 200
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(tmp_path / "gone"),
        "data_folder_out": str(tmp_path),
    }
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("down")


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="needs REDIS_URL: checks the real Redis broker")
@pytest.mark.django_db
def test_readyz_reaches_the_real_redis_broker(client):
    assert django_settings.CELERY_BROKER_URL.startswith("redis")
    assert client.get("/readyz").json()["checks"]["broker"] == "ok"


def get_in_a_process(path: str, database_url: str, *, timeout: float, **env) -> tuple[int, str]:
    """``GET path`` in a separate process configured with ``database_url``
    (and the filesystem broker), within ``timeout`` seconds: its status and
    body."""
    probe = (
        "import django, json, sys; django.setup()\n"
        "from django.test import Client\n"
        "r = Client().get(sys.argv[1])\n"
        "print(json.dumps({'status': r.status_code, 'body': r.content.decode()}))\n"
    )
    environ = clean_env(
        DJANGO_SETTINGS_MODULE="kiropool.settings",
        DATABASE_URL=database_url,
        CELERY_BROKER_URL="filesystem://",
        **env,
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, path],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["status"], result["body"]


def test_readyz_names_an_unreachable_database():
    status, body = get_in_a_process("/readyz", REFUSED_DATABASE_URL, timeout=60)
    assert status == 503
    assert json.loads(body)["checks"] == {"database": "down (OperationalError)", "broker": "ok"}
    assert json.loads(body)["error"]["message"] == "not ready: database unreachable"


# A pool that would wait a minute for a connection, and a database host that
# never answers: the probe and the scrape still answer within the ping's own
# 2 s connect timeout. The 30 s limit on the whole process is slack for a busy
# machine (Django's start-up included); the pool's wait would pass it.


def test_readyz_answers_within_its_timeout_when_the_database_host_is_silent(silent_database_url):
    status, body = get_in_a_process("/readyz", silent_database_url, timeout=30, KIROPOOL_DB_POOL_TIMEOUT="60")
    assert status == 503
    assert json.loads(body)["checks"] == {"database": "down (ConnectionTimeout)", "broker": "ok"}


def test_a_scrape_says_the_database_is_down_within_the_pings_timeout(unreachable_database_url):
    # Refused too: the ping says so, whatever the pool would do (it fails
    # the requests waiting in it with its first attempt, core/postgresql).
    status, body = get_in_a_process("/metrics", unreachable_database_url, timeout=30, KIROPOOL_DB_POOL_TIMEOUT="60")
    assert status == 200
    assert "kiropool_database_up 0.0" in body.splitlines()
    assert "kiropool_dispatches_total" in body  # the process's own counters are still there


class CountingBroker:
    """A TCP port where a Redis broker would be, which counts the connections
    it is asked for and drops each at once (so the probe fails fast)."""

    def __init__(self):
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.getsockname()[1]}/0"

    def _serve(self):
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture
def counting_broker(settings):
    broker = CountingBroker()
    settings.CELERY_BROKER_URL = broker.url
    yield broker
    broker.close()


@pytest.mark.django_db
def test_a_burst_of_readiness_probes_costs_one_broker_connection_and_one_database_ping(
    client, counting_broker, database_pings, django_assert_num_queries
):
    single = client.get("/readyz")
    assert single.status_code == 503 and single.json()["checks"]["broker"].startswith("down")
    assert single.json()["checks"]["database"] == "ok"
    one_probe = counting_broker.connections
    assert one_probe >= 1  # the probe did go to this broker

    readiness.clear()  # the next interval
    database_pings.clear()
    # The SELECT 1 runs on Django's connection on SQLite, on the probe's own
    # on PostgreSQL: either way nothing else of the burst queries.
    orm_queries = 0 if connection.vendor == "postgresql" else 1
    with django_assert_num_queries(orm_queries):
        burst = [client.get("/readyz") for _ in range(50)]
    assert len(database_pings) == 1  # the SELECT 1, once
    assert {response.status_code for response in burst} == {503}
    assert all(response.json() == single.json() for response in burst)
    assert counting_broker.connections == 2 * one_probe  # the burst cost what one probe costs
