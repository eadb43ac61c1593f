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

from datetime import datetime, timedelta

from core.recent import RecentValue
from routing.models import LeaseReapMark
from routing.selectors.counts import EXPIRY_FLOOR

# Below the mark: covers clocks apart between hosts, and a claim committed a
# while after the ``now`` it computed its lease's expiry from.
MARGIN = timedelta(seconds=60)
# How often a process reads the mark again. The reaper runs every minute.
REFRESH_SECONDS = 10.0

# The highest floor this process has read: it never goes back down.
_highest = EXPIRY_FLOOR


def _floor_read() -> datetime:
    global _highest  # noqa: PLW0603 - written only under the RecentValue's lock
    mark = LeaseReapMark.objects.values_list("reaped_through", flat=True).first()
    if mark is not None:
        _highest = max(_highest, mark - MARGIN)
    return _highest


# EXPIRY_FLOOR until the first read is done: a request may hold a pooled
# connection when it asks, and must not wait for a read that needs one.
_floor = RecentValue(_floor_read, seconds=REFRESH_SECONDS, initial=EXPIRY_FLOOR)


def lease_floor() -> datetime:
    """The earliest expiry an open lease can have, as this process last read it."""
    return _floor.get()


def lease_floor_forget() -> None:
    """Read the mark again on the next call, from the oldest expiry on until
    then (tests: each test's database starts without a mark)."""
    global _highest  # noqa: PLW0603
    _floor.clear()
    _highest = EXPIRY_FLOOR
