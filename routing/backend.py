"""What the database under the dispatcher can do, decided once at startup
(``RoutingConfig.ready``) instead of by ``connection.vendor`` checks in
every service.

- ``postgres``: releases ``NOTIFY`` the waiting dispatches of every process
  (``routing/wakeups.py``), and maintenance batches give way to the hot path
  after a short lock timeout.
- ``pooled``: connections come from a per-process pool
  (``KIROPOOL_DB_POOL_SIZE``), so a dispatch that waits for a slot hands its
  connection back for the wait (``routing/waiting.py``).
- ``statements``: the one-statement speedups of ``routing/pg.py`` (on
  PostgreSQL unless ``KIROPOOL_FAST_STATEMENTS`` is off), or None: the ORM
  services then do everything, as they always can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routing.pg import Statements


@dataclass(slots=True)
class Backend:
    postgres: bool = False
    pooled: bool = False
    statements: Statements | None = None


backend = Backend()
