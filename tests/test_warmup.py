"""A web worker warms before it serves (kiropool/warmup.py): the URLconf
is imported and the statements of the common dispatches are compiled,
without a query, so that a freshly started worker's first dispatches
compile nothing; then what the start built is frozen out of the garbage
collector's reach, so its full collections do not walk it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.urls import clear_url_caches, get_resolver
from django.utils import timezone

from kiropool.warmup import worker_warm
from routing import pg, selection
from routing.selectors import dispatch as reads
from tests.factories import AccountFactory, AccountGroupFactory, ApiKeyFactory, latency_snapshot_create
from tests.routing.gateway import Gateway
from tests.support import PROCESS_SECRETS, clean_env

pytestmark = pytest.mark.django_db


@pytest.fixture
def cold():
    """This process as a worker that has served nothing yet."""
    clear_url_caches()
    reads.compiled.cache_clear()
    reads.binding_lookup.cache_clear()
    pg._claimable.cache_clear()


def _compiles() -> tuple[int, int, int]:
    caches = (reads.compiled, reads.binding_lookup, pg._claimable)
    return tuple(cache.cache_info().misses for cache in caches)


@pytest.mark.usefixtures("cold")
def test_warming_up_imports_the_urlconf_and_touches_no_database(django_assert_num_queries):
    with django_assert_num_queries(0):
        worker_warm()
    assert "url_patterns" in vars(get_resolver())  # resolved once, kept for every request
    assert reads.compiled.cache_info().currsize > 0


@pytest.mark.usefixtures("cold", "statements")
@pytest.mark.parametrize("latency", [True, False], ids=["latency", "no-latency"])
@pytest.mark.parametrize("preferred_pool", selection.POOLS)
@pytest.mark.parametrize("scope", ["group", "all"])
def test_a_warm_worker_compiles_nothing_for_the_common_dispatches(scope, preferred_pool, latency):
    accounts = AccountFactory.create_batch(2)
    group = AccountGroupFactory(accounts=accounts) if scope == "group" else None
    key = ApiKeyFactory(account_group=group, preferred_pool=preferred_pool)
    if latency:
        latency_snapshot_create(
            generated_at=timezone.now(),
            window_seconds=3600,
            global_avg_ms=500.0,
            sample_count=100,
            accounts={account.name: [10, 500.0] for account in accounts},
            proxies={},
        )
    worker_warm()
    before = _compiles()
    gw = Gateway(key.plaintext)

    gw.cycle(session_id="conversation")  # a new session
    gw.cycle(session_id="conversation")  # the same one, bound now
    gw.cycle()  # no session
    # Both identities busy (one slot each): the miss read, with and without a session.
    held = [gw.dispatch(session_id=f"hold-{n}") for n in range(2)]
    assert [r.status_code for r in held] == [200, 200]
    assert gw.dispatch(session_id="third", max_wait_ms=0).status_code == 429
    assert gw.dispatch(max_wait_ms=0).status_code == 429

    assert _compiles() == before


# Importing an entry point leaves the process warm, with the start's objects
# frozen: the collector tracks next to none of them; a full collection walks
# what serving creates, not the modules. PostgreSQL on a port where nothing
# listens shows that nothing of it needed the database. The web server loads
# the app in its master and forks the workers from it (kiropool/serve.py): so
# the import leaves no thread (a fork keeps only the one that forks) and no
# socket (every worker would share one connection).
ENTRY_WARM = """
import gc
import os
import sys
import threading
import {module}
from routing.selectors import dispatch
assert "drf_spectacular.views" in sys.modules
assert dispatch.compiled.cache_info().currsize > 0
frozen, tracked = gc.get_freeze_count(), len(gc.get_objects())
assert frozen > 50_000, frozen
assert tracked < frozen / 100, (tracked, frozen)
assert threading.enumerate() == [threading.main_thread()], threading.enumerate()
def target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{{fd}}")
    except FileNotFoundError:  # the listing's own descriptor, closed since
        return ""
fds = [target(fd) for fd in os.listdir("/proc/self/fd")]
assert not [fd for fd in fds if fd.startswith("socket:")], fds
"""


@pytest.mark.parametrize("module", ["kiropool.wsgi", "kiropool.asgi"])
def test_an_entry_point_warms_its_worker_without_the_database(module):
    env = clean_env(
        DJANGO_SETTINGS_MODULE="kiropool.settings",
        DATABASE_URL="postgres://kiropool@127.0.0.1:9/nowhere",
        CELERY_BROKER_URL="memory://",
        **PROCESS_SECRETS,
    )
    result = subprocess.run(
        [sys.executable, "-c", ENTRY_WARM.format(module=module)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
