"""A key an operator disables or deletes is refused by every process of a
real web server at once, not when each process's key cache runs out
(accounts/authentication.py, KeyCache; core/listener.py).

On PostgreSQL the server keeps keys for ten minutes here: before the
listener, each of its workers that had served the key went on serving it
that long. The operator's edit is made in this process, a third one, as
from the admin or a shell on another host. On SQLite, the embedded
default, no process hears another's changes: there the server reads the
key on every request unless told otherwise."""

from __future__ import annotations

import sqlite3

import pytest
from django.db import connection

from accounts.models import ApiKey
from tests.drills.services import django_run, manage, request
from tests.factories import AccountFactory, ApiKeyFactory
from tests.support import project_env, test_database_url, until, web_server

KEPT_SECONDS = "600"
# Requests sent to warm the key into the workers' caches, and after the edit:
# each on a new connection, so both workers serve some.
REQUESTS = 20
# The edit reaches the workers in milliseconds; the slack is for a busy machine.
WITHIN_SECONDS = 5.0


def _disable(key: ApiKey) -> None:
    key.enabled = False
    key.save()


def _delete(key: ApiKey) -> None:
    key.delete()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
@pytest.mark.parametrize("edit", [_disable, _delete], ids=["disabled", "deleted"])
def test_a_key_disabled_or_deleted_is_refused_by_every_worker_at_once(tmp_path, edit):
    AccountFactory(name="a", identity__max_concurrency=REQUESTS)
    key = ApiKeyFactory(name="gateway")
    auth = {"Authorization": f"Bearer {key.plaintext}"}
    env = project_env(tmp_path, DATABASE_URL=test_database_url(), KIROPOOL_KEY_CACHE_SECONDS=KEPT_SECONDS)
    connection.close()  # the server's connections see the rows committed above
    server = web_server(env, tmp_path, workers=2).start()

    def statuses() -> list[int]:
        return [request(server.bind, "POST", "/api/v1/dispatch/explain", {}, auth)[0] for _ in range(REQUESTS)]

    try:
        assert statuses() == [200] * REQUESTS  # served, and kept by the workers that served
        edit(key)
        until(lambda: statuses() == [401] * REQUESTS, WITHIN_SECONDS, what="a worker still serves the key", step=0.05)
        assert statuses() == [401] * REQUESTS
    finally:
        server.stop()


# --- SQLite, the embedded default --------------------------------------------------

SEED = """
from routing.pools import pool_seed, uniform_pool
print(pool_seed(prefix="t-", identities=uniform_pool(1, max_concurrency=20)).key)
"""


@pytest.mark.parametrize(
    "statement",
    ["UPDATE accounts_apikey SET enabled = 0", "DELETE FROM accounts_apikey"],
    ids=["disabled", "deleted"],
)
def test_on_sqlite_a_key_changed_in_another_process_is_refused_at_once(tmp_path, statement):
    """By default: with a key cache of 1 s, as before, the workers that had
    served the key went on serving it for up to that second, and the
    requests right after the edit were answered 200."""
    database = tmp_path / "kiropool.sqlite3"
    env = project_env(tmp_path, DATABASE_URL=f"sqlite:///{database}", CELERY_BROKER_URL="memory://")
    env.pop("KIROPOOL_KEY_CACHE_SECONDS", None)
    manage(env, "migrate", "--noinput")
    auth = {"Authorization": f"Bearer {django_run(env, SEED).strip()}"}
    server = web_server(env, tmp_path, workers=2).start()

    def statuses() -> list[int]:
        return [request(server.bind, "POST", "/api/v1/dispatch/explain", {}, auth)[0] for _ in range(REQUESTS)]

    try:
        assert statuses() == [200] * REQUESTS
        with sqlite3.connect(database, timeout=20) as db:  # as from a shell, or another server's process
            db.execute("PRAGMA foreign_keys = OFF")
            db.execute(statement)
        assert statuses() == [401] * REQUESTS
    finally:
        server.stop()
