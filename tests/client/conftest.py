"""tests/client: the Python client (clients/python) and its LiteLLM
integration against a real kiropool: its web server (kiropool/serve.py) on the
PostgreSQL test database. One server for the whole package; each test seeds
its own small pool in a transactional test (committed, so the server sees it)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
from django.db import connection

# LiteLLM fetches its model cost map from the internet when imported unless
# told otherwise; nothing here may leave the machine.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="package")
def kiropool_url(django_db_setup, django_db_blocker, tmp_path_factory) -> str:
    """Base URL of a kiropool under its web server on the test database (PostgreSQL only)."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: set DATABASE_URL=postgres://...")
    from tests.support import project_env, test_database_url, web_server

    tmp = tmp_path_factory.mktemp("kiropool-server")
    server = web_server(project_env(tmp, DATABASE_URL=test_database_url(), KIROPOOL_EXPLAIN_RATE=""), tmp).start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass(frozen=True)
class Pool:
    key: str  # the gateway key's plaintext
    accounts: list[str]  # one per identity, in identity order
    identities: list[str]


def seed_pool(prefix: str = "acct", *, identities: int = 2, max_concurrency: int = 4, **key_fields) -> Pool:
    """``identities`` routing identities with one account each, and a key that reaches them all."""
    from routing.pools import KeySpec, pool_seed, uniform_pool

    seeded = pool_seed(
        prefix=f"{prefix}-",
        identities=uniform_pool(identities, max_concurrency=max_concurrency),
        keys=(KeySpec("gateway", options=key_fields),),
    )
    names = [account.name for account in seeded.accounts]
    # One account per identity, named like it.
    return Pool(key=seeded.key, accounts=names, identities=names)


def open_leases() -> list[str]:
    """Account names of the leases not completed (the reaper never runs here)."""
    from routing.models import Lease

    return list(Lease.objects.filter(completed_at__isnull=True).values_list("account_name", flat=True))


T = TypeVar("T")


def run_async(scenario: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(scenario())`` in a thread of its own: the browser suite's
    Playwright keeps an event loop running in the main thread for the session,
    and asyncio.run refuses to start under a running loop."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(scenario())
        except BaseException as exc:  # handed back to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="client-test-loop")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
