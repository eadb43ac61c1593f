"""A lease's slot on its identity and its key: claimed atomically with the
lease row, held for a sticky session waiting on the identity, refused at
once when the key is at its own limit, and given back by the reaper when a
lease outlives its TTL. ``leases.py`` decides which slot to take; this module
takes it. Keyword-only, typed, atomic.

- A slot on an identity is claimed with one conditional ``UPDATE`` whose
  condition (``rules.identity_claimable``: a free slot, no cooldown, pacing
  allows) PostgreSQL re-evaluates on the row once it holds its lock, so two
  gateways never push an identity past ``max_concurrency``.
- A key's limit is held in slot rows (``accounts.KeySlot``): a claim takes
  a free one, skipping those another transaction holds locked, so it never
  waits on one, and a completion frees only its own. Rows are made on
  demand, up to the key's limit (:func:`key_slots_grow`).
- Row locks are always taken in the same order: lease, then key slot (or
  the key's row, for its pacing), then identities by id. Dispatch locks
  slot (or key) then identity; completion and the reaper lock lease, slot,
  identity. No cycle, so no deadlock between them.
- Releases wake waiting dispatches in every process (``routing/wakeups.py``).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import Case, Exists, F, Q, Value, When
from django.utils import timezone

from accounts.models import Account, ApiKey, KeySlot, RoutingIdentity
from core.errors import KeyRefused, RateLimited
from routing import batches, readiness, waiting, wakeups
from routing.backend import backend
from routing.dispatch import CandidateRow, DispatchRequest, LeaseGrant
from routing.models import LEASE_OPEN, CooldownEvent, CooldownKind, Lease, LeaseOutcome, LeaseReapMark, StickyOutcome
from routing.selectors import rules

# --- claim ---------------------------------------------------------------------------


def identity_hold(*, identity_id: int, until: datetime) -> None:
    """Hold one of the identity's slots for a waiting sticky session until
    ``until`` at the latest (a hold that lapsed counts as none)."""
    now = timezone.now()
    live = Q(sticky_wait_until__gt=now)
    RoutingIdentity.objects.filter(pk=identity_id).update(
        sticky_waiters=Case(When(live, then=F("sticky_waiters") + 1), default=Value(1)),
        sticky_wait_until=Case(
            When(live & Q(sticky_wait_until__gt=until), then=F("sticky_wait_until")), default=Value(until)
        ),
    )


def identity_unhold(*, identity_id: int, leased: bool) -> None:
    """Give back a hold taken by :func:`identity_hold`. A hold given up
    without a lease (the session's patience ran out, or its account cooled)
    frees a slot that new sessions counted as taken: that wakes waiting
    dispatches, as a release does. One that became the session's lease
    frees nothing."""
    RoutingIdentity.objects.filter(pk=identity_id, sticky_waiters__gt=0).update(sticky_waiters=F("sticky_waiters") - 1)
    if not leased:
        wakeups.release_notify()


def key_cap(key: ApiKey) -> int | None:
    """How many leases the key may hold at once: its own limit, else the
    default every key gets (``KIROPOOL_KEY_MAX_CONCURRENCY``, 0 = none), so
    one gateway cannot take every slot of the pool. None: not counted."""
    if key.max_concurrency is not None:
        return key.max_concurrency
    return settings.KIROPOOL_KEY_MAX_CONCURRENCY or None


def key_limits_check(*, key: ApiKey, now: datetime, counters: tuple[int, datetime | None] | None = None) -> None:
    """The key's own limits come first and never wait (SPEC §2).

    ``counters`` are the key's ``in_flight`` and ``last_started_at`` as read
    now. Without them the key is as authenticated, possibly a moment old
    (``accounts.authentication.KeyCache``), and only its pacing is checked:
    an old ``last_started_at`` can only be earlier, so it never refuses
    wrongly, where an old count could. The claims take the key's slot
    atomically either way; :func:`key_limits_recheck` runs before a wait."""
    in_flight, last_started_at = counters if counters is not None else (None, key.last_started_at)
    cap = key_cap(key)
    if in_flight is not None and cap is not None and in_flight >= cap:
        raise RateLimited("this API key is at its concurrency limit", retry_after=1)
    if key.min_start_interval_ms and last_started_at is not None:
        ready_at = last_started_at + timedelta(milliseconds=key.min_start_interval_ms)
        if now < ready_at:
            raise RateLimited(
                "this API key is at its pacing limit", retry_after=readiness.retry_after_seconds(ready_at - now)
            )


# How often a waiting dispatch reads its key again, to be refused once an
# operator disabled, deleted or expired it: a second's grace, and at most
# one query a second for each waiter (a release wakes them all).
KEY_RECHECK_SECONDS = 1.0


def key_limits_recheck(*, key: ApiKey, visit: waiting.Visit) -> None:
    """Before a dispatch first waits for a slot: the key's limits with its
    counters as they are now, so a key at its own limit is refused at once
    rather than after a wait (one query, on the waiting path only); a key
    no longer usable is refused (401), as after a wait
    (:func:`key_usable_recheck`)."""
    if not visit.admitted:
        row = _key_read(key=key, visit=visit)
        cap = key_cap(key)
        if cap is not None and row.held_slots >= cap and lease_reap_expired(key_id=key.pk):
            row = _key_read(key=key, visit=visit)  # its leases past their TTL no longer count
        key_limits_check(key=key, now=timezone.now(), counters=(row.held_slots, row.last_started_at))


def key_usable_recheck(*, key: ApiKey, visit: waiting.Visit) -> None:
    """After a wait, before the dispatch walks again: the key may still be
    used, read at most every ``KEY_RECHECK_SECONDS``. A key disabled,
    deleted or expired while its dispatch waited is refused (401), not
    granted a lease its gateway could no longer complete."""
    if time.monotonic() - visit.key_read_at >= KEY_RECHECK_SECONDS:
        _key_read(key=key, visit=visit)


def _key_read(*, key: ApiKey, visit: waiting.Visit) -> ApiKey:
    """The key's row as it is now, with its slots held (``held_slots``);
    refused (401) when it may no longer be used."""
    visit.key_read_at = time.monotonic()
    row = _key_now(key)
    if row is None or not row.is_usable():
        raise KeyRefused()
    return row


def key_counters(key: ApiKey) -> tuple[int, datetime | None]:
    """The key's ``in_flight`` and ``last_started_at`` as they are now (a
    key deleted a moment ago has none: its claims find no row to take)."""
    row = _key_now(key)
    return (0, None) if row is None else (row.held_slots, row.last_started_at)


def _key_now(key: ApiKey) -> ApiKey | None:
    """The key's row as it is now, with its slots held (``held_slots``)."""
    current = ApiKey.objects.filter(pk=key.pk).annotate(held_slots=KeySlot.held())
    return current.only("enabled", "expires_at", "last_started_at").first()


