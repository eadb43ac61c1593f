"""Waiting dispatches never starve the server (issue 11 §3), on a real
gunicorn and PostgreSQL: with more dispatches waiting on one full identity
than a process admits, the surplus is refused at once, a completion and
/healthz still answer promptly, and the waiters are served in the order they
came as slots free.

`make bench` measures the same with 96 waiters and two workers against the
1 s target; here one worker makes the order exact, and the timing slack is
for a busy 2-core machine."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from tests.drills.services import request
from tests.factories import AccountFactory, ApiKeyFactory
from tests.support import project_env, test_database_url, web_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only")]

THREADS, RESERVE, PER_KEY = 12, 4, 6  # so 6 may wait for one key, 8 in all
WAITERS = 10


def test_waiters_are_bounded_and_served_in_arrival_order(tmp_path):
    AccountFactory(name="only", identity__max_concurrency=1)
    key = ApiKeyFactory()
    auth = {"Authorization": f"Bearer {key.plaintext}"}
    env = project_env(
        tmp_path,
        DATABASE_URL=test_database_url(),
        KIROPOOL_WAIT_RESERVE_THREADS=str(RESERVE),
        KIROPOOL_MAX_WAITERS_PER_KEY=str(PER_KEY),
        # Fewer database connections than waiters: a waiter hands its
        # connection back while it waits, or the completion below would wait
        # for one.
        KIROPOOL_DB_POOL_SIZE="2",
        KIROPOOL_DB_POOL_TIMEOUT="20",
    )
    connection.close()  # the server's connections see the rows committed above
    server = web_server(env, tmp_path, workers=1, threads=THREADS).start()
    answers: dict[int, tuple[int, float]] = {}
    granted: list[int] = []
    lock = threading.Lock()

    def waiter(n: int) -> None:
        status, body, _ = request(server.bind, "POST", "/api/v1/dispatch", {"max_wait_ms": 60_000}, auth, 90)
        with lock:
            answers[n] = (status, time.monotonic())
            if status == 200:
                granted.append(n)
        if status == 200:
            # Hold it, then release: the next waiter's turn. Held long enough
            # for every other waiter's failed attempt after the last release to
            # end first (a few ms each, tens under a CPU hog; 0.05 s was
            # sometimes too short): a younger waiter still in its attempt when
            # the slot frees takes it, the one race the order cannot cover.
            time.sleep(0.5)
            request(server.bind, "POST", f"/api/v1/leases/{body['lease_id']}/complete", {"outcome": "success"}, auth)

    try:
        status, held, _ = request(server.bind, "POST", "/api/v1/dispatch", {"max_wait_ms": 0}, auth)
        assert status == 200
        threads = []
        for n in range(WAITERS):
            thread = threading.Thread(target=waiter, args=(n,))
            thread.start()
            threads.append(thread)
            time.sleep(0.1)  # arrival order is the order they were sent in
        # The surplus was refused at once, while the slot is still held.
        refused = [n for n, (status, _) in answers.items() if status == 429]
        assert len(refused) == WAITERS - PER_KEY, answers

        started = time.monotonic()
        healthz = request(server.bind, "GET", "/healthz")[0]
        healthz_took = time.monotonic() - started
        started = time.monotonic()
        done = request(server.bind, "POST", f"/api/v1/leases/{held['lease_id']}/complete", {"outcome": "success"}, auth)
        completion_took = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=120)
    finally:
        server.stop()

    # Answered while six dispatches held their threads waiting: the target is
    # 1 s (make bench); slack to 3 s for a busy machine.
    assert healthz == 200 and healthz_took < 3.0
    assert done[0] == 200 and completion_took < 3.0
    waited = [n for n in range(WAITERS) if n not in refused]
    assert sorted(granted) == waited  # every admitted waiter got the slot in the end ...
    assert granted == waited  # ... in the order they came
