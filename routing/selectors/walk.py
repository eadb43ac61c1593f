"""The head of a large pool's order, found through an index.

The candidates read (``candidates.py``) orders every candidate and keeps the
first ``HEAD_ROWS``; on a pool of 1,000 accounts the sort costs the database
3-4 ms a dispatch. Most accounts of a pool are *plain*: balanced, alone on
their identity. For a plain account that can start a lease now, whose proxy
is not cooling and that has no binding past its expiry, every sort key of
SPEC §2 is a column of its ``PoolOrder`` row (the latency band too, once the
snapshot refresh has checked it under the snapshot the read orders by), and an
index of that table holds a scope's rows in that order. So:

- the *walk* reads that index from the start of the key's scope and keeps
  the first ``HEAD_ROWS`` such accounts; with latency bands, only while
  every row of the scope holds its band under the read's snapshot
  (:func:`_bands_whole`);
- the *special* accounts are all that could sort before them otherwise: the
  scope's accounts that are not plain (another pool; key 3 sums an alias's
  sessions over its identity), those with bindings past their expiry (their
  live count is below the counter), the model-preferred ones;
- the read then orders only the walked and the special accounts, with the
  full expressions of ``candidates.py``.

That head is the true head whenever the walk found ``HEAD_ROWS`` accounts:
any plain account it did not reach sorts after all of them (it cannot
start, or its proxy cools, or its columns sort later). :func:`exact` checks
this on the rows read; otherwise the caller reads in full. A property test
checks on random pools, every kind of special account among them, that the
head is the full read's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from django.conf import settings
from django.db.models import BooleanField, Exists, F, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.lookups import Exact, LessThanOrEqual

from accounts.models import Account
from routing.dispatch import CandidateRow
from routing.models import LatencySnapshot, PoolOrder, SessionBinding
from routing.selectors import counts, rules

if TYPE_CHECKING:
    from routing.selectors.candidates import Shape


def index_order(*, spread: bool, latency: bool = False) -> list:
    """The walk's ``ORDER BY``: the columns of ``pool_order_spread_idx``
    (sessions first, for a new session) or of ``pool_order_idx``; with
    ``latency``, of ``pool_order_band_spread_idx`` or ``pool_order_band_idx``."""
    sessions = [F("binding_rows").asc()] if spread else []
    band = [F("band").asc()] if latency else []
    return [*sessions, *band, F("last_started_at").asc(nulls_first=True), F("credits_sort").asc(), F("name").asc()]


def head_or_special(selectable: Q, values: Mapping[str, object], *, spread: bool, latency: bool, rows: int) -> QuerySet:
    """The ids of the accounts the head read orders: the first ``rows``
    plain ones of the key's scope that can start a lease (the walk), and
    every special one. ``selectable`` is what makes an account a candidate;
    with ``latency`` the read orders by the bands of ``values["snapshot_id"]``."""
    now = values["now"]
    scope = PoolOrder.objects.filter(scope_id=values["group_id"], enabled=True)
    expired = SessionBinding.objects.filter(counts.expired(now)).values("account_id")
    # Whether the row's account can take a lease now, asked row by row as
    # the index is read (a scalar subquery: as a join, a generic plan
    # estimated the accounts that qualify at a handful and joined all of them).
    startable = Account.objects.filter(selectable, pk=OuterRef("account_id")).exclude(pk__in=expired)
    for names in (values["preferred"], values["excluded"]):
        if names:
            startable = startable.exclude(name__in=names)
    startable = (
        startable.filter(Q(proxy__cooldown_until__isnull=True) | Q(proxy__cooldown_until__lte=now))
        .alias(expired_leases=counts.unreaped_leases(now, values["lease_floor"]))
        .filter(
            rules.identity_claimable(
                now, values["slow_start_seconds"], prefix="identity__", expired_leases=F("expired_leases")
            )
        )
        .order_by()
        .values(startable=Value(True))
    )
    plain = scope.filter(plain=True)
    if latency:
        # Every row of the scope holds its band under the read's snapshot
        # (_bands_whole); the condition names the band indexes' own.
        plain = plain.filter(band_snapshot_id__isnull=False)
    walk = (
        plain.filter(Exact(Subquery(startable, output_field=BooleanField()), True))
        .order_by(*index_order(spread=spread, latency=latency))
        .values("pk")[:rows]
    )
    # The walk inside a subquery of its own: a union member may not have a
    # LIMIT of its own on SQLite.
    members = [
        PoolOrder.objects.filter(pk__in=walk).order_by().values("account_id"),
        scope.filter(plain=False).values("account_id"),
        expired,
    ]
    if values["preferred"]:
        members.append(Account.objects.filter(name__in=values["preferred"]).order_by().values("pk"))
    if latency:
        # A row the walk cannot place: none of the read is the head's.
        members = [member.filter(*_bands_whole(values)) for member in members]
    return members[0].union(*members[1:], all=True)


def _bands_whole(values: Mapping[str, object]) -> list:
    """That every row of the key's scope holds its band under the read's
    snapshot: the refresh has checked every row under it (its
    ``bands_whole_at``), no row is without a band (new, or its proxy changed
    since), and none was written under a newer snapshot (this process has
    not seen the newest yet). A row written under an older one holds the
    band it has under the read's: the refresh writes a band only when it
    changes. Otherwise the head read finds nothing and the full read
    decides: those rows are neither walked nor special, and a head of
    special accounts alone could skip them.

    Two probes of ``pool_order_band_stale_idx``, each one index entry
    (whether a row has no band, and the scope's highest snapshot), and one
    of the snapshot's primary key. A range of a parameter instead (``>
    snapshot``) is estimated at a third of the scope on a generic plan, or
    at all of it from statistics taken before the last refresh; a plan then
    scanned the table for it. As special accounts, those estimates turned
    the read into scans of the accounts."""
    snapshot_id = values["snapshot_id"]
    rows = PoolOrder.objects.filter(scope_id=values["group_id"])
    newest = rows.filter(band_snapshot_id__isnull=False).order_by("-band_snapshot_id").values("band_snapshot_id")[:1]
    return [
        Exists(LatencySnapshot.objects.filter(pk=snapshot_id, bands_whole_at__isnull=False)),
        ~Exists(rows.filter(band_snapshot_id__isnull=True)),
        LessThanOrEqual(Subquery(newest), snapshot_id),
    ]


def exact(rows: Sequence[CandidateRow], *, head_rows: int) -> bool:
    """Whether a head read through the walk is the full read's head: it is
    when its last row can start a lease on a proxy not cooling. Then every
    row is such a row, and an account the walk did not reach sorts after
    them. Fewer rows, or a last row that cannot start, means the walk may
    have run out before the head was full."""
    return len(rows) == head_rows and rows[-1].ready and not rows[-1].keys.proxy_cooling


def walkable(shape: Shape, *, size: int) -> bool:
    """Whether a read of ``shape`` may go through the walk: a head read of a
    pool of at least ``KIROPOOL_WALK_MIN_ACCOUNTS`` accounts, not a fixed
    account."""
    return (
        shape.head and not shape.bound_only and shape.scope != "fixed" and size >= settings.KIROPOOL_WALK_MIN_ACCOUNTS
    )
