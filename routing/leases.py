"""Writes of a lease's life: acquire (choose an account, claim a slot),
complete, reap. Keyword-only, typed, atomic.

Concurrency model (shared by every process and host through the database):

- A slot on an identity is claimed with one conditional ``UPDATE`` whose
  condition (``identity_claimable``: a free slot, no cooldown, pacing allows)
  PostgreSQL re-evaluates on the row once it holds its lock, so two gateways
  never push an identity past ``max_concurrency``.
- Row locks are always taken in the same order: lease, then API key, then
  identities by id. Dispatch locks key then identity; completion and the
  reaper lock lease, key, identity. No cycle, so no deadlock between them;
  PostgreSQL's deadlock detector still settles a cycle with the binding
  triggers (two completions re-binding across the same two accounts), and
  the loser is run again.
- Releases wake waiting dispatches in every process (``routing/wakeups.py``).

On PostgreSQL the hottest cases run as one statement each
(``routing/pg.py``, chosen once at startup by ``routing/backend.py``); the
ORM code here is the specification and answers every case.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import datetime, timedelta

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import F, Min, Q
from django.utils import timezone

from accounts.models import Account, ApiKey, Proxy, RoutingIdentity
from kiropool.errors import AllAccountsFailed, Conflict, NotFound, NoUsableAccount, RateLimited
from routing import maintenance, pg, selection, sessions, wakeups
from routing.backend import backend
from routing.dispatch import Acquired, CandidateRow, Completed, Completion, DispatchRequest, LeaseGrant, SessionState
from routing.models import CooldownEvent, CooldownKind, LatencySample, Lease, LeaseOutcome
from routing.selectors import dispatch as reads
from routing.selectors.latency import latency_snapshot_current

# A gateway's rate-limit report cools the identity this long unless it says
# otherwise; the cap keeps a buggy or hostile report from benching an account
# for hours.
DEFAULT_COOLDOWN_SECONDS = 300
MAX_COOLDOWN_SECONDS = 900

# Past a lease's expiry before looking again, so the expired lease no longer counts.
EXPIRY_WAKE_MARGIN_SECONDS = 0.01


# --- acquire -----------------------------------------------------------------------


def lease_acquire(*, key: ApiKey, request: DispatchRequest) -> Acquired:
    """Choose an account for one upstream request and hold a lease on it.

    Waits up to ``request.max_wait_ms`` when every candidate is only locally
    throttled (concurrency or pacing), woken by a release in any process or
    when pacing allows. Raises the typed API errors of SPEC §2 otherwise."""
    _key_limits_check(key=key, now=timezone.now())
    preferred = reads.model_preference(key, request.model)
    if request.session_id and not preferred:
        sticky = _sticky_fast_path(key=key, request=request)
        if sticky is not None:
            return sticky
    deadline = time.monotonic() + request.max_wait_ms / 1000
    waited = 0.0
    while True:
        token = wakeups.token()
        now = timezone.now()
        read = dict(key=key, request=request, now=now, preferred=preferred)
        # Key 3 (fewest bound sessions) applies: the request has a session id
        # and the sticky fast path did not serve it.
        head = reads.read(**read, snapshot=_snapshot(key), spread=bool(request.session_id), head=True)
        session = SessionState.of(request.session_id, head.bound_account_id)
        for row in head.rows:
            if not row.ready:
                break
            grant = _slot_claim(key=key, row=row, request=request, waited_ms=int(waited * 1000))
            if grant is not None:
                sticky_hit = row.account_id == head.bound_account_id
                return Acquired(grant, row, session, waited_ms=int(waited * 1000), sticky_hit=sticky_hit)
        else:
            if len(head.rows) == reads.HEAD_ROWS:
                continue  # every row of the head was taken a moment before us: read again
        if not head.rows:
            raise NoUsableAccount()
        everyone = reads.read(**read, snapshot=None, spread=False).rows
        candidates = [row for row in everyone if not row.excluded]
        if not candidates:
            raise AllAccountsFailed()
        miss = selection.miss_of([row.candidate for row in candidates], now)
        if miss.locally_throttled:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                retry = (miss.next_ready_at - timezone.now()) if miss.next_ready_at else timedelta(seconds=1)
                raise RateLimited(
                    "every candidate account is at its concurrency or pacing limit",
                    retry_after=selection.retry_after_seconds(retry),
                )
            timeout = min(remaining, _wake_in(miss, candidates))
            wait_started = time.monotonic()
            wakeups.wait(token, timeout)
            waited += time.monotonic() - wait_started
            continue
        if miss.shortest_cooldown is not None:
            raise RateLimited(
                "every candidate account is cooling down",
                retry_after=selection.retry_after_seconds(miss.shortest_cooldown),
            )
        raise NoUsableAccount()


def _snapshot(key: ApiKey):
    return latency_snapshot_current() if key.latency_routing_enabled else None


def _wake_in(miss: selection.Miss, candidates: list[CandidateRow]) -> float:
    """Seconds until something other than a release may free a slot: the end
    of a pacing interval, or the expiry of a lease on a full identity (which
    no release announces)."""
    now = timezone.now()
    wake = float("inf")
    if miss.next_ready_at is not None:
        wake = max(0.0, (miss.next_ready_at - now).total_seconds())
    full = {row.identity_id for row in candidates if row.candidate.routing_identity in miss.saturated}
    expiry = _next_lease_expiry(identity_ids=full) if full else None
    if expiry is not None:
        wake = min(wake, (expiry - now).total_seconds() + EXPIRY_WAKE_MARGIN_SECONDS)
    return wake


def _next_lease_expiry(*, identity_ids: set[int]) -> datetime | None:
    """When the first live lease on these identities expires (the waiting path only)."""
    return Lease.objects.filter(
        identity_id__in=identity_ids, completed_at__isnull=True, expires_at__gt=timezone.now()
    ).aggregate(first=Min("expires_at"))["first"]


def _sticky_fast_path(*, key: ApiKey, request: DispatchRequest) -> Acquired | None:
    """SPEC §2's sticky fast path, reading only the bound account: most
    requests of a conversation end here without reading the rest of the pool.
    None when it does not serve: the ordered walk then decides."""
    now = timezone.now()
    read = dict(key=key, request=request, now=now, snapshot=None, spread=False, bound_only=True)
    if backend.statements is not None and not _key_limited(key):
        shape, values = reads.request_shape(**read)
        lease = _lease_new(key=key, request=request, now=now, waited_ms=0)
        row = backend.statements.sticky_claim(shape=shape, values=values, lease=lease)
        if row is None:
            return None
        lease.account_id, lease.identity_id = row.account_id, row.identity_id
        return Acquired(_grant(lease), row, SessionState.STICKY, waited_ms=0, sticky_hit=True)
    bound = reads.read(**read).rows
    if not bound or bound[0].excluded:
        return None
    row = bound[0]
    if not selection.sticky_fast_path_ok(row.candidate, selection.SelectionContext(now=now)):
        return None
    grant = _slot_claim(key=key, row=row, request=request, waited_ms=0)
    if grant is None:
        return None
    return Acquired(grant, row, SessionState.STICKY, waited_ms=0, sticky_hit=True)


def _key_limited(key: ApiKey) -> bool:
    return key.max_concurrency is not None or bool(key.min_start_interval_ms)


def _key_limits_check(*, key: ApiKey, now: datetime) -> None:
    """The key's own limits come first and never wait (SPEC §2)."""
    if key.max_concurrency is not None and key.in_flight >= key.max_concurrency:
        raise RateLimited("this API key is at its concurrency limit", retry_after=1)
    if key.min_start_interval_ms and key.last_started_at is not None:
        ready_at = key.last_started_at + timedelta(milliseconds=key.min_start_interval_ms)
        if now < ready_at:
            raise RateLimited(
                "this API key is at its pacing limit", retry_after=selection.retry_after_seconds(ready_at - now)
            )