# Slot rows a key gets at first; each growth after that doubles them, up to its limit.
KEY_SLOTS_FIRST = 64


def key_slots_grow(*, key_id: int, cap: int) -> bool:
    """After a claim found no free slot of the key: make more of its slot
    rows below ``cap`` (a key reaching a count it never had: up to
    ``KEY_SLOTS_FIRST`` at first, then twice as many as it has, so a huge
    limit costs rows only as the key uses them), and say whether the claim
    should try once more: rows were missing, or one is free by now (another
    process made them a moment after the claim read). Rows are numbered from
    0 without gaps, so those below ``cap`` are the first ``have``."""
    slots = KeySlot.objects.filter(api_key_id=key_id, number__lt=cap)
    have = slots.count()
    if have < cap:
        numbers = range(have, min(cap, max(2 * have, KEY_SLOTS_FIRST)))
        KeySlot.objects.bulk_create([KeySlot(api_key_id=key_id, number=n) for n in numbers], ignore_conflicts=True)
        return True
    return slots.filter(taken=False).exists()


def key_slots_free(*, key_id: int, cap: int) -> bool:
    """After a claim found no free slot of the key, outside its transaction:
    more of its rows (:func:`key_slots_grow`), or else its leases past their
    TTL closed and their slots given back. Such a lease stops counting at
    its TTL (SPEC §2), for the key as for its identity, not when the reaper
    next runs (never, while no task runs: SPEC §4). Whether the claim
    should try once more."""
    return key_slots_grow(key_id=key_id, cap=cap) or lease_reap_expired(key_id=key_id) > 0


