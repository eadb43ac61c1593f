"""The periodic tasks' writes (``routing/tasks.py``): the latency snapshot,
the prunes, and the reconciliation of the hot counters.

Each is idempotent and safe to run in several workers at once: rows are
deleted in bounded batches by id, every delete re-checks its condition, and
a counter is only ever corrected under its row's lock, from a count taken
after the lock is held. Maintenance yields to the hot path
(``routing/batches.py``). The order table's upkeep, which the refresh
ends with, is ``routing/pool_order.py``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, OperationalError, transaction
from django.db.models import Count, Exists, F, Model, OuterRef, Q, QuerySet, Sum
from django.utils import timezone

from accounts.models import Account, KeySlot, RoutingIdentity
from routing import pg, selection
from routing.backend import backend
from routing.batches import BATCH, RETRIES, lock_timeout_local
from routing.latency import SNAPSHOT_WINDOW, SampleGroup, latency_snapshot_build
from routing.models import (
    AccountLatency,
    CooldownEvent,
    CounterDrift,
    LatencySample,
    LatencySnapshot,
    Lease,
    ProxyLatency,
    SessionBinding,
    WaitTicket,
)
from routing.pool_order import pool_order_bands_write
from routing.selectors.counts import count_subquery
from routing.selectors.latency import latency_snapshot_cache_clear

logger = logging.getLogger(__name__)

# Snapshot rows kept: a short history for the admin, and the tables stay small.
SNAPSHOTS_KEPT = 10


# --- latency -------------------------------------------------------------------------


def latency_snapshot_refresh(*, now: datetime | None = None) -> LatencySnapshot:
    """Aggregate the samples of the last ``SNAPSHOT_WINDOW`` into a new
    snapshot, and drop all but the newest ``SNAPSHOTS_KEPT``."""
    with pg.custom_plans():  # the hour is most of the table: a scan, not its index on time
        snapshot = _latency_snapshot_create(now=now)
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


def _latency_snapshot_create(*, now: datetime | None) -> LatencySnapshot:
    """Read the samples and write their snapshot, one refresh at a time:
    the lock is taken before the read (and ``now`` after it), so of two
    refreshes at once (a slow one and the next beat's, or an operator's) the
    one that reads later commits later, and the newest snapshot, by time and
    by id (the bands go by id, ``pool_order.py``), is the latest read.
    Before, a run that read first and committed last left its older figures
    and bands over the newer ones until the next refresh. On SQLite the
    transaction takes the write lock as it begins (kiropool/settings.py).

    An account deleted after its samples were read takes them with it, and
    its stats row fails the snapshot's commit (its foreign key): then the
    samples are read again, without it, so the other accounts' refresh is
    not lost."""
    for attempt in itertools.count(1):
        try:
            with transaction.atomic():
                if backend.postgres:
                    pg.latency_snapshots_lock()
                at = now or timezone.now()
                return _latency_snapshot_write(_sample_groups(at), now=at)
        except IntegrityError:
            if attempt == RETRIES:
                raise
            logger.info("latency refresh: an account was deleted meanwhile; reading the samples again")


def _sample_groups(now: datetime) -> list[tuple]:
    """The window's samples as (account, proxy URL, total, samples).

    Summed by the database, one row per account and proxy URL: at 100
    samples a second, reading the hour's 360,000 rows into this process
    took 0.66 s a run, 0.35 s of it this process's CPU (bench/HISTORY.md)."""
    return list(
        LatencySample.objects.filter(recorded_at__gt=now - SNAPSHOT_WINDOW, recorded_at__lte=now)
        .order_by()
        .values_list("account_id", "proxy_url")
        .annotate(total_ms=Sum("first_token_ms"), samples=Count("*"))
    )


def _latency_snapshot_write(groups: list[tuple], *, now: datetime) -> LatencySnapshot:
    """The snapshot of ``groups`` (account, proxy URL, total, samples) and
    its stats rows, in the caller's transaction."""
    built = latency_snapshot_build(itertools.starmap(SampleGroup, groups), generated_at=now)
    snapshot = LatencySnapshot.objects.create(
        generated_at=now,
        window_seconds=int(SNAPSHOT_WINDOW.total_seconds()),
        global_avg_ms=built.global_avg_ms,
        sample_count=sum(stats.samples for stats in built.accounts.values()),
    )
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
    return snapshot


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
            taken = KeySlot.objects.select_for_update().filter(pk=pk).values_list("taken", flat=True).first()
            if taken is None:
                return 0
            # Read in a statement of its own, after the lock: a subquery of the
            # locking statement sees the leases as they were before it waited
            # (READ COMMITTED), so a lease completed meanwhile still held it.
            held = KeySlot.objects.filter(_slot_held(), pk=pk).exists()
            if taken == held:
                return 0
            KeySlot.objects.filter(pk=pk).update(taken=held)
            return 1
    except OperationalError:
        if not backend.postgres:
            raise
        return 0