def _lease_new(
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
        expires_at=now + timedelta(seconds=settings.KIROPOOL_LEASE_TTL_SECONDS),
        waited_ms=waited_ms,
        counted_on_key=key.max_concurrency is not None,
    )


def _grant(lease: Lease) -> LeaseGrant:
    return LeaseGrant(
        id=lease.id,
        account_id=lease.account_id,
        identity_id=lease.identity_id,
        started_at=lease.started_at,
        expires_at=lease.expires_at,
    )


def _slot_claim(*, key: ApiKey, row: CandidateRow, request: DispatchRequest, waited_ms: int) -> LeaseGrant | None:
    """Claim one slot on the row's identity (and the key) and create the lease,
    atomically. None when the identity has no slot, cooldown or pacing room
    at this instant."""
    if row.expired_leases:
        lease_reap_expired(identity_ids=[row.identity_id])
    now = timezone.now()
    lease = _lease_new(key=key, request=request, now=now, waited_ms=waited_ms, row=row)
    key_limited = _key_limited(key)
    if backend.statements is not None and not key_limited:
        return _grant(lease) if backend.statements.claim(lease) else None
    with transaction.atomic():
        if key_limited:
            _key_slot_claim(key=key, now=now, counted=lease.counted_on_key)
        claimed = RoutingIdentity.objects.filter(reads.identity_claimable(now), pk=row.identity_id).update(
            in_flight=F("in_flight") + 1, last_started_at=now
        )
        if not claimed:
            transaction.set_rollback(True)
            return None
        lease.save(force_insert=True)
    return _grant(lease)