class KeyFull(Exception):
    """Inside a claim's transaction: the key has no free slot below its
    limit. The claim rolls back; its caller answers 429 unless the key's
    expired leases free one (:func:`key_slots_free`)."""


def lease_new(
    *, key: ApiKey, request: DispatchRequest, now: datetime, waited_ms: int, row: CandidateRow | None = None
) -> Lease:
    """The lease row a claim inserts (``row``: the account it is on, when known)."""
    candidate = row.candidate if row is not None else None
    return Lease(
        id=uuid.uuid4(),
        api_key=key,
        account_id=row.account_id if row else None,
        account_name=candidate.account if candidate else "",
        identity_id=row.identity_id if row else None,
        proxy_url=(candidate.proxy_url or "") if candidate else "",
        session_id=request.session_id or "",
        model=request.model or "",
        started_at=now,
        expires_at=lease_expiry(key, now),
        waited_ms=waited_ms,
    )


def lease_expiry(key: ApiKey, now: datetime) -> datetime:
    """A lease's TTL, ending no later than its key: past the key's expiry its
    gateway can no longer complete it (401), so it stops counting then."""
    expires_at = now + timedelta(seconds=settings.KIROPOOL_LEASE_TTL_SECONDS)
    return expires_at if key.expires_at is None else min(expires_at, key.expires_at)


def grant(lease: Lease) -> LeaseGrant:
    return LeaseGrant(
        id=lease.id,
        account_id=lease.account_id,
        identity_id=lease.identity_id,
        started_at=lease.started_at,
        expires_at=lease.expires_at,
    )


def slot_claim(
    *,
    key: ApiKey,
    row: CandidateRow,
    request: DispatchRequest,
    waited_ms: int,
    sticky: StickyOutcome | None = None,
    bound: str | None = None,
) -> LeaseGrant | None:
    """Claim one slot on the row's identity (and the key) and create the lease,
    atomically. None when the identity cannot start a lease at this instant.
    ``sticky``: what this lease is to a bound session; its own bound account
    (hit, waited) may use the slots held for waiting sticky sessions.
    ``bound``: the account the session was bound to, recorded when it moves."""
    if row.expired_leases:
        lease_reap_expired(identity_ids=[row.identity_id])
    now = timezone.now()
    lease = lease_new(key=key, request=request, now=now, waited_ms=waited_ms, row=row)
    lease.sticky = sticky or ""
    if sticky == StickyOutcome.MOVED:
        lease.moved_from = bound or ""
    probe = row.candidate.quota_probe
    cap = key_cap(key)
    own = sticky in (StickyOutcome.HIT, StickyOutcome.WAITED)
    if backend.statements is not None and not key.min_start_interval_ms and not probe:
        claim = backend.statements.claim(lease, key_cap=cap, reserved=not own)
        if claim.key_full and key_slots_free(key_id=key.pk, cap=cap):
            claim = backend.statements.claim(lease, key_cap=cap, reserved=not own)
        if claim.key_full:
            raise _key_full()  # its limits never wait
        return grant(lease) if claim.leased else None
    attempt = partial(_slot_claim_orm, key=key, row=row, lease=lease, now=now, cap=cap, probe=probe, own=own)
    try:
        return attempt()
    except KeyFull:
        # Outside the claim's transaction, which locked the identity:
        # closing the key's expired leases locks leases, then identities,
        # the reaper's order.
        if not key_slots_free(key_id=key.pk, cap=cap):
            raise _key_full() from None
    try:
        return attempt()
    except KeyFull:
        raise _key_full() from None


