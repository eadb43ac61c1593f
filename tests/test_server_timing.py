"""The Server-Timing header (core/server_timing.py): off by default, and when
on, a request's time split into its statements, its CPU and its waits."""

import time

import pytest
from django.db import connection
from django.http import HttpResponse
from django.test import RequestFactory, override_settings
from django.test.utils import CaptureQueriesContext

from bench.load.stats import server_timing_parse
from core.server_timing import ServerTimingMiddleware, server_timing_header
from tests.test_settings import load

pytestmark = pytest.mark.django_db

MIDDLEWARE_PATH = "core.server_timing.ServerTimingMiddleware"


def timed(view):
    """``view`` (request → response) behind the middleware; returns its header's metrics."""
    response = ServerTimingMiddleware(view)(RequestFactory().get("/"))
    return server_timing_parse(response["Server-Timing"]), response["Server-Timing"]


def test_statements_are_counted_and_timed_apart_from_the_rest():
    def view(request):
        with connection.cursor() as cursor:
            for _ in range(3):
                cursor.execute("SELECT 1")
        return HttpResponse("ok")

    with CaptureQueriesContext(connection) as queries:
        metrics, header = timed(view)
    assert len(queries) == 3
    assert 'desc="3 statements"' in header
    assert metrics["db"] > 0
    # The four figures add up (each is rounded to 0.01 ms).
    assert metrics["app"] == pytest.approx(metrics["db"] + metrics["cpu"] + metrics["wait"], abs=0.03)


def test_a_sleep_is_a_wait_not_cpu_nor_a_statement():
    def view(request):
        time.sleep(0.05)
        return HttpResponse("ok")

    metrics, header = timed(view)
    assert 'desc="0 statements"' in header
    assert metrics["db"] == 0
    # Slack: the sleep itself may overrun on a busy machine, and a few ms of
    # CPU around it; the wait is at least the sleep and the CPU far below it.
    assert metrics["wait"] >= 49
    assert metrics["cpu"] < 25
    assert metrics["app"] >= 50


def test_statements_of_other_threads_are_not_counted():
    """The wrapper sits on the request's own thread's connection."""
    import threading

    def other():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.close()

    def view(request):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        return HttpResponse("ok")

    _, header = timed(view)
    assert 'desc="0 statements"' in header


def test_the_app_answers_with_the_header_when_it_is_on(client):
    from django.conf import settings

    with override_settings(MIDDLEWARE=[MIDDLEWARE_PATH, *settings.MIDDLEWARE]):
        metrics = server_timing_parse(client.get("/healthz").headers.get("Server-Timing"))
    assert set(metrics) == {"app", "db", "cpu", "wait"}
    assert metrics["app"] > 0


def test_off_by_default(client):
    assert "Server-Timing" not in client.get("/healthz").headers
    settings = load()
    assert MIDDLEWARE_PATH not in settings["middleware"]


def test_on_from_the_environment_and_first():
    settings = load(KIROPOOL_SERVER_TIMING="1")
    assert settings["middleware"][0] == MIDDLEWARE_PATH


def test_the_bench_reads_what_the_header_writes_and_skips_the_rest():
    header = server_timing_header(app=0.012345, db=0.004, statements=4, cpu=0.003, wait=0.0053)
    assert server_timing_parse(header) == {"app": 12.35, "db": 4.0, "cpu": 3.0, "wait": 5.3}
    assert server_timing_parse('x;desc="no duration", y;dur=abc, z;dur=1.5') == {"z": 1.5}
    assert server_timing_parse(None) == {}
