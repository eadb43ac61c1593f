"""A web worker's PostgreSQL connections (kiropool/settings.py, the "pool"
option): it opens its whole pool with its first query, not one connection at
a time under the first burst, and however many requests it serves at once it
never holds more than KIROPOOL_DB_POOL_SIZE.

`make bench` measured why both matter on the 2-core machine: with 10
connections per worker, a server started under the open loop spent seconds
opening and warming PostgreSQL backends, and the first phase never caught up
(p50 over 1 s); with 3 it served from its first second."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from tests.drills.services import request, wait_for
from tests.factories import AccountFactory, ApiKeyFactory
from tests.support import project_env, test_database_url, web_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only")]

POOL_SIZE = 3
APPLICATION = "kiropool-pool-test"
OPEN_WITHIN_SECONDS = 15.0  # the pool opens in the background; slack for a busy 2-core machine


def _server_connections() -> int:
    # The pool's connections: the wake-up listener's own connection
    # (routing/wakeups.py) does not take the application name.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            [APPLICATION],
        )
        return cursor.fetchone()[0]


def test_a_worker_opens_its_whole_pool_at_once_and_never_more(tmp_path):
    AccountFactory(name="a", identity__max_concurrency=64)
    key = ApiKeyFactory()
    auth = {"Authorization": f"Bearer {key.plaintext}"}
    env = project_env(
        tmp_path,
        DATABASE_URL=f"{test_database_url()}?application_name={APPLICATION}",
        KIROPOOL_DB_POOL_SIZE=str(POOL_SIZE),
    )
    connection.close()  # the server's connections see the rows committed above
    with web_server(env, tmp_path, workers=1, threads=16) as server:
        assert _server_connections() == 0  # a worker starts without touching the database
        status, body, _ = request(server.bind, "POST", "/api/v1/dispatch", {}, auth)
        assert status == 200, body
        # One request, yet every pooled connection opens.
        wait_for(
            lambda: _server_connections() == POOL_SIZE,
            timeout=OPEN_WITHIN_SECONDS,
            what=f"all {POOL_SIZE} pooled connections open",
        )

        # Sixteen at once: they share the pool, nothing opens beside it.
        statuses: list[int] = []
        most = 0

        def dispatch() -> None:
            answer, _, _ = request(server.bind, "POST", "/api/v1/dispatch", {}, auth)
            statuses.append(answer)

        threads = [threading.Thread(target=dispatch) for _ in range(16)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            most = max(most, _server_connections())
            time.sleep(0.01)
        assert statuses == [200] * 16
        assert most == POOL_SIZE
        assert _server_connections() == POOL_SIZE
