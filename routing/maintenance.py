"""The periodic tasks' writes (``routing/tasks.py``): the latency snapshot,
the prunes, and the reconciliation of the hot counters; and the rebuild of
the order table, an operator's command.

Each is idempotent and safe to run in several workers at once: rows are
deleted in bounded batches by id, every delete re-checks its condition, and
a counter is only ever corrected under its row's lock, from a count taken
after the lock is held. Maintenance yields to the hot path: on PostgreSQL a
batch that waits for a row lock longer than ``LOCK_TIMEOUT`` gives up and is
retried (or left to the next run), so a dispatch or a completion never
waits behind it for long, nor ends in a deadlock with it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import Count, Exists, F, Model, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone

from accounts.models import Account, AccountGroup, KeySlot, RoutingIdentity
from routing import pg, selection
from routing.backend import backend
from routing.latency import SNAPSHOT_WINDOW, SampleGroup, latency_snapshot_build
from routing.models import (
    AccountLatency,
    CooldownEvent,
    CounterDrift,
    LatencySample,
    LatencySnapshot,
    Lease,
    PoolOrder,
    ProxyLatency,
    SessionBinding,
    WaitTicket,
)
from routing.selectors import rules
from routing.selectors.counts import count_subquery
from routing.selectors.latency import latency_snapshot_cache_clear

logger = logging.getLogger(__name__)

# Rows deleted per transaction: bounds how long a run holds its locks and how
# much one statement writes.
BATCH = 1000
# Order rows whose bands one transaction writes: how long a lease start may
# wait for a row a refresh holds (about 10 ms for 200 rows).
BANDS_BATCH = 200
# Well under PostgreSQL's deadlock_timeout (1 s), so in a lock cycle with a
# dispatch or a completion it is always the maintenance batch that backs off.
LOCK_TIMEOUT = "200ms"
RETRIES = 3
# Snapshot rows kept: a short history for the admin, and the tables stay small.
SNAPSHOTS_KEPT = 10


def lock_timeout_local() -> None:
    """In the current transaction, give up on a row lock after ``LOCK_TIMEOUT`` (PostgreSQL)."""
    if backend.postgres:
        pg.lock_timeout_set(LOCK_TIMEOUT)


# --- latency -------------------------------------------------------------------------


def latency_snapshot_refresh(*, now: datetime | None = None) -> LatencySnapshot:
    """Aggregate the samples of the last ``SNAPSHOT_WINDOW`` into a new
    snapshot, and drop all but the newest ``SNAPSHOTS_KEPT``."""
    now = now or timezone.now()
    # Summed by the database, one row per account and proxy URL: at 100
    # samples a second, reading the hour's 360,000 rows into this process
    # took 0.66 s a run, 0.35 s of it this process's CPU (bench/HISTORY.md).
    groups = (
        LatencySample.objects.filter(recorded_at__gt=now - SNAPSHOT_WINDOW, recorded_at__lte=now)
        .order_by()
        .values_list("account_id", "proxy_url")
        .annotate(total_ms=Sum("first_token_ms"), samples=Count("*"))
    )
    built = latency_snapshot_build(itertools.starmap(SampleGroup, groups), generated_at=now)
    with transaction.atomic():
        snapshot = LatencySnapshot.objects.create(
            generated_at=now,
            window_seconds=int(SNAPSHOT_WINDOW.total_seconds()),
            global_avg_ms=built.global_avg_ms,
            sample_count=sum(stats.samples for stats in built.accounts.values()),
        )
        # An account deleted since its samples were taken has none left (the
        # samples cascade), so every id here still exists.
        g = built.global_avg_ms
        AccountLatency.objects.bulk_create(
            AccountLatency(
                snapshot=snapshot,
                account_id=account_id,
                samples=stats.samples,
                avg_ms=stats.avg_ms,
                score_part=selection.account_score_part(stats, g),
            )
            for account_id, stats in built.accounts.items()
        )
        ProxyLatency.objects.bulk_create(
            ProxyLatency(
                snapshot=snapshot,
                proxy_id=url,
                samples=stats.samples,
                avg_ms=stats.avg_ms,
                score_part=selection.proxy_score_part(stats, g),
            )
            for url, stats in built.proxies.items()
        )
    # Once the snapshot has committed: written in its transaction, every
    # order row stayed locked until that commit, and every lease start or
    # binding on the pool waited for it (350 ms at 6,424 rows).
    pool_order_bands_write(snapshot)
    stale = list(
        LatencySnapshot.objects.newest_first().values_list("id", flat=True)[SNAPSHOTS_KEPT : SNAPSHOTS_KEPT + BATCH]
    )
    LatencySnapshot.objects.filter(id__in=stale).delete()
    # This process reads the new one at once; others within their cache period.
    latency_snapshot_cache_clear()
    return snapshot


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
    waits, so it never deadlocks with them (:func:`pool_order_bands_complete`
    writes those after). Each row's band is computed again once it is
    locked, so it sees every proxy change committed before; a change still
    in flight waits for the lock and clears the band after this commits (the
    trigger of migration 0009). Without a usable global average no band
    orders, and nothing is written."""
    if snapshot.global_avg_ms is None:
        return 0
    written = _bands_write(snapshot, _to_write(snapshot))
    _bands_whole_mark(snapshot)
    return written