def _key_full() -> RateLimited:
    return RateLimited("this API key is at its concurrency limit", retry_after=1)


def _slot_claim_orm(
    *, key: ApiKey, row: CandidateRow, lease: Lease, now: datetime, cap: int | None, probe: bool, own: bool
) -> LeaseGrant | None:
    """:func:`slot_claim` as ORM services, in one transaction."""
    claimable = rules.identity_claimable(now, settings.KIROPOOL_SLOW_START_SECONDS, reserved=not own)
    with transaction.atomic():
        # The identity first, locked while it can start, as pg._claim_sql
        # does: the key's slot and pacing are taken only for a claim that
        # can happen, and not held while this waits for the identity's row.
        identity = RoutingIdentity.objects.select_for_update(no_key=True).filter(claimable, pk=row.identity_id)
        if identity.values_list("pk", flat=True).first() is None:
            return None
        if cap is not None or key.min_start_interval_ms:
            lease.key_slot_id = key_slot_claim(key=key, now=now, cap=cap)
        if probe and not quota_probe_take(identity_id=row.identity_id, now=now):
            transaction.set_rollback(True)
            return None
        RoutingIdentity.objects.filter(pk=row.identity_id).update(in_flight=F("in_flight") + 1, last_started_at=now)
        lease.quota_probe = probe
        lease.save(force_insert=True)
    return grant(lease)


def quota_probe_take(*, identity_id: int, now: datetime) -> bool:
    """Take the identity's probe (one lease through its spent quota) and
    restart the wait for the next one; False when another dispatch took it."""
    later = now + timedelta(seconds=settings.KIROPOOL_QUOTA_PROBE_SECONDS)
    taken = Account.objects.filter(identity_id=identity_id, quota_next_probe_at__lte=now).update(
        quota_next_probe_at=later
    )
    if taken:
        CooldownEvent.objects.create(
            kind=CooldownKind.QUOTA_PROBE,
            identity_id=identity_id,
            reason="one lease let through to see whether the quota came back",
            until=later,
            created_at=now,
        )
    return bool(taken)


def key_slot_claim(*, key: ApiKey, now: datetime, cap: int | None) -> int | None:
    """Inside the claim's transaction: the key's pacing (on its row) and one
    of its free slots when ``cap`` counts its leases. Returns the slot's id;
    429 when the key is at its pacing limit, :class:`KeyFull` at its
    concurrency limit."""
    if key.min_start_interval_ms:
        ready = Q(last_started_at__isnull=True) | Q(
            last_started_at__lte=now - timedelta(milliseconds=key.min_start_interval_ms)
        )
        if not ApiKey.objects.filter(ready, pk=key.pk).update(last_started_at=now):
            key_limits_check(key=key, now=now, counters=key_counters(key))  # says which limit
            raise RateLimited("this API key is at its pacing limit", retry_after=1)
    if cap is None:
        return None
    slot_id = _key_slot_take(key_id=key.pk, cap=cap)
    if slot_id is None and key_slots_grow(key_id=key.pk, cap=cap):
        slot_id = _key_slot_take(key_id=key.pk, cap=cap)
    if slot_id is None:
        raise KeyFull()
    return slot_id


def _key_slot_take(*, key_id: int, cap: int) -> int | None:
    """The ORM twin of ``pg._free_slot_cte``, inside the claim's transaction:
    a free slot below ``cap``, skipping those other transactions hold
    locked; none while one at or above ``cap`` is held. (SQLite cannot lock
    a row, but its transactions here take the write lock at BEGIN.)"""
    slots = KeySlot.objects.filter(api_key_id=key_id)
    over = slots.filter(taken=True, number__gte=cap)
    free = slots.filter(~Exists(over), taken=False, number__lt=cap).order_by("number")
    slot_id = free.select_for_update(skip_locked=True).values_list("pk", flat=True).first()
    if slot_id is not None:
        KeySlot.objects.filter(pk=slot_id).update(taken=True)
    return slot_id