def _key_slot_claim(*, key: ApiKey, now: datetime, counted: bool) -> None:
    condition = Q(pk=key.pk)
    if counted:
        condition &= Q(in_flight__lt=F("max_concurrency"))
    if key.min_start_interval_ms:
        condition &= Q(last_started_at__isnull=True) | Q(
            last_started_at__lte=now - timedelta(milliseconds=key.min_start_interval_ms)
        )
    changes = {"last_started_at": now}
    if counted:
        changes["in_flight"] = F("in_flight") + 1
    if not ApiKey.objects.filter(condition).update(**changes):
        raise RateLimited("this API key is at its concurrency or pacing limit", retry_after=1)


# --- complete ----------------------------------------------------------------------


def lease_complete(*, key: ApiKey, lease_id: uuid.UUID, completion: Completion) -> Completed:
    """Release a lease and apply its outcome (SPEC §2 table). A lease of
    another key is 404; one already completed (or reaped) is 409 and nothing
    changes."""
    if backend.statements is not None and _completion_is_plain(completion):
        now = timezone.now()
        done = _retrying(
            lambda: backend.statements.complete(
                key=key,
                lease_id=lease_id,
                outcome=completion.outcome,
                first_token_ms=completion.first_token_ms,
                error_message=completion.error_message[:2000],
                now=now,
                binding_expires_at=sessions.binding_expiry(now),
            )
        )
        if done is not None:
            wakeups.released_locally()
            return Completed(lease_id, done.account_name, completion.outcome, done.session_bound)
    return _retrying(lambda: _lease_complete(key=key, lease_id=lease_id, completion=completion))


def _completion_is_plain(completion: Completion) -> bool:
    """Outcomes that only release (and maybe record and bind)."""
    return completion.remaining_credits is None and completion.outcome in (
        LeaseOutcome.SUCCESS,
        LeaseOutcome.RETRY_NEXT,
        LeaseOutcome.FATAL,
    )


def _lease_complete(*, key: ApiKey, lease_id: uuid.UUID, completion: Completion) -> Completed:
    lease = (
        Lease.objects.filter(pk=lease_id, api_key=key)
        .only("id", "account_id", "account_name", "identity_id", "proxy_url", "session_id", "counted_on_key")
        .first()
    )
    if lease is None:
        raise NotFound("no such lease for this API key")
    now = timezone.now()
    outcome = completion.outcome
    bound = False
    with transaction.atomic():
        claimed = Lease.objects.filter(pk=lease.pk, completed_at__isnull=True).update(
            completed_at=now,
            outcome=outcome,
            first_token_ms=completion.first_token_ms,
            error_message=completion.error_message[:2000],
        )
        if not claimed:
            raise Conflict("this lease is already completed or expired")
        if lease.counted_on_key:
            ApiKey.objects.filter(pk=key.pk).update(in_flight=F("in_flight") - 1)
        identity_changes: dict = {"in_flight": F("in_flight") - 1}
        cooldown = None
        if outcome == LeaseOutcome.RATE_LIMITED:
            seconds = completion.cooldown_seconds
            seconds = DEFAULT_COOLDOWN_SECONDS if seconds is None else min(seconds, MAX_COOLDOWN_SECONDS)
            cooldown = now + timedelta(seconds=seconds)
            identity_changes.update(cooldown_until=cooldown, cooldown_reason=_reason(completion, "rate limited"))
        RoutingIdentity.objects.filter(pk=lease.identity_id).update(**identity_changes)
        if lease.account_id is not None:
            bound = _outcome_apply(key=key, lease=lease, completion=completion, now=now, cooldown=cooldown)
        _release_notify()
    return Completed(lease.id, lease.account_name, outcome, bound)


# PostgreSQL aborts one of two transactions that wait on each other (two
# completions moving bindings between the same two accounts in opposite
# directions); the loser is simply run again.
_RETRYABLE_SQLSTATES = {"40P01", "40001"}


def _retrying(operation, attempts: int = 3):
    for attempt in range(attempts):
        try:
            return operation()
        except OperationalError as error:
            sqlstate = getattr(getattr(error, "__cause__", None), "sqlstate", None)
            if sqlstate not in _RETRYABLE_SQLSTATES or attempt == attempts - 1:
                raise


def _reason(completion: Completion, default: str) -> str:
    return (completion.error_message or default)[:500]


