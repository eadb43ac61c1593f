"""How maintenance writes yield to the hot path.

The periodic tasks (``routing/maintenance.py``, the purge in
``sessions.py``, the reaper in ``slots.py``) and the order table's upkeep
(``pool_order.py``) write in bounded batches by id, so a run holds its
locks briefly and one statement writes little. On PostgreSQL a batch that
waits for a row lock longer than ``LOCK_TIMEOUT`` gives up and is retried
(up to ``RETRIES`` times, or left to the next run), so a dispatch or a
completion never waits behind it for long, nor ends in a deadlock with it.
"""

from __future__ import annotations

from routing import pg
from routing.backend import backend

# Rows deleted per transaction: bounds how long a run holds its locks and how
# much one statement writes.
BATCH = 1000
# Well under PostgreSQL's deadlock_timeout (1 s), so in a lock cycle with a
# dispatch or a completion it is always the maintenance batch that backs off.
LOCK_TIMEOUT = "200ms"
RETRIES = 3


def lock_timeout_local() -> None:
    """In the current transaction, give up on a row lock after ``LOCK_TIMEOUT`` (PostgreSQL)."""
    if backend.postgres:
        pg.lock_timeout_set(LOCK_TIMEOUT)
