"""The order table's upkeep: ``PoolOrder``'s latency bands, written by the
latency refresh and caught up after an operator's edit, and its rebuild
from its sources, an operator's command.

The triggers keep every other column in step with the rows it copies
(migrations 0008-0009); a band depends on the latency snapshot, which the
database does not know, so it is written here. These writes yield to the
hot path as maintenance does (``routing/batches.py``): a lease start or a
binding holding an order row is skipped, or waited for a bounded time.
"""

from __future__ import annotations

import logging

from django.db import OperationalError, connection, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from accounts.models import Account, AccountGroup
from routing import selection
from routing.backend import backend
from routing.batches import BATCH, LOCK_TIMEOUT, RETRIES, lock_timeout_local
from routing.models import LatencySnapshot, PoolOrder
from routing.selectors import rules

logger = logging.getLogger(__name__)

# Order rows whose bands one transaction writes: how long a lease start may
# wait for a row a refresh holds (about 10 ms for 200 rows).
BANDS_BATCH = 200


# --- the latency bands ---------------------------------------------------------------


def pool_order_bands_write(snapshot: LatencySnapshot) -> int:
    """Bring every ``PoolOrder`` row's latency band to ``snapshot``'s, then
    mark the snapshot's bands whole, so dispatches ordering by it walk the
    band indexes (``routing/selectors/walk.py``); return the rows written.

    Only the rows whose band is not the snapshot's are written: those
    without one (new, or their proxy changed) and those under an older
    snapshot whose band differs under this one (an account near a band's
    edge as the averages move). A row under a newer snapshot is left alone,
    and nothing is written once a newer snapshot exists: its refresh
    decides. Written every minute, the ~6,400 order rows of the bench's
    pools were ~6,400 row versions in eight indexes each (bench/HISTORY.md).

    In batches of ``BANDS_BATCH`` rows, each its own transaction, so a row
    is locked for one batch's milliseconds: a lease start moves its
    identity's rows, and waits for their locks. A batch's rows are locked
    first, skipping those a lease start or a binding holds: this never
    waits, so it never deadlocks with them (:func:`_bands_complete` writes
    those after). Each row's band is computed again once it is
    locked, so it sees every proxy change committed before; a change still
    in flight waits for the lock and clears the band after this commits (the
    trigger of migration 0009). Without a usable global average no band
    orders, and nothing is written."""
    if snapshot.global_avg_ms is None:
        return 0
    written = _bands_write(snapshot, _to_write(snapshot))
    _bands_whole_mark(snapshot)
    return written


def _bands_write(snapshot: LatencySnapshot, to_write: Q) -> int:
    """Write the bands under ``snapshot`` of the rows ``to_write`` selects:
    in batches, skipping locked rows, then those left one at a time (only
    if a batch left some: finding them reads every row again)."""
    pks = list(_with_band(snapshot).filter(to_write).order_by("pk").values_list("pk", flat=True))
    written = 0
    for start in range(0, len(pks), BANDS_BATCH):
        with transaction.atomic():
            rows = (
                _with_band(snapshot)
                .select_for_update(skip_locked=True)
                .filter(to_write, pk__in=pks[start : start + BANDS_BATCH])
            )
            written += _bands_update(list(rows.order_by().values_list("pk", flat=True)), snapshot)
    if written < len(pks):
        written += _bands_complete(snapshot, to_write)
    return written


def _bands_complete(snapshot: LatencySnapshot, to_write: Q) -> int:
    """Write the bands under ``snapshot`` of the rows ``to_write`` still
    selects: those a batch skipped, and those whose proxy changed since.
    One row a transaction, each waiting for its row up to ``LOCK_TIMEOUT``
    (a lease start holds it for milliseconds) and holding no other lock
    meanwhile, so it cannot be part of a deadlock; a row held longer is left
    to the next refresh, and this snapshot's bands are not whole (the walk
    needs every row of a scope to hold the band of the snapshot it orders
    by)."""
    written = 0
    for pk in list(_with_band(snapshot).filter(to_write).values_list("pk", flat=True)[:BATCH]):
        try:
            with transaction.atomic():
                lock_timeout_local()
                # Locked, then compared: the band sees a proxy change committed while it waited.
                rows = _with_band(snapshot).select_for_update().filter(to_write, pk=pk)
                written += _bands_update(list(rows.values_list("pk", flat=True)), snapshot)
        except OperationalError:
            logger.info("pool order row %s held past %s; its band waits for the next refresh", pk, LOCK_TIMEOUT)
    return written


def pool_order_bands_catch_up() -> int:
    """Write the bands, under the newest snapshot, of the order rows without
    one: those an operator's edit left without (a new account or
    membership, an account's proxy or a proxy's URL changed). Until they
    have one their scope's dispatches read every account instead of walking
    the band index (6-8 ms against under 1 ms at 1,000 accounts), until the
    next refresh. Run once the edit commits (``routing/signals.py``); like
    the refresh, it skips the rows a lease start holds, then writes them one
    at a time. Should a refresh make a newer snapshot meanwhile, the rows
    are written under that one.

    Only rows without a band: a row with one is the refresh's to check. A
    catch-up comparing every row cost each edit's commit about 0.2 s on the
    bench's 6,800 rows, and under a snapshot that is not whole it could
    write an older band over a row the newer refresh had just found right
    (its statement's view predating the newer snapshot)."""
    written = 0
    for _ in range(RETRIES):
        snapshot = LatencySnapshot.objects.order_by("-pk").first()
        if snapshot is None:
            break
        if snapshot.global_avg_ms is not None:
            written += _bands_write(snapshot, _unbanded(snapshot))
        if not _newer(snapshot).exists():
            break
    return written


