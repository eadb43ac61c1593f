"""Where the dispatch reads' probe for unreaped leases starts.

A lease past its TTL still counts in its identity's ``in_flight`` until the
reaper closes it, so every read looks for such leases and discounts them
(SPEC §3: expired rows are ignored at once). That probe reads the index of
open leases by expiry, from the oldest on. A completed lease leaves its old
row version in that index until the table is vacuumed, and past the
lease's expiry the probe walks it: with the history a lease table keeps,
vacuums come a day or more apart, and a dispatch grew slower with every
lease completed since the last one.

After a run of the periodic reaper that went through every expired lease
(``slots.lease_reap_expired``), no lease that expired before that run's
``now`` is open, so the probe can start there (less :data:`MARGIN`). The
mark only moves forward and a process reads it at most every
:data:`REFRESH_SECONDS`: an older floor only walks more entries, never
misses a lease.

The one lease it can miss is one inserted after a run with an expiry before
that run's ``now`` less the margin: a claim whose commit came more than the
margin after its own clock (or a clock that far behind the reaper's), or an
expired lease whose completion held it during the run and then rolled
back. Such a lease counts as in flight until the next run, which closes it
(the reaper itself reads from the oldest expiry)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

from routing.models import LeaseReapMark
from routing.selectors.counts import EXPIRY_FLOOR

# Below the mark: covers clocks apart between hosts, and a claim committed a
# while after the ``now`` it computed its lease's expiry from.
MARGIN = timedelta(seconds=60)
# How often a process reads the mark again. The reaper runs every minute.
REFRESH_SECONDS = 10.0


class _Floor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = EXPIRY_FLOOR
        self._read_at: float | None = None

    def get(self) -> datetime:
        read_at = self._read_at
        if read_at is not None and time.monotonic() - read_at < REFRESH_SECONDS:
            return self._value
        mark = LeaseReapMark.objects.values_list("reaped_through", flat=True).first()
        with self._lock:
            if mark is not None:
                self._value = max(self._value, mark - MARGIN)
            self._read_at = time.monotonic()
            return self._value

    def forget(self) -> None:
        """Read the mark again on the next call, from the oldest expiry on
        until then (tests: each test's database starts without a mark)."""
        with self._lock:
            self._value = EXPIRY_FLOOR
            self._read_at = None


_floor = _Floor()


def lease_floor() -> datetime:
    """The earliest expiry an open lease can have, as this process last read it."""
    return _floor.get()


def lease_floor_forget() -> None:
    _floor.forget()