def pool_order_bands_complete(snapshot: LatencySnapshot) -> int:
    """Write the bands under ``snapshot`` of the rows whose band is still
    not its own: those :func:`pool_order_bands_write` skipped, and those
    whose proxy changed since. One row a transaction, each waiting for its
    row up to ``LOCK_TIMEOUT`` (a lease start holds it for milliseconds) and
    holding no other lock meanwhile, so it cannot be part of a deadlock; a
    row held longer is left to the next refresh, and this snapshot's bands
    are not whole (the walk needs every row of a scope to hold the band of
    the snapshot it orders by)."""
    if snapshot.global_avg_ms is None:
        return 0
    return _bands_complete(snapshot, _to_write(snapshot))


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


def latency_sample_prune(*, now: datetime | None = None) -> int:
    """Delete the samples that have left the snapshot window. Returns how many."""
    now = now or timezone.now()
    return _prune(LatencySample, Q(recorded_at__lte=now - SNAPSHOT_WINDOW))


def history_prune(*, now: datetime | None = None) -> int:
    """Delete completed leases and cooldown events older than the retention
    (``KIROPOOL_HISTORY_RETENTION_DAYS``), and the wait tickets a dead
    process left behind, past their expiry; live leases are never touched."""
    now = now or timezone.now()
    before = now - timedelta(days=settings.KIROPOOL_HISTORY_RETENTION_DAYS)
    leases = _prune(Lease, Q(completed_at__isnull=False, completed_at__lte=before))
    events = _prune(CooldownEvent, Q(created_at__lte=before))
    return leases + events + _prune(WaitTicket, Q(expires_at__lte=now))


def _prune(model: type[Model], condition: Q) -> int:
    """Delete ``model`` rows matching ``condition`` in bounded batches by id;
    each delete re-checks the condition, so two runs at once are harmless."""
    total = 0
    while True:
        ids = list(model.objects.filter(condition).order_by("pk").values_list("pk", flat=True)[:BATCH])
        if not ids:
            return total
        deleted, _ = model.objects.filter(condition, pk__in=ids).delete()
        total += deleted
        if len(ids) < BATCH:
            return total


# --- the hot counters ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counter:
    """A counter column and the rows it counts."""

    name: str
    model: type[Model]
    field: str
    counted: QuerySet  # the rows, filtered to those that count
    via: str  # their foreign key to ``model``


def counters() -> tuple[Counter, ...]:
    """One per ``COUNTER_NAMES``."""
    return (
        # Uncompleted leases, expired ones included: the reaper gives their
        # slots back when it closes them, in the same transaction.
        Counter(
            "identity_in_flight",
            RoutingIdentity,
            "in_flight",
            Lease.objects.filter(completed_at__isnull=True),
            "identity",
        ),
        Counter("account_binding_rows", Account, "binding_rows", SessionBinding.objects.all(), "account"),
        Counter("identity_account_rows", RoutingIdentity, "account_rows", Account.objects.all(), "identity"),
    )


