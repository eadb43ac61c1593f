"""Whether this process's connection pool can reach the database, as its
own connection attempts found.

Django's pool (psycopg_pool) opens its connections in the background, and a
request that finds none idle waits for one up to the pool's timeout
(``KIROPOOL_DB_POOL_TIMEOUT``, 10 s). With the database down, every request
waited that long for a connection the pool could not open, each holding a
server thread: a worker's threads filled with them, and everything else
queued behind (a ``/healthz`` behind 80 dispatches waited 49 s, 2 workers of
8 threads). So the pool opens its connections through
:class:`WatchedConnection`, which records here whether the latest attempt
failed and, when one does, fails the requests already waiting in the pool
(:func:`pool_waiters_fail`); and the backend (``core/postgresql/base.py``)
answers a request at once while it did.

Any failed attempt counts, whatever the server said or did not say (libpq
gives its refusals no SQLSTATE): refused, timed out, shutting down, starting
up, out of connection slots. A request needing a new connection without a
pool would have met the same refusal at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from django.db import connections

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

UNREACHABLE = "the database cannot be reached: this process's connection pool failed to open a connection"


class PoolOutage:
    """Whether the latest of the pool's connection attempts failed."""

    def __init__(self) -> None:
        self.down = False

    def failed(self) -> None:
        self.down = True

    def connected(self) -> None:
        self.down = False


# One per process: Django keeps one pool per database alias, and kiropool one alias.
outage = PoolOutage()


class WatchedConnection(psycopg.Connection):
    """psycopg's connection, telling :data:`outage` how each attempt to open
    one went (the pool's ``connection_class``)."""

    @classmethod
    def connect(cls, *args, **kwargs):
        try:
            connection = super().connect(*args, **kwargs)
        except psycopg.OperationalError:
            outage.failed()
            pool = connections["default"].pool
            if pool is not None:
                pool_waiters_fail(pool, UNREACHABLE)
            raise
        outage.connected()
        return connection


def pool_waiters_fail(pool: ConnectionPool, message: str) -> None:
    """Fail the requests waiting in ``pool`` for a connection, each with an
    ``OperationalError`` of its own saying ``message``.

    Those that began waiting before an attempt failed would otherwise wait
    out the pool's timeout: a ``/healthz`` behind 80 dispatches waited
    10.2 s for them, 0.2 s with them failed (the database refusing).
    psycopg_pool has no public way to do it; this is what its own
    ``close()`` does to its waiters (psycopg-pool 3.3, pinned;
    tests/test_database_outage.py fails if that changes)."""
    with pool._lock:
        waiting = list(pool._waiting)
        pool._waiting.clear()
    for position in waiting:
        position.fail(psycopg.OperationalError(message))
