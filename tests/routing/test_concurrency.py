"""Several OS processes against one PostgreSQL: limits hold and nothing is
lost (waking a waiting dispatch: ``test_wakeups.py``)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.db import connection

from accounts.models import RoutingIdentity
from routing import maintenance
from routing.backend import backend
from routing.models import Lease
from routing.pool_order import pool_order_rebuild
from tests.factories import AccountFactory, ApiKeyFactory, LatencySampleFactory, RoutingIdentityFactory
from tests.routing.test_walk_bands import bands_of_spec, bands_stored
from tests.support import test_database_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only", "statements")]

ROOT = Path(__file__).resolve().parents[2]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of another kiropool process on the test database,
    dispatching and completing the way this test does: with the
    one-statement speedups (``[fast]``) or through the ORM (``[orm]``)."""
    fast = "true" if backend.statements is not None else "false"
    return {**os.environ, "DATABASE_URL": test_database_url(), "KIROPOOL_FAST_STATEMENTS": fast, **(extra or {})}


def spawn(*args, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = child_env(env)
    env.pop("REDIS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.routing.hammer_worker", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def hammer(key, identities, *, workers: int, cycles: int, hold_ms: int, env=None) -> tuple[list[str], int, int]:
    """``workers`` processes of ``hammer_worker`` against ``key``, counting
    the holders of each identity from outside the dispatcher. Returns the
    leases they acquired, the highest holders any identity had at once, and
    the holders left at the end."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE hammer_probe (identity text PRIMARY KEY, holders int, peak int)")
        cursor.executemany("INSERT INTO hammer_probe VALUES (%s, 0, 0)", [[i.name] for i in identities])
    try:
        procs = [spawn(key.plaintext, cycles, hold_ms, env=env) for _ in range(workers)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        with connection.cursor() as cursor:
            cursor.execute("SELECT max(peak), sum(holders) FROM hammer_probe")
            peak, holders = cursor.fetchone()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE hammer_probe")
    return [lease for r in results for lease in r["acquired"]], peak, holders


def test_processes_hammering_one_identity_never_exceed_its_limit():
    limit, workers, cycles = 2, 4, 15
    identity = RoutingIdentityFactory(name="hammered", max_concurrency=limit)
    AccountFactory(name="alias-1", identity=identity)
    AccountFactory(name="alias-2", identity=identity)
    acquired, peak, holders = hammer(ApiKeyFactory(), [identity], workers=workers, cycles=cycles, hold_ms=15)
    assert len(acquired) == workers * cycles  # nobody ran out of wait budget
    assert peak == limit  # the slots were contended, and never over-booked
    assert holders == 0
    # no lease lost or double-booked: every grant is one row, completed once
    assert len(set(acquired)) == len(acquired)
    leases = Lease.objects.filter(identity=identity)
    assert leases.count() == len(acquired)
    assert set(leases.values_list("outcome", flat=True)) == {"success"}
    assert RoutingIdentity.objects.get(pk=identity.pk).in_flight == 0


def test_processes_dispatching_through_the_walk_keep_the_order_table_true():
    """Four processes run new and returning sessions through the walk (its
    threshold at 0) on six identities, two of them with aliases, two slots
    each: lease starts write the order rows of every alias, completions those
    of the bound account, all at once. Nothing deadlocks or fails, nothing is
    over-booked, and afterwards every order row equals its sources."""
    identities = [RoutingIdentityFactory(name=f"walked-{i}", max_concurrency=2) for i in range(6)]
    for i, identity in enumerate(identities):
        for alias in range(2 if i < 2 else 1):
            AccountFactory(name=f"walked-{i}-{alias}", identity=identity)
    acquired, peak, holders = hammer(
        ApiKeyFactory(), identities, workers=4, cycles=20, hold_ms=5, env={"KIROPOOL_WALK_MIN_ACCOUNTS": "0"}
    )
    assert len(acquired) == len(set(acquired)) == 4 * 20
    assert peak <= 2 and holders == 0
    assert Lease.objects.filter(outcome="success").count() == len(acquired)
    assert pool_order_rebuild() == 0  # every row was already what its sources say


def _refresh_until(stop: threading.Event, outcome: dict) -> None:
    try:
        while not stop.is_set():
            maintenance.latency_snapshot_refresh()
            outcome["refreshes"] = outcome.get("refreshes", 0) + 1
            time.sleep(0.05)
    except Exception as error:  # noqa: BLE001  reported by the test
        outcome["error"] = error
    finally:
        connection.close()


def test_processes_dispatching_through_the_band_walk_while_the_snapshot_refreshes():
    """As above, with latency bands: the dispatches walk the band indexes
    while the snapshot is rebuilt over and over beside them (the refresh
    locks every order row it can, and their completions add samples).
    Nothing deadlocks or fails, nothing is over-booked, and afterwards every
    order row equals its sources and every band is SPEC §2's."""
    identities = [RoutingIdentityFactory(name=f"banded-{i}", max_concurrency=2) for i in range(6)]
    for i, identity in enumerate(identities):
        for alias in range(2 if i < 2 else 1):
            account = AccountFactory(name=f"banded-{i}-{alias}", identity=identity)
            LatencySampleFactory(account=account, first_token_ms=[300.0, 900.0, 2700.0][i % 3])
    maintenance.latency_snapshot_refresh()
    stop, outcome = threading.Event(), {}
    refresher = threading.Thread(target=_refresh_until, args=(stop, outcome))
    refresher.start()
    try:
        acquired, peak, holders = hammer(
            ApiKeyFactory(), identities, workers=4, cycles=20, hold_ms=5, env={"KIROPOOL_WALK_MIN_ACCOUNTS": "0"}
        )
    finally:
        stop.set()
        refresher.join(60)
    assert "error" not in outcome, outcome
    assert outcome["refreshes"] >= 2
    assert len(acquired) == len(set(acquired)) == 4 * 20
    assert peak <= 2 and holders == 0
    assert pool_order_rebuild() == 0
    assert bands_stored() == bands_of_spec()