def _band_under(snapshot: LatencySnapshot) -> Subquery:
    """An order row's account's band under ``snapshot``, computed by the
    database as the dispatch read does."""
    values = {"snapshot_id": snapshot.pk, **rules.band_values(snapshot.global_avg_ms)}
    band = rules.latency_joins(Account.objects.filter(pk=OuterRef("account_id")), snapshot.pk).values(
        band=rules.band(values)
    )
    return Subquery(band)


def _with_band(snapshot: LatencySnapshot) -> QuerySet:
    """The order rows, each with ``band_now``: its band under ``snapshot``."""
    return PoolOrder.objects.alias(band_now=_band_under(snapshot))


def _differs(snapshot: LatencySnapshot) -> Q:
    """Rows of ``_with_band(snapshot)`` under an older snapshot whose band is not ``snapshot``'s."""
    return Q(band_snapshot_id__lt=snapshot.pk) & ~Q(band=F("band_now"))


def _to_write(snapshot: LatencySnapshot) -> Q:
    """Rows of ``_with_band(snapshot)`` whose band to write under
    ``snapshot``: none, or an older one that differs; none at all once a
    newer snapshot exists. Checked in the statement that locks the rows, so
    a writer under an older snapshot never overwrites a newer one's band,
    nor writes one after a newer refresh found the row right."""
    return ~Exists(_newer(snapshot)) & (Q(band_snapshot_id__isnull=True) | _differs(snapshot))


def _unbanded(snapshot: LatencySnapshot) -> Q:
    """Rows without a band, to write under ``snapshot`` (a catch-up's):
    none once a newer snapshot exists, as :func:`_to_write`."""
    return ~Exists(_newer(snapshot)) & Q(band_snapshot_id__isnull=True)


def _newer(snapshot: LatencySnapshot) -> QuerySet:
    return LatencySnapshot.objects.filter(pk__gt=snapshot.pk)


def _bands_whole_mark(snapshot: LatencySnapshot) -> bool:
    """Mark ``snapshot``'s bands whole if every banded row holds its band:
    no row under an older snapshot holds a band that differs under it. Rows
    without a band do not count: a dispatch tells them apart in its own
    scope. Checked in the marking statement, so a writer still at work
    under an older snapshot cannot slip past it: its rows differ, or are
    still without a band in the statement's view, and they are refused
    once this snapshot exists (:func:`_to_write`)."""
    differs = _with_band(snapshot).filter(_differs(snapshot))
    marked = LatencySnapshot.objects.filter(pk=snapshot.pk, bands_whole_at__isnull=True).filter(~Exists(differs))
    return bool(marked.update(bands_whole_at=timezone.now()))


def _bands_update(pks: list[int], snapshot: LatencySnapshot) -> int:
    """Set the rows ``pks`` (locked by the caller) to their account's band under ``snapshot``."""
    if not pks:
        return 0
    return PoolOrder.objects.filter(pk__in=pks).update(band=_band_under(snapshot), band_snapshot_id=snapshot.pk)


# --- the order table -----------------------------------------------------------------------

_ORDER_COLUMNS = ("enabled", "plain", "binding_rows", "last_started_at", "credits_sort", "name")


def pool_order_rebuild() -> int:
    """Write ``PoolOrder`` afresh from its sources, and return how many rows
    were missing, left over or different. The triggers keep it in step with
    every write; this is for a database loaded or restored with triggers
    off (``manage.py pool_order_rebuild``). On PostgreSQL the table is
    locked against writes meanwhile: a lease start waits for it (a few
    milliseconds for thousands of accounts), and none is lost."""
    with transaction.atomic():
        if backend.postgres:
            with connection.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {PoolOrder._meta.db_table} IN EXCLUSIVE MODE")
        expected = _pool_order_expected()
        actual = {
            (scope, account): tuple(rest)
            for scope, account, *rest in PoolOrder.objects.values_list("scope_id", "account_id", *_ORDER_COLUMNS)
        }
        wrong = {key for key in expected.keys() | actual.keys() if expected.get(key) != actual.get(key)}
        if wrong:
            PoolOrder.objects.all().delete()
            PoolOrder.objects.bulk_create(
                PoolOrder(scope_id=scope, account_id=account, **dict(zip(_ORDER_COLUMNS, row, strict=True)))
                for (scope, account), row in expected.items()
            )
            logger.warning("pool order: %d row(s) were wrong; rebuilt", len(wrong))
    return len(wrong)


def _pool_order_expected() -> dict[tuple[int, int], tuple]:
    """Every ``PoolOrder`` row, as the triggers write it, by (scope, account)."""
    memberships: dict[int, list[int]] = {}
    for group, account in AccountGroup.accounts.through.objects.values_list("accountgroup_id", "account_id"):
        memberships.setdefault(account, []).append(group)
    rows = {}
    accounts = Account.objects.values_list(
        "pk",
        "enabled",
        "pool",
        "identity__account_rows",
        "binding_rows",
        "identity__last_started_at",
        "remaining_credits",
        "name",
    )
    for pk, enabled, pool, aliases, bindings, started, credits, name in accounts:
        plain = pool == selection.POOL_BALANCED and aliases <= 1
        credits_sort = -(credits if credits is not None else selection.UNKNOWN_BALANCED_CREDITS)
        row = (enabled, plain, bindings, started, credits_sort, name)
        for scope in (PoolOrder.ALL_ACCOUNTS, *memberships.get(pk, ())):
            rows[(scope, pk)] = row
    return rows