# --- reap --------------------------------------------------------------------------

# Leases closed per transaction by the reaper; bounds how long it holds locks.
REAP_BATCH = 1000


def lease_reap_expired(
    *,
    now: datetime | None = None,
    identity_ids: list[int] | None = None,
    key_id: int | None = None,
    lock_timeout: bool = False,
) -> int:
    """Close leases past their TTL and give their slots back. Safe to run in
    several processes at once: each lease is closed by exactly one of them.
    With ``lock_timeout`` (the periodic task) a batch that waits too long for
    a row lock gives way to the hot path; the next run finishes the job.
    ``identity_ids`` / ``key_id``: only the leases on those identities, or
    of that key.

    A run over every identity that goes through to the end moves the reap
    mark (``LeaseReapMark``) up to the time it ran at: the reads' probe for
    unreaped leases starts there (``routing/selectors/reaped.py``). A run
    for some identities or one key, or one that gave way, leaves it."""
    started = timezone.now()
    now = now or started
    total = 0
    while True:
        try:
            with transaction.atomic():
                if lock_timeout:
                    batches.lock_timeout_local()
                closed, found = _reap_batch(now=now, identity_ids=identity_ids, key_id=key_id)
        except OperationalError:
            if not (lock_timeout and backend.postgres):
                raise
            return total
        if closed is None:
            continue  # a completion won a lease between our read and update: redo the batch
        total += closed
        if found < REAP_BATCH:
            if identity_ids is None and key_id is None:
                # Never past the clock: a run asked to close what will have
                # expired by a later ``now`` has not seen the leases to come.
                lease_reap_mark_advance(min(now, started))
            return total


def lease_reap_mark_advance(reaped_through: datetime) -> None:
    """Record that every lease that expired by ``reaped_through`` is closed;
    the mark only moves forward."""
    mark, created = LeaseReapMark.objects.get_or_create(pk=1, defaults={"reaped_through": reaped_through})
    if not created:
        LeaseReapMark.objects.filter(pk=mark.pk, reaped_through__lt=reaped_through).update(
            reaped_through=reaped_through
        )


def _reap_batch(*, now: datetime, identity_ids: list[int] | None, key_id: int | None) -> tuple[int | None, int]:
    expired = Lease.objects.filter(completed_at__isnull=True, expires_at__lte=now)
    if identity_ids is not None:
        expired = expired.filter(identity_id__in=identity_ids)
    if key_id is not None:
        expired = expired.filter(api_key_id=key_id)
    rows = list(
        expired.select_for_update(skip_locked=True)
        .order_by("expires_at")
        .values_list("id", "identity_id", "key_slot_id")[:REAP_BATCH]
    )
    if not rows:
        return 0, 0
    closed = leases_close(rows, now=now)
    if closed != len(rows):
        transaction.set_rollback(True)
        return None, len(rows)
    return closed, len(rows)


def leases_close(rows: list[tuple[uuid.UUID, int, int | None]], *, now: datetime, error_message: str = "") -> int:
    """Close leases locked by the caller, given as (id, identity, key slot),
    as ``expired``, and give back their identity's and key's slots. Returns
    how many were still open; fewer than given gives nothing back (the
    caller rolls back and reads again)."""
    ids = [lease_id for lease_id, *_ in rows]
    why = {"error_message": error_message} if error_message else {}
    closed = Lease.objects.filter(LEASE_OPEN, id__in=ids).update(completed_at=now, outcome=LeaseOutcome.EXPIRED, **why)
    if closed != len(ids):
        return closed
    KeySlot.objects.filter(pk__in=sorted(slot for _, _, slot in rows if slot is not None)).update(taken=False)
    identities = Counter(identity_id for _, identity_id, _ in rows)
    for identity_id in sorted(identities):
        RoutingIdentity.objects.filter(pk=identity_id).update(in_flight=F("in_flight") - identities[identity_id])
    wakeups.release_notify()
    return closed