def _outcome_apply(*, key: ApiKey, lease: Lease, completion: Completion, now: datetime, cooldown) -> bool:
    outcome = completion.outcome
    if completion.remaining_credits is not None:
        credits_changes: dict = {"remaining_credits": completion.remaining_credits}
        if completion.remaining_credits > 0:
            credits_changes.update(quota_exhausted=False, quota_exhausted_at=None, quota_exhausted_reason="")
        Account.objects.filter(pk=lease.account_id).update(**credits_changes)
    if outcome == LeaseOutcome.SUCCESS:
        if completion.first_token_ms is not None:
            LatencySample.objects.create(
                account_id=lease.account_id,
                proxy_url=lease.proxy_url,
                first_token_ms=completion.first_token_ms,
                recorded_at=now,
            )
        if lease.session_id:
            sessions.session_bind(key=key, session_id=lease.session_id, account_id=lease.account_id, now=now)
            return True
    elif outcome == LeaseOutcome.RATE_LIMITED:
        events = [
            CooldownEvent(
                kind=CooldownKind.IDENTITY_COOLDOWN, identity_id=lease.identity_id, account_id=lease.account_id
            )
        ]
        if completion.proxy_failure and lease.proxy_url:
            proxy_ids = list(Proxy.objects.filter(url=lease.proxy_url).values_list("id", flat=True))
            Proxy.objects.filter(id__in=proxy_ids).update(
                cooldown_until=cooldown, cooldown_reason=_reason(completion, "proxy failure")
            )
            events += [CooldownEvent(kind=CooldownKind.PROXY_COOLDOWN, proxy_id=pk) for pk in proxy_ids]
        for event in events:
            event.reason, event.until, event.created_at = _reason(completion, "rate limited"), cooldown, now
        CooldownEvent.objects.bulk_create(events)
    elif outcome == LeaseOutcome.QUOTA_EXHAUSTED:
        account_quota_exhaust(identity_id=lease.identity_id, reason=_reason(completion, "quota exhausted"), now=now)
    return False


def account_quota_exhaust(*, identity_id: int, reason: str, now: datetime) -> int:
    """Take every alias of the identity out of selection: the quota belongs
    to the upstream user, not to one of its credentials."""
    ids = list(Account.objects.filter(identity_id=identity_id, quota_exhausted=False).values_list("id", flat=True))
    Account.objects.filter(id__in=ids).update(
        quota_exhausted=True, quota_exhausted_at=now, quota_exhausted_reason=reason
    )
    CooldownEvent.objects.bulk_create(
        CooldownEvent(
            kind=CooldownKind.QUOTA_EXHAUSTED, account_id=pk, identity_id=identity_id, reason=reason, created_at=now
        )
        for pk in ids
    )
    return len(ids)


def _release_notify() -> None:
    """Wake waiting dispatches everywhere once this transaction commits."""
    if backend.postgres:
        with connection.cursor() as cursor:
            cursor.execute(pg.notify_release_sql())
    transaction.on_commit(wakeups.released_locally)


# --- reap --------------------------------------------------------------------------

# Leases closed per transaction by the reaper; bounds how long it holds locks.
REAP_BATCH = 1000


def lease_reap_expired(
    *, now: datetime | None = None, identity_ids: list[int] | None = None, lock_timeout: bool = False
) -> int:
    """Close leases past their TTL and give their slots back. Safe to run in
    several processes at once: each lease is closed by exactly one of them.
    With ``lock_timeout`` (the periodic task) a batch that waits too long for
    a row lock gives way to the hot path; the next run finishes the job."""
    now = now or timezone.now()
    total = 0
    while True:
        try:
            with transaction.atomic():
                if lock_timeout:
                    maintenance.lock_timeout_local()
                closed, found = _reap_batch(now=now, identity_ids=identity_ids)
        except OperationalError:
            if not (lock_timeout and backend.postgres):
                raise
            return total
        if closed is None:
            continue  # a completion won a lease between our read and update: redo the batch
        total += closed
        if found < REAP_BATCH:
            return total


def _reap_batch(*, now: datetime, identity_ids: list[int] | None) -> tuple[int | None, int]:
    expired = Lease.objects.filter(completed_at__isnull=True, expires_at__lte=now)
    if identity_ids is not None:
        expired = expired.filter(identity_id__in=identity_ids)
    rows = list(
        expired.select_for_update(skip_locked=True)
        .order_by("expires_at")
        .values_list("id", "identity_id", "api_key_id", "counted_on_key")[:REAP_BATCH]
    )
    if not rows:
        return 0, 0
    ids = [lease_id for lease_id, *_ in rows]
    closed = Lease.objects.filter(id__in=ids, completed_at__isnull=True).update(
        completed_at=now, outcome=LeaseOutcome.EXPIRED
    )
    if closed != len(ids):
        transaction.set_rollback(True)
        return None, len(rows)
    keys = Counter(key_id for _, _, key_id, counted in rows if counted and key_id is not None)
    for key_id in sorted(keys):
        ApiKey.objects.filter(pk=key_id).update(in_flight=F("in_flight") - keys[key_id])
    identities = Counter(identity_id for _, identity_id, _, _ in rows)
    for identity_id in sorted(identities):
        RoutingIdentity.objects.filter(pk=identity_id).update(in_flight=F("in_flight") - identities[identity_id])
    _release_notify()
    return closed, len(rows)
