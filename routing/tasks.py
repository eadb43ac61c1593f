"""Periodic maintenance (SPEC §4), scheduled by ``CELERY_BEAT_SCHEDULE`` in
settings. Each task takes no arguments, calls one service and is safe to run
twice at once; the services explain how. The return values only feed the
worker's log."""

from __future__ import annotations

from celery import shared_task

from routing import maintenance, quotas, revocations, sessions, slots


@shared_task
def latency_snapshot_refresh() -> int:
    """Rebuild the latency snapshot from the last hour of samples."""
    return maintenance.latency_snapshot_refresh().sample_count


@shared_task
def binding_purge() -> dict[str, int]:
    """Delete expired session bindings, then enforce the capacity."""
    expired, evicted = sessions.binding_purge()
    return {"expired": expired, "evicted": evicted}


@shared_task
def lease_reap() -> int:
    """Close leases past their TTL, and those of keys no longer usable, and
    give their slots back."""
    return slots.lease_reap_expired(lock_timeout=True) + revocations.key_leases_close_revoked()


@shared_task
def latency_sample_prune() -> int:
    """Delete latency samples older than the snapshot window."""
    return maintenance.latency_sample_prune()


@shared_task
def history_prune() -> int:
    """Delete completed leases and cooldown events past the retention."""
    return maintenance.history_prune()


@shared_task
def counters_reconcile() -> dict[str, int]:
    """Recompute the hot counters from the rows they count; fix and report drift."""
    return maintenance.counters_reconcile()


@shared_task
def quota_resets_apply() -> int:
    """Return to selection the accounts whose quota reset time has come."""
    return quotas.quota_resets_apply()
