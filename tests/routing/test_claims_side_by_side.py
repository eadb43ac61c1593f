"""A key's dispatches in one process read the head of the order one at a
time, then claim side by side (routing/waiting.py): a claim that is held up
does not hold up the key's next dispatch, which claims on another identity.

On PostgreSQL: a row lock taken from another connection holds the first
claim up, as a slow statement or a busy identity row would."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from django.db import connection

from routing.models import Lease
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory
from tests.routing.gateway import Gateway
from tests.support import test_database_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only", "statements")]

# Generous: the second dispatch needs a few queries; before claims ran side by
# side it waited for the first, held up for as long as the lock is kept (here
# until the assertion gave up).
SECOND_DISPATCH_SECONDS = 10.0


def _dispatch(gateway: Gateway, session_id: str, into: dict) -> None:
    try:
        response = gateway.dispatch(session_id=session_id, max_wait_ms=0)
        into[session_id] = (response.status_code, response.json())
    finally:
        connection.close()


def test_a_claim_held_up_does_not_hold_up_the_next_dispatch_of_the_key(settings):
    # No per-key lease count: its row would be a second lock both claims take.
    settings.KIROPOOL_KEY_MAX_CONCURRENCY = 0
    first = RoutingIdentityFactory(name="first", max_concurrency=4)
    second = RoutingIdentityFactory(name="second", max_concurrency=4)
    AccountFactory(name="first-account", identity=first)
    AccountFactory(name="second-account", identity=second)
    key = ApiKeyFactory(name="gateway")
    answers: dict[str, tuple[int, dict]] = {}
    with psycopg.connect(test_database_url()) as locker:
        # Both identities are new: the order puts "first" ahead (by name).
        locker.execute("SELECT 1 FROM accounts_routingidentity WHERE id = %s FOR UPDATE", [first.pk])
        held = threading.Thread(target=_dispatch, args=(Gateway(key.plaintext), "held", answers))
        held.start()
        _until_blocked_on_the_lock(locker)
        nxt = threading.Thread(target=_dispatch, args=(Gateway(key.plaintext), "next", answers))
        nxt.start()
        nxt.join(SECOND_DISPATCH_SECONDS)
        finished_while_held = not nxt.is_alive()
        locker.rollback()  # the first claim goes on
    held.join(30)
    nxt.join(30)
    assert finished_while_held, "the key's next dispatch waited for the claim held up"
    assert answers["next"][0] == 200 and answers["next"][1]["account"]["routing_identity"] == "second"
    assert answers["held"][0] == 200 and answers["held"][1]["account"]["routing_identity"] == "first"
    assert Lease.objects.filter(completed_at__isnull=True).count() == 2


def _until_blocked_on_the_lock(locker: psycopg.Connection, timeout: float = 10.0) -> None:
    """Until another backend waits for a lock held by ``locker``."""
    pid = locker.info.backend_pid
    for _ in range(int(timeout / 0.01)):
        row = locker.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", [pid]
        ).fetchone()
        if row[0]:
            return
        time.sleep(0.01)
    raise AssertionError("the first claim never reached the locked identity row")
