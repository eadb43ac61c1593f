"""A database the connection pool cannot reach: requests answer 503 at once
instead of each waiting the pool's timeout for a connection it cannot open
(core/postgresql). The pool's return once the database is back is the
PostgreSQL-outage drill's (tests/drills)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from core.postgresql.outage import WatchedConnection, outage, pool_waiters_fail
from tests.drills.services import request
from tests.support import REFUSED_DATABASE_URL, project_env, test_database_url, until, web_server


@pytest.fixture
def test_database(postgres_only, db):
    """The run's test database, for the tests that connect to it by
    themselves: pytest-django creates it only when a test of the run asks
    for the ORM (``db``), and this file run alone would otherwise connect to
    the database DATABASE_URL names, which need not exist."""


@pytest.fixture
def outage_restored():
    """This process's record of the pool's attempts, as it was: the tests'
    own pooled connections go through the same record."""
    down = outage.down
    yield outage
    outage.down = down


def test_a_failed_connection_attempt_marks_the_pool_down_until_one_succeeds(outage_restored, test_database):
    outage.connected()
    with pytest.raises(psycopg.OperationalError):
        WatchedConnection.connect(REFUSED_DATABASE_URL, connect_timeout=2)
    assert outage.down
    with WatchedConnection.connect(test_database_url(), connect_timeout=5):
        assert not outage.down


# One worker of 4 threads and a pool that waits 3 s: waiting out the pool's
# timeout, 40 dispatches would take 40 × 3 s / 4 threads = 30 s. Answered at
# once they take well under a second; 10 s is slack for a busy machine. A
# silent host fails a connection attempt after 2 s (libpq's least), within
# the first request's wait.
BURST = 40
BURST_LIMIT_SECONDS = 10


def test_a_server_whose_database_is_unreachable_answers_at_once(tmp_path, unreachable_database_url):
    env = project_env(
        tmp_path,
        DATABASE_URL=unreachable_database_url,
        KIROPOOL_DB_POOL_TIMEOUT="3",
        KIROPOOL_DB_CONNECT_TIMEOUT="2",
    )
    auth = {"Authorization": "Bearer kp_live_" + "a" * 32}
    with web_server(env, tmp_path, workers=1, threads=4) as server:
        # The first request opens the pool and waits for it until its first
        # attempt fails (test_requests_waiting_when_an_attempt_fails_answer_with_it).
        status, body, headers = request(server.bind, "POST", "/api/v1/dispatch", {}, auth, 30)
        assert status == 503 and body["error"]["type"] == "api_error"

        answers: list[tuple[int, dict, str | None]] = []

        def dispatch() -> None:
            status, body, headers = request(server.bind, "POST", "/api/v1/dispatch", {}, auth, 60)
            answers.append((status, body, headers.get("Retry-After")))

        started = time.monotonic()
        burst = [threading.Thread(target=dispatch) for _ in range(BURST)]
        for thread in burst:
            thread.start()
        health, _, _ = request(server.bind, "GET", "/healthz", None, None, 60)
        for thread in burst:
            thread.join(60)
        elapsed = time.monotonic() - started

    assert health == 200
    assert elapsed < BURST_LIMIT_SECONDS, f"{BURST} dispatches took {elapsed:.1f} s"
    assert len(answers) == BURST
    assert {(status, retry) for status, _, retry in answers} == {(503, "1")}
    assert all(body["error"]["type"] == "api_error" for _, body, _ in answers)


def test_the_requests_waiting_in_a_pool_can_be_failed(test_database):
    """psycopg_pool's internals that :func:`pool_waiters_fail` relies on
    (it has no public way): a client waiting for a connection gets the error
    at once, and the pool serves on."""
    with ConnectionPool(test_database_url(), min_size=1, max_size=1, timeout=20) as pool:
        taken = pool.getconn()
        failed: list[tuple[BaseException, float]] = []

        def wait_for_a_connection() -> None:
            started = time.monotonic()
            try:
                pool.getconn()
            except psycopg.OperationalError as error:
                failed.append((error, time.monotonic() - started))

        waiter = threading.Thread(target=wait_for_a_connection)
        waiter.start()
        until(lambda: pool.get_stats().get("requests_waiting") == 1, 10, what="the waiter never queued")
        pool_waiters_fail(pool, "gone")
        waiter.join(10)
        pool.putconn(taken)
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    [(error, waited)] = failed
    assert str(error) == "gone" and waited < 10  # not the pool's 20 s


# Requests already waiting in the pool when its first attempt to connect
# fails: they waited out the pool's timeout (the default 10 s here: every
# one of them took 10 s, checked), and now fail with the attempt, a silent
# host's after 2 s (libpq's least), a refused one's at once. 5 s is slack
# for a busy machine.
FIRST_WAVE = 8
FIRST_WAVE_LIMIT_SECONDS = 5


def test_requests_waiting_when_an_attempt_fails_answer_with_it(tmp_path, unreachable_database_url):
    env = project_env(tmp_path, DATABASE_URL=unreachable_database_url, KIROPOOL_DB_CONNECT_TIMEOUT="2")
    auth = {"Authorization": "Bearer kp_live_" + "a" * 32}
    with web_server(env, tmp_path, workers=1, threads=4) as server:
        answers: list[tuple[int, str | None, float]] = []

        def dispatch() -> None:
            started = time.monotonic()
            status, _, headers = request(server.bind, "POST", "/api/v1/dispatch", {}, auth, 60)
            answers.append((status, headers.get("Retry-After"), time.monotonic() - started))

        wave = [threading.Thread(target=dispatch) for _ in range(FIRST_WAVE)]
        for thread in wave:
            thread.start()
        for thread in wave:
            thread.join(60)

    slowest = max(seconds for *_, seconds in answers)
    assert len(answers) == FIRST_WAVE
    assert {(status, retry) for status, retry, _ in answers} == {(503, "1")}
    assert slowest < FIRST_WAVE_LIMIT_SECONDS, [round(seconds, 2) for *_, seconds in answers]
