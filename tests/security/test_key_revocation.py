"""A key an operator disables or deletes is refused by every process of a
real gunicorn at once, not when each process's key cache runs out
(accounts/authentication.py, KeyCache; core/listener.py), on PostgreSQL.

The server keeps keys for ten minutes here: before the listener, each of
its workers that had served the key went on serving it that long. The
operator's edit is made in this process, a third one, as from the admin or
a shell on another host."""

from __future__ import annotations

import pytest
from django.db import connection

from accounts.models import ApiKey
from tests.drills.services import request
from tests.factories import AccountFactory, ApiKeyFactory
from tests.support import project_env, test_database_url, until, web_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only")]

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
