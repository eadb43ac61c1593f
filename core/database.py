"""Whether the database answers, found out within a bounded time.

For the open endpoints that report on the database (``/readyz`` and
``/metrics``): each must answer well within its caller's own timeout (a
load balancer's or kubelet's 1-5 s, a Prometheus scrape's 10 s) even when
the database host swallows packets. Django's connections cannot promise
that: a pooled one waits until the pool's own attempt to connect fails
(``core/postgresql``: ``KIROPOOL_DB_CONNECT_TIMEOUT``, 5 s, for a host that
does not answer), and in a busy pool, which is not a database that is down,
up to the pool's timeout (``KIROPOOL_DB_POOL_TIMEOUT``, 10 s); a thread's
persistent one gives a silent host 5 s per attempt.
"""

from __future__ import annotations

from django.db import DatabaseError, connections

# Whole seconds: libpq's connect_timeout takes no fraction.
PING_TIMEOUT_SECONDS = 2


def database_ping() -> None:
    """``SELECT 1`` on the default database, raising within
    ``PING_TIMEOUT_SECONDS`` when it does not answer.

    On PostgreSQL over a connection of the ping's own, opened with the
    settings' parameters and closed after (a busy pool is not a database
    that is down); it raises the driver's error (``psycopg.Error``: the
    class names what happened, ``ConnectionTimeout`` or
    ``OperationalError``). On SQLite, a local file with nothing to wait
    for, over Django's connection, raising Django's ``DatabaseError``."""
    database = connections["default"]
    if database.vendor != "postgresql":
        with database.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return
    params = {**database.get_connection_params(), "connect_timeout": PING_TIMEOUT_SECONDS, "autocommit": True}
    with database.Database.connect(**params) as ping:
        ping.execute("SELECT 1").fetchone()


def database_errors() -> tuple[type[Exception], ...]:
    """What :func:`database_ping` and the ORM raise when the database is
    down: Django's ``DatabaseError`` and the driver's own base class."""
    return (DatabaseError, connections["default"].Database.Error)
