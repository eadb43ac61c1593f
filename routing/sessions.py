"""Writes of session affinity (SPEC §3): bind, unbind, purge.

``Account.binding_rows`` follows every insert, delete and re-pointing of a
binding through database triggers (see the migration), so none of these
writes touches a counter itself, and a cascade or a bulk delete cannot make
it drift."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import Count, Q
from django.utils import timezone

from accounts.models import Account, ApiKey
from routing import batches
from routing.backend import backend
from routing.models import SessionBinding


def binding_expiry(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.KIROPOOL_AFFINITY_TTL_SECONDS)


def session_bind(*, key: ApiKey, session_id: str, account_id: int, now: datetime | None = None) -> None:
    """Bind (key, session id) → account, refreshing its TTL: one upsert."""
    now = now or timezone.now()
    SessionBinding.objects.bulk_create(
        [
            SessionBinding(
                api_key=key,
                session_id=session_id,
                account_id=account_id,
                created_at=now,
                updated_at=now,
                expires_at=binding_expiry(now),
            )
        ],
        update_conflicts=True,
        unique_fields=["api_key", "session_id"],
        update_fields=["account", "updated_at", "expires_at"],
    )


def session_unbind(*, bindings) -> int:
    """Forget these sessions' affinity (a queryset of bindings): each one's
    next request is routed as a new session. The one way to unbind, for the
    admin, the operator API and the dashboard. Returns how many were bound."""
    deleted, _ = SessionBinding.objects.filter(pk__in=bindings.values("pk")).delete()
    return deleted


def binding_purge(*, now: datetime | None = None, max_entries: int | None = None) -> tuple[int, int]:
    """Delete the expired session bindings, then, over the capacity (SPEC §3),
    evict live ones: first the least recently updated bindings of the keys
    holding more than their share (``KIROPOOL_AFFINITY_KEY_SHARE`` of the
    capacity), the furthest over first, never below their share, so one key
    opening sessions cannot evict the others'; then, if still over, the
    least recently updated of all. Returns (expired, evicted)."""
    now = now or timezone.now()
    limit = max(1, settings.KIROPOOL_AFFINITY_MAX_ENTRIES if max_entries is None else max_entries)
    expired = _bindings_delete(Q(expires_at__lte=now))
    live = SessionBinding.objects.filter(expires_at__gt=now)
    if live.count() <= limit:
        return expired, 0
    # How far over, and each key's count, from one read. Taken from two, a
    # purge that ran between them left this one the excess from before its
    # evictions and the keys' counts after them: it evicted again, below
    # the capacity (down to the key's share).
    per_key = list(live.values("api_key_id").annotate(n=Count("*")).order_by("-n", "api_key_id"))
    over = sum(row["n"] for row in per_key) - limit
    if over <= 0:
        return expired, 0
    share = max(1, int(limit * settings.KIROPOOL_AFFINITY_KEY_SHARE))
    live_now = Q(expires_at__gt=now)
    evicted = 0
    for row in per_key:  # the most first: the loop ends at the first key within its share
        take = min(row["n"] - share, over - evicted)
        if take <= 0:
            break
        evicted += _evict_older_than(live_now & Q(api_key_id=row["api_key_id"]), keep=row["n"] - take)
    return expired, evicted + _evict_older_than(live_now, keep=limit)


def _evict_older_than(bindings: Q, *, keep: int) -> int:
    """Delete all but the ``keep`` most recently updated of these bindings.
    The oldest binding that stays is the keep-th most recently updated;
    deleting older rows never moves that line, so a second purge running at
    the same time draws the same one and evicts nothing extra."""
    ordered = SessionBinding.objects.filter(bindings).order_by("-updated_at", "-id")
    line = list(ordered.values_list("updated_at", "id")[keep - 1 : keep])
    if not line:
        return 0
    updated_at, pk = line[0]
    older = Q(updated_at__lt=updated_at) | Q(updated_at=updated_at, id__lt=pk)
    return _bindings_delete(bindings & older)


def _bindings_delete(condition: Q) -> int:
    total = 0
    while True:
        batch = _bindings_delete_batch(condition)
        if batch is None:  # kept losing lock waits to the hot path: the next run finishes
            return total
        found, deleted = batch
        total += deleted
        if found < batches.BATCH:
            return total


def _bindings_delete_batch(condition: Q) -> tuple[int, int] | None:
    """One batch: (rows found, rows deleted), or None after repeated lock timeouts."""
    for attempt in range(batches.RETRIES):
        try:
            with transaction.atomic():
                batches.lock_timeout_local()
                # SKIP LOCKED: a concurrent purge takes other rows, and a row a
                # completion is re-binding right now is left to the next run.
                rows = list(
                    SessionBinding.objects.filter(condition)
                    .select_for_update(skip_locked=True)
                    .order_by("id")
                    .values_list("id", "account_id")[: batches.BATCH]
                )
                if not rows:
                    return 0, 0
                # The triggers update each binding's account: lock those rows
                # in id order first, so two purges never wait on each other in a
                # cycle. FOR NO KEY UPDATE, all the triggers' updates take: a
                # lease start's foreign-key check on the account does not wait.
                account_ids = sorted({account_id for _, account_id in rows})
                accounts = Account.objects.filter(id__in=account_ids).order_by("id")
                list(accounts.select_for_update(no_key=True).values_list("id"))
                deleted, _ = SessionBinding.objects.filter(condition, id__in=[pk for pk, _ in rows]).delete()
                return len(rows), deleted
        except OperationalError:
            if not backend.postgres:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None
