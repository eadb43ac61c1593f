"""Waiting dispatches never starve the server (issue 11 §3), on a real
web server and PostgreSQL: with more dispatches waiting on one full identity
than a process admits, the surplus is refused at once, a completion and
/healthz still answer promptly, and the waiters are served in the order they
came as slots free.

`make bench` measures the same with 96 waiters and two workers against the
1 s target; here one worker makes the order exact, and the timing slack is
for a busy 2-core machine. Across two workers the order holds through the
wait tickets (``routing/waiting.py``), given a head start long enough for a
busy machine."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from routing import waiting
from routing.models import WaitTicket
from tests.drills.services import request
from tests.factories import AccountFactory, ApiKeyFactory
from tests.support import project_env, test_database_url, until, web_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only")]

THREADS, RESERVE, PER_KEY = 12, 4, 6  # so 6 may wait for one key, 8 in all
WAITERS = 10


def _one_slot(tmp_path, **settings: str) -> tuple[dict[str, str], dict[str, str]]:
    """One account with one slot, a key for it: the key's auth header and
    the server's environment with ``settings``."""
    AccountFactory(name="only", identity__max_concurrency=1)
    key = ApiKeyFactory()
    env = project_env(
        tmp_path,
        DATABASE_URL=test_database_url(),
        # Fewer database connections than waiters: a waiter hands its
        # connection back while it waits, or the completions would wait for one.
        KIROPOOL_DB_POOL_SIZE="2",
        KIROPOOL_DB_POOL_TIMEOUT="20",
        **settings,
    )
    connection.close()  # the server's connections see the rows committed above
    return {"Authorization": f"Bearer {key.plaintext}"}, env


def _arrived(n: int, answered) -> None:
    """Until waiter ``n`` (0-based) has arrived: its wait ticket is taken
    (each admitted waiter takes one, in the order of admission, before it
    sleeps) or it was answered. The next is sent only then, so arrival
    order is the order they were sent in however slowly a thread gets
    going on a busy machine."""
    until(
        lambda: n in answered or WaitTicket.objects.count() > n,
        20,
        what=f"waiter {n} never arrived",
        step=0.01,
    )


def test_waiters_are_bounded_and_served_in_arrival_order(tmp_path):
    auth, env = _one_slot(
        tmp_path, KIROPOOL_WAIT_RESERVE_THREADS=str(RESERVE), KIROPOOL_MAX_WAITERS_PER_KEY=str(PER_KEY)
    )
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
            _arrived(n, answers)
        # The surplus was refused at once (each was answered before the next
        # was sent), while the slot is still held: nobody else has an answer.
        refused = [n for n, (status, _) in answers.items() if status == 429]
        assert len(refused) == len(answers) == WAITERS - PER_KEY, answers

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


def _serve_in_turn(server, auth: dict, waiters: int) -> tuple[list[int], dict[int, int]]:
    """Hold the key's one slot, send ``waiters`` dispatches one after the
    other, each once the one before arrived (their arrival order), then
    release: each waiter granted holds the slot 0.5 s and releases it (see
    above). The order of the grants, and every status."""
    statuses: dict[int, int] = {}
    granted: list[int] = []
    lock = threading.Lock()

    def waiter(n: int) -> None:
        status, body, _ = request(server.bind, "POST", "/api/v1/dispatch", {"max_wait_ms": 60_000}, auth, 90)
        with lock:
            statuses[n] = status
            if status == 200:
                granted.append(n)
        if status == 200:
            time.sleep(0.5)
            request(server.bind, "POST", f"/api/v1/leases/{body['lease_id']}/complete", {"outcome": "success"}, auth)

    status, held, _ = request(server.bind, "POST", "/api/v1/dispatch", {"max_wait_ms": 0}, auth)
    assert status == 200
    threads = []
    for n in range(waiters):
        threads.append(threading.Thread(target=waiter, args=(n,)))
        threads[-1].start()
        _arrived(n, statuses)
    request(server.bind, "POST", f"/api/v1/leases/{held['lease_id']}/complete", {"outcome": "success"}, auth)
    for thread in threads:
        thread.join(timeout=120)
    return granted, statuses


def test_waiters_in_two_processes_are_served_in_arrival_order(tmp_path):
    """Ten waiters over two workers (each admits all ten): every release
    wakes both workers' oldest waiter, and the older ticket gets the slot.
    The head start is 0.3 s here, against 25 ms by default: on a busy
    machine the older waiter's worker may take that long to wake and claim."""
    auth, env = _one_slot(
        tmp_path,
        KIROPOOL_WAIT_RESERVE_THREADS="4",
        KIROPOOL_MAX_WAITERS_PER_KEY="10",
        KIROPOOL_WAIT_ORDER_GRACE_MS="300",
    )
    server = web_server(env, tmp_path, workers=2, threads=16).start()
    try:
        granted, statuses = _serve_in_turn(server, auth, 10)
    finally:
        server.stop()
    assert set(statuses.values()) == {200}, statuses
    assert granted == list(range(10))
    # Every ticket was given up with its wait.
    assert not WaitTicket.objects.exists()


def test_only_a_live_older_ticket_of_the_key_comes_first():
    """What a process's oldest waiter gives the head start to: a ticket of
    its key, older than its own, not past its expiry (one a dead process
    left behind stops counting there)."""
    now = timezone.now()
    later = now + timedelta(minutes=1)
    dead = WaitTicket.objects.create(key_id=1, expires_at=now - timedelta(seconds=1))
    mine = WaitTicket.objects.create(key_id=1, expires_at=later).pk
    WaitTicket.objects.create(key_id=1, expires_at=later)  # younger
    WaitTicket.objects.create(key_id=2, expires_at=later)  # another key's
    assert dead.pk < mine
    assert not waiting.wait_ticket_older_exists(1, mine)
    older = WaitTicket.objects.create(key_id=2, expires_at=later).pk
    assert waiting.wait_ticket_older_exists(2, older + 1)
