"""Leases ended by an operator's edit rather than by their completion or
their TTL: a key that may no longer be used (disabled, expired, deleted)
has its open leases closed at once, and a deleted identity gives back the
key slots of the open leases that go with it. Called from
``routing/signals.py``, in the edit's own transaction, and by the
periodic reaper (``tasks.lease_reap``) for what an edit could not see.
The leases are closed and their slots given back as the reaper closes
them (``slots.leases_close``), in the same lock order."""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import ApiKey, KeySlot
from routing import slots, wakeups
from routing.models import Lease


def identity_slots_release(*, identity_id: int) -> int:
    """Inside the transaction that deletes the identity, and with it its
    leases (``Lease.identity`` cascades): give back the key slots its open
    leases hold, which would otherwise stay taken, their keys refused at
    their limit, until the reconcile task finds them. The leases are locked
    first, as a completion locks its lease before its slot: one completed
    meanwhile is left out (its completion freed its slot, which another
    lease may hold by now). Returns how many slots were given back."""
    held = Lease.objects.filter(completed_at__isnull=True, identity_id=identity_id, key_slot__isnull=False)
    slot_ids = sorted(held.select_for_update().order_by("pk").values_list("key_slot_id", flat=True))
    freed = KeySlot.objects.filter(pk__in=slot_ids).update(taken=False)
    if freed:
        wakeups.release_notify()
    return freed


KEY_REVOKED = "closed: its API key was disabled, expired or deleted"


def key_leases_close(*, key_ids: list[int]) -> int:
    """In the transaction that disables, expires or deletes these keys,
    before it writes their rows: close their open leases (``expired``) and
    give back the identity and key slots they hold. Their gateways could no
    longer complete them (refused 401), so each held its identity's slot
    until its TTL, keeping the other keys off it. A completion that held a
    lease meanwhile is waited for and wins; the gateway's later completion
    of a closed lease is the 409 of any closed lease. Locks leases, then
    slots, then identities (the reaper's order); the keys' rows after."""
    open_leases = Lease.objects.filter(completed_at__isnull=True, api_key_id__in=key_ids)
    while True:
        with transaction.atomic():  # its own for a save outside one (the shell), else a savepoint
            rows = list(open_leases.select_for_update().order_by("pk").values_list("id", "identity_id", "key_slot_id"))
            if not rows:
                return 0
            closed = slots.leases_close(rows, now=timezone.now(), error_message=KEY_REVOKED)
            if closed == len(rows):
                return closed
            # A completion closed one between the read and the update (SQLite,
            # which locks no row): again, without it.
            transaction.set_rollback(True)


def key_leases_close_revoked(*, now: datetime | None = None) -> int:
    """The reaper's sweep for what :func:`key_leases_close` could not see:
    leases of keys no longer usable that were claimed after the key's edit
    by a dispatch that had read the key before it, or whose key was disabled
    or expired in SQL or by a queryset ``update``. Closed and their slots
    given back as the edit would have done, a minute later at most."""
    revoked = ApiKey.objects.filter(Q(enabled=False) | Q(expires_at__lte=now or timezone.now()))
    key_ids = list(revoked.order_by("pk").values_list("pk", flat=True))
    return key_leases_close(key_ids=key_ids) if key_ids else 0


def key_leases_shorten(*, key_id: int, expires_at: datetime) -> int:
    """A key's expiry moved: its open leases end by it at the latest, as a
    lease granted now would (:func:`lease_new`)."""
    later = Lease.objects.filter(completed_at__isnull=True, api_key_id=key_id, expires_at__gt=expires_at)
    shortened = later.update(expires_at=expires_at)
    if shortened:
        wakeups.release_notify()  # a waiter's wake-up at the first lease expiry comes sooner
    return shortened
