"""Django's PostgreSQL backend, answering at once while the connection pool
cannot reach the database, instead of queueing for a connection it cannot
open (:mod:`core.postgresql.outage`)."""

from __future__ import annotations

from django.db.backends.postgresql import base

from core.postgresql.outage import UNREACHABLE, outage


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        pool = self.pool
        if pool is not None and outage.down and not pool.get_stats()["pool_available"]:
            # A slot the pool gave up reconnecting is free again: ask it to
            # try now, so the database's return is found by the next request.
            pool.check()
            raise self.Database.OperationalError(UNREACHABLE)
        return super().get_new_connection(conn_params)
