"""A database the connection pool cannot reach: requests answer 503 at once
instead of each waiting the pool's timeout for a connection it cannot open
(core/postgresql). The pool's return once the database is back is the
PostgreSQL-outage drill's (tests/drills)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from core.postgresql.outage import WatchedConnection, outage
from tests.drills.services import request
from tests.support import REFUSED_DATABASE_URL, project_env, test_database_url, web_server


@pytest.fixture
def outage_restored():
    """This process's record of the pool's attempts, as it was: the tests'
    own pooled connections go through the same record."""
    since = outage.since
    yield outage
    outage.since = since


def test_a_failed_connection_attempt_marks_the_pool_down_until_one_succeeds(outage_restored, postgres_only):
    outage.connected()
    with pytest.raises(psycopg.OperationalError):
        WatchedConnection.connect(REFUSED_DATABASE_URL, connect_timeout=2)
    assert outage.down
    first = outage.since
    with pytest.raises(psycopg.OperationalError):
        WatchedConnection.connect(REFUSED_DATABASE_URL, connect_timeout=2)
    assert outage.since == first  # down since the first failure, not the latest
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
        # The first request opens the pool and waits for it: nothing has failed yet.
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