def counters_reconcile(*, now: datetime | None = None) -> dict[str, int]:
    """Recompute every hot counter from the rows it counts, and every key
    slot from the lease holding it, and set right any that drifted. Returns
    the total drift found per counter (0: all true); drift is logged and
    added to ``CounterDrift`` (exported on /metrics)."""
    now = now or timezone.now()
    found = {}
    for counter in counters():
        found[counter.name] = _drift_record(
            counter.name, [_reconcile_one(counter, pk) for pk in _suspects(counter)], now=now
        )
    found["key_in_flight"] = _drift_record(
        "key_in_flight", [_key_slot_reconcile(pk) for pk in _key_slot_suspects()], now=now
    )
    return found


def _drift_record(name: str, corrections: list[int], *, now: datetime) -> int:
    """Log and count the rows of one counter set right (``corrections``: each
    suspect row's drift, 0 where it was true after all); returns the total."""
    drift, rows = sum(corrections), sum(1 for n in corrections if n)
    if drift:
        logger.warning("counter drift: %s was off by %d on %d row(s); corrected", name, drift, rows)
        with transaction.atomic():
            record, _ = CounterDrift.objects.select_for_update().get_or_create(counter=name)
            CounterDrift.objects.filter(pk=record.pk).update(
                corrections=F("corrections") + rows, total=F("total") + drift, last_seen_at=now
            )
    return drift


def _suspects(counter: Counter) -> list[int]:
    """Rows whose counter disagrees with a count taken without locks: only
    these are checked again under their lock (most runs find none)."""
    count = count_subquery(counter.counted.filter(**{counter.via: OuterRef("pk")}), counter.via)
    return list(
        counter.model.objects.annotate(counted=count)
        .exclude(**{counter.field: F("counted")})
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def _reconcile_one(counter: Counter, pk: int) -> int:
    """Under the row's lock, count again and set the counter. Returns |drift|.

    The lock makes it exact: a claim or a completion changes the counter in
    the same transaction as the row it counts, so while we hold the lock
    every such change is either committed (and counted) or waiting for us."""
    try:
        with transaction.atomic():
            lock_timeout_local()
            current = (
                counter.model.objects.select_for_update().filter(pk=pk).values_list(counter.field, flat=True).first()
            )
            if current is None:
                return 0
            actual = counter.counted.filter(**{counter.via: pk}).count()
            if actual == current:
                return 0
            counter.model.objects.filter(pk=pk).update(**{counter.field: actual})
            return abs(actual - current)
    except OperationalError:
        if not backend.postgres:
            raise
        return 0  # the row is busy on the hot path: the next run looks again


def _slot_held():
    """Whether an open lease holds the slot (the key's open leases, by index)."""
    return Exists(Lease.objects.filter(completed_at__isnull=True, api_key=OuterRef("api_key"), key_slot=OuterRef("pk")))


def _key_slot_suspects() -> list[int]:
    """Slots taken with no open lease on them, or free under one, as read
    without locks (``key_in_flight`` counts the taken ones)."""
    return list(
        KeySlot.objects.annotate(held=_slot_held()).exclude(taken=F("held")).order_by("pk").values_list("pk", flat=True)
    )


def _key_slot_reconcile(pk: int) -> int:
    """Under the slot's lock, set it taken exactly when an open lease holds
    it. Returns 1 when it was wrong. Exact for the same reason as
    :func:`_reconcile_one`: a claim takes the slot and inserts its lease in
    one transaction, and a completion closes the lease and frees its slot in
    one, so while the lock is held neither is half seen."""
    try:
        with transaction.atomic():
            lock_timeout_local()
            slot = KeySlot.objects.select_for_update().filter(pk=pk).annotate(held=_slot_held()).first()
            if slot is None or slot.taken == slot.held:
                return 0
            KeySlot.objects.filter(pk=pk).update(taken=slot.held)
            return 1
    except OperationalError:
        if not backend.postgres:
            raise
        return 0


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
