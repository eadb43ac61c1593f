"""Writes of the decision: acquiring, completing and reaping leases, binding
sessions. Keyword-only, typed, atomic.

Concurrency model (shared by every process and host through the database):

- A slot on an identity is claimed with one conditional ``UPDATE`` that checks
  the limit, the cooldown and the pacing on the row as it is at that instant
  (PostgreSQL re-evaluates the condition after taking the row lock), so two
  gateways can never push an identity past ``max_concurrency``.
- Row locks are always taken in the same order: lease, then API key, then
  identities by id. Dispatch locks key then identity; completion and the
  reaper lock lease, key, identity. No cycle, so no deadlock.
- Releases notify waiting dispatches in every process (``routing.wakeups``).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import F, Min, Q
from django.utils import timezone

from accounts.models import Account, ApiKey, Proxy, RoutingIdentity
from kiropool.errors import AllAccountsFailed, Conflict, NotFound, NoUsableAccount, RateLimited
from routing import selection, selectors, wakeups
from routing.latency import SNAPSHOT_WINDOW, latency_snapshot_build
from routing.models import (
    CooldownEvent,
    CooldownKind,
    LatencySample,
    LatencySnapshot,
    Lease,
    LeaseOutcome,
    SessionBinding,
)

# A gateway's rate-limit report cools the identity this long unless it says
# otherwise; the cap keeps a buggy or hostile report from benching an account
# for hours.
DEFAULT_COOLDOWN_SECONDS = 300
MAX_COOLDOWN_SECONDS = 900

SESSION_NONE, SESSION_STICKY, SESSION_NEW = "none", "sticky", "new"


@dataclass(frozen=True, slots=True)
class DispatchRequest:
    session_id: str | None  # already trimmed; None when absent or empty
    model: str | None = None
    exclude_accounts: frozenset[str] = frozenset()
    max_wait_ms: int = 30_000


@dataclass(frozen=True, slots=True)
class Acquired:
    lease: Lease
    row: selectors.CandidateRow
    session: str
    waited_ms: int
    sticky_hit: bool = False  # the session's bound account served it


@dataclass(slots=True)
class _WalkMiss:
    locally_throttled: bool = False
    shortest_cooldown: timedelta | None = None
    next_ready_at: datetime | None = None
    tried: set[int] = field(default_factory=set)
    saturated: set[int] = field(default_factory=set)  # identities at their concurrency limit


def lease_acquire(*, key: ApiKey, request: DispatchRequest) -> Acquired:
    """Choose an account for one upstream request and hold a lease on it.

    Waits up to ``request.max_wait_ms`` when every candidate is only locally
    throttled (concurrency or pacing), woken by a release in any process or
    when pacing allows. Raises the typed API errors of SPEC §2 otherwise."""
    _key_limits_check(key=key, now=timezone.now())
    if request.session_id:
        sticky = _sticky_fast_path(key=key, request=request)
        if sticky is not None:
            return sticky
    deadline = time.monotonic() + request.max_wait_ms / 1000
    waited = 0.0
    while True:
        token = wakeups.token()
        plan = selectors.dispatch_plan(key=key, request=request, now=timezone.now())
        if not plan.rows:
            raise NoUsableAccount()
        if not plan.candidates:
            raise AllAccountsFailed()
        result = _walk(key=key, plan=plan, request=request, waited_ms=int(waited * 1000))
        if isinstance(result, Acquired):
            return result
        if result.locally_throttled:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                retry = (result.next_ready_at - timezone.now()) if result.next_ready_at else timedelta(seconds=1)
                raise RateLimited(
                    "every candidate account is at its concurrency or pacing limit",
                    retry_after=selection.retry_after_seconds(retry),
                )
            timeout = remaining
            if result.next_ready_at is not None:
                timeout = min(timeout, max(0.0, (result.next_ready_at - timezone.now()).total_seconds()))
            expiry = _next_lease_expiry(identity_ids=result.saturated) if result.saturated else None
            if expiry is not None:
                # A lease never completed frees its slot at its expiry, which no
                # release announces: wake then, not at the end of the wait budget.
                timeout = min(timeout, (expiry - timezone.now()).total_seconds() + EXPIRY_WAKE_MARGIN_SECONDS)
            wait_started = time.monotonic()
            wakeups.wait(token, timeout)
            waited += time.monotonic() - wait_started
            continue
        if result.shortest_cooldown is not None:
            raise RateLimited(
                "every candidate account is cooling down",
                retry_after=selection.retry_after_seconds(result.shortest_cooldown),
            )
        raise NoUsableAccount()


# Past a lease's expiry before looking again, so the expired lease no longer counts.
EXPIRY_WAKE_MARGIN_SECONDS = 0.01


def _next_lease_expiry(*, identity_ids: set[int]) -> datetime | None:
    """When the first live lease on these identities expires (the waiting path only)."""
    return Lease.objects.filter(
        identity_id__in=identity_ids, completed_at__isnull=True, expires_at__gt=timezone.now()
    ).aggregate(first=Min("expires_at"))["first"]


def _sticky_fast_path(*, key: ApiKey, request: DispatchRequest) -> Acquired | None:
    """SPEC §2's sticky fast path, reading only the bound account: most
    requests of a conversation end here without loading the whole pool."""
    if selectors.model_preference(key, request.model):
        return None
    if connection.vendor == "postgresql" and not _key_limited(key):
        return _sticky_claim_one_statement(key=key, request=request)
    now = timezone.now()
    row = selectors.sticky_candidate(key, now=now, session_id=request.session_id)
    if row is None or row.candidate.account in request.exclude_accounts:
        return None
    if not selection.sticky_fast_path_ok(row.candidate, selection.SelectionContext(now=now)):
        return None
    lease = _slot_claim(key=key, row=row, request=request, waited_ms=0)
    if lease is None:
        return None
    return Acquired(lease=lease, row=row, session=SESSION_STICKY, waited_ms=0, sticky_hit=True)


# What makes an identity (alias ``identity``) able to start a lease now, checked
# by PostgreSQL on the row as locked by the UPDATE that claims it: a free slot,
# no cooldown, pacing allows. The ORM path in ``_slot_claim`` states the same.
_CLAIMABLE = """identity.in_flight < identity.max_concurrency
       AND (identity.cooldown_until IS NULL OR identity.cooldown_until <= %(now)s)
       AND (identity.min_start_interval_ms = 0 OR identity.last_started_at IS NULL
            OR identity.last_started_at <= %(now)s - identity.min_start_interval_ms * interval '1 millisecond')"""

_LEASE_COLUMNS = """id, api_key_id, account_id, account_name, identity_id, proxy_url, session_id, model,
        started_at, expires_at, completed_at, outcome, first_token_ms, waited_ms, error_message, counted_on_key"""


def _with_claim(sql: str) -> str:
    return sql.replace("{claimable}", _CLAIMABLE).replace("{lease_columns}", _LEASE_COLUMNS)


_STICKY_CLAIM_SQL = """
WITH bound AS (
    SELECT a.id AS account_id, a.name, a.pool, a.region, a.profile_arn,
           a.identity_id, i.name AS identity_name, p.url AS proxy_url
      FROM routing_sessionbinding sb
      JOIN accounts_account a ON a.id = sb.account_id
      JOIN accounts_routingidentity i ON i.id = a.identity_id
      LEFT JOIN accounts_proxy p ON p.id = a.proxy_id
     WHERE sb.api_key_id = %(key_id)s AND sb.session_id = %(session_id)s AND sb.expires_at > %(now)s
       AND a.enabled AND NOT a.quota_exhausted {scope}
       AND NOT (a.name = ANY(%(excluded)s))
       AND (p.cooldown_until IS NULL OR p.cooldown_until <= %(now)s)
), claimed AS (
    UPDATE accounts_routingidentity AS identity
       SET in_flight = identity.in_flight + 1, last_started_at = %(now)s
      FROM bound
     WHERE identity.id = bound.identity_id
       AND {claimable}
 RETURNING identity.id
), leased AS (
    INSERT INTO routing_lease ({lease_columns})
    SELECT %(lease_id)s, %(key_id)s, bound.account_id, bound.name, claimed.id, COALESCE(bound.proxy_url, ''),
           %(session_id)s, %(model)s, %(now)s, %(expires_at)s, NULL, '', NULL, 0, '', false
      FROM claimed JOIN bound ON bound.identity_id = claimed.id
 RETURNING id
)
SELECT bound.account_id, bound.name, bound.pool, bound.region, bound.profile_arn,
       bound.identity_id, bound.identity_name, bound.proxy_url
  FROM leased, bound
"""
_STICKY_CLAIM_SQL = _with_claim(_STICKY_CLAIM_SQL)


def _sticky_claim_one_statement(*, key: ApiKey, request: DispatchRequest) -> Acquired | None:
    """PostgreSQL: the sticky fast path as one statement. It holds the same
    conditions as the general path (the bound account is a live candidate of
    the key, not excluded, its proxy and identity not cooling, a slot free,
    pacing allows) and claims the slot and inserts the lease, so most turns
    of a conversation cost a single round trip after authentication. None
    when any condition fails: the ordered walk then decides."""
    now = timezone.now()
    lease_id = uuid.uuid4()
    expires_at = now + timedelta(seconds=settings.KIROPOOL_LEASE_TTL_SECONDS)
    with connection.cursor() as cursor:
        cursor.execute(
            selectors.scoped_sql(_STICKY_CLAIM_SQL, key),
            {
                **selectors.scope_params(key),
                "key_id": key.pk,
                "session_id": request.session_id,
                "now": now,
                "excluded": sorted(request.exclude_accounts),
                "lease_id": lease_id,
                "model": request.model or "",
                "expires_at": expires_at,
            },
        )
        found = cursor.fetchone()
    if found is None:
        return None
    account_id, name, pool, region, profile_arn, identity_id, identity_name, proxy_url = found
    lease = Lease(
        id=lease_id,
        api_key=key,
        account_id=account_id,
        account_name=name,
        identity_id=identity_id,
        proxy_url=proxy_url or "",
        session_id=request.session_id,
        model=request.model or "",
        started_at=now,
        expires_at=expires_at,
    )
    lease._state.adding = False
    row = selectors.CandidateRow(
        candidate=selection.Candidate(
            account=name, routing_identity=identity_name, pool=pool, proxy_url=proxy_url, last_started_at=now
        ),
        account_id=account_id,
        identity_id=identity_id,
        region=region,
        profile_arn=profile_arn,
        expired_leases=0,
    )
    return Acquired(lease=lease, row=row, session=SESSION_STICKY, waited_ms=0, sticky_hit=True)


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


def _walk(*, key: ApiKey, plan: selectors.DispatchPlan, request: DispatchRequest, waited_ms: int):
    miss = _WalkMiss()
    order = ([plan.fast_path] if plan.fast_path is not None else []) + plan.walk
    for row in order:
        if row.account_id in miss.tried:
            continue
        miss.tried.add(row.account_id)
        candidate = row.candidate
        now = timezone.now()
        state = selection.throttle_state(candidate, now)
        if state == "cooling":
            left = selection.cooldown_remaining(candidate.identity_cooldown_until, now)
            if miss.shortest_cooldown is None or left < miss.shortest_cooldown:
                miss.shortest_cooldown = left
            continue
        if state != "ready":
            miss.locally_throttled = True
            if state == "saturated":
                miss.saturated.add(row.identity_id)
            ready_at = selection.pacing_ready_at(candidate) if state == "pacing" else None
            if ready_at is not None and (miss.next_ready_at is None or ready_at < miss.next_ready_at):
                miss.next_ready_at = ready_at
            continue
        lease = _slot_claim(key=key, row=row, request=request, waited_ms=waited_ms)
        if lease is not None:
            sticky_hit = plan.binding is not None and plan.binding.account_id == row.account_id
            return Acquired(lease=lease, row=row, session=plan.session, waited_ms=waited_ms, sticky_hit=sticky_hit)
        # Lost the slot to another dispatch between the read and the claim.
        miss.locally_throttled = True
        miss.saturated.add(row.identity_id)
    return miss


def _slot_claim(*, key: ApiKey, row: selectors.CandidateRow, request: DispatchRequest, waited_ms: int) -> Lease | None:
    """Claim one slot on the row's identity (and the key) and create the lease,
    atomically. None when the identity has no slot, cooldown or pacing room
    at this instant."""
    if row.expired_leases:
        lease_reap_expired(identity_ids=[row.identity_id])
    now = timezone.now()
    candidate = row.candidate
    lease = Lease(
        id=uuid.uuid4(),
        api_key=key,
        account_id=row.account_id,
        account_name=candidate.account,
        identity_id=row.identity_id,
        proxy_url=candidate.proxy_url or "",
        session_id=request.session_id or "",
        model=request.model or "",
        started_at=now,
        expires_at=now + timedelta(seconds=settings.KIROPOOL_LEASE_TTL_SECONDS),
        waited_ms=waited_ms,
        counted_on_key=key.max_concurrency is not None,
    )
    key_limited = _key_limited(key)
    if connection.vendor == "postgresql" and not key_limited:
        return lease if _slot_claim_one_statement(lease=lease) else None
    with transaction.atomic():
        if key_limited:
            _key_slot_claim(key=key, now=now, counted=lease.counted_on_key)
        pacing_ok = Q(min_start_interval_ms=candidate.min_start_interval_ms)
        if candidate.min_start_interval_ms:
            pacing_ok &= Q(last_started_at__isnull=True) | Q(
                last_started_at__lte=now - timedelta(milliseconds=candidate.min_start_interval_ms)
            )
        claimed = (
            RoutingIdentity.objects.filter(pk=row.identity_id, in_flight__lt=F("max_concurrency"))
            .filter(Q(cooldown_until__isnull=True) | Q(cooldown_until__lte=now))
            .filter(pacing_ok)
            .update(in_flight=F("in_flight") + 1, last_started_at=now)
        )
        if not claimed:
            transaction.set_rollback(True)
            return None
        lease.save(force_insert=True)
        return lease


_CLAIM_SQL = """
WITH claimed AS (
    UPDATE accounts_routingidentity AS identity
       SET in_flight = identity.in_flight + 1, last_started_at = %(now)s
     WHERE identity.id = %(identity_id)s AND {claimable}
 RETURNING identity.id
)
INSERT INTO routing_lease ({lease_columns})
SELECT %(lease_id)s, %(key_id)s, %(account_id)s, %(account_name)s, claimed.id, %(proxy_url)s, %(session_id)s,
       %(model)s, %(now)s, %(expires_at)s, NULL, '', NULL, %(waited_ms)s, '', false
  FROM claimed
RETURNING id
"""
_CLAIM_SQL = _with_claim(_CLAIM_SQL)


def _slot_claim_one_statement(*, lease: Lease) -> bool:
    """PostgreSQL: the claim and the lease insert as one statement, so one
    round trip and no explicit transaction. Same conditions as the ORM path."""
    with connection.cursor() as cursor:
        cursor.execute(
            _CLAIM_SQL,
            {
                "now": lease.started_at,
                "identity_id": lease.identity_id,
                "lease_id": lease.id,
                "key_id": lease.api_key_id,
                "account_id": lease.account_id,
                "account_name": lease.account_name,
                "proxy_url": lease.proxy_url,
                "session_id": lease.session_id,
                "model": lease.model,
                "expires_at": lease.expires_at,
                "waited_ms": lease.waited_ms,
            },
        )
        claimed = cursor.fetchone() is not None
    lease._state.adding = False
    return claimed


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


# --- completion ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    outcome: str
    first_token_ms: float | None = None
    cooldown_seconds: int | None = None
    proxy_failure: bool = False
    remaining_credits: float | None = None
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class Completed:
    lease: Lease
    session_bound: bool


def lease_complete(*, key: ApiKey, lease_id: uuid.UUID, completion: Completion) -> Completed:
    """Release a lease and apply its outcome (SPEC §2 table). A lease of
    another key is 404; one already completed (or reaped) is 409 and nothing
    changes."""
    if connection.vendor == "postgresql" and _completion_is_plain(completion):
        fast = _lease_complete_one_statement(key=key, lease_id=lease_id, completion=completion)
        if fast is not None:
            return fast
    return _retrying(lambda: _lease_complete(key=key, lease_id=lease_id, completion=completion))


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
    lease.completed_at, lease.outcome = now, outcome
    return Completed(lease=lease, session_bound=bound)


def _completion_is_plain(completion: Completion) -> bool:
    """Outcomes that only release (and maybe record and bind)."""
    return completion.remaining_credits is None and completion.outcome in (
        LeaseOutcome.SUCCESS,
        LeaseOutcome.RETRY_NEXT,
        LeaseOutcome.FATAL,
    )


_COMPLETE_SQL = """
WITH done AS (
    UPDATE routing_lease
       SET completed_at = %(now)s, outcome = %(outcome)s, first_token_ms = %(first_token_ms)s,
           error_message = %(error_message)s
     WHERE id = %(lease_id)s AND api_key_id = %(key_id)s AND completed_at IS NULL AND NOT counted_on_key
 RETURNING id, identity_id, account_id, account_name, proxy_url, session_id
), released AS (
    UPDATE accounts_routingidentity AS identity
       SET in_flight = identity.in_flight - 1
      FROM done
     WHERE identity.id = done.identity_id
 RETURNING identity.in_flight + 1 >= identity.max_concurrency AS was_full
), notified AS (
    -- Only a release on a full identity can wake a dispatch waiting for a
    -- slot; skipping the rest spares every process's listener a wake-up.
    SELECT pg_notify('kiropool_release', '') FROM released WHERE released.was_full
), sampled AS (
    INSERT INTO routing_latencysample (account_id, proxy_url, first_token_ms, recorded_at)
    SELECT done.account_id, done.proxy_url, %(first_token_ms)s, %(now)s
      FROM done
     WHERE %(record_sample)s AND done.account_id IS NOT NULL
), bound AS (
    INSERT INTO routing_sessionbinding (api_key_id, session_id, account_id, created_at, updated_at, expires_at)
    SELECT %(key_id)s, done.session_id, done.account_id, %(now)s, %(now)s, %(binding_expires_at)s
      FROM done
     WHERE %(bind)s AND done.session_id <> '' AND done.account_id IS NOT NULL
        ON CONFLICT (api_key_id, session_id) DO UPDATE
       SET account_id = EXCLUDED.account_id, updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at
 RETURNING 1
)
SELECT done.account_name, (SELECT count(*) FROM bound) > 0, (SELECT count(*) FROM notified)
  FROM done, released
"""


def _lease_complete_one_statement(*, key: ApiKey, lease_id: uuid.UUID, completion: Completion) -> Completed | None:
    """PostgreSQL: a plain completion (release, sample, bind, notify) as one
    statement. None when it does not apply (unknown, foreign, completed or
    key-counted lease): the general path then answers."""
    now = timezone.now()
    success = completion.outcome == LeaseOutcome.SUCCESS
    with connection.cursor() as cursor:
        cursor.execute(
            _COMPLETE_SQL,
            {
                "now": now,
                "outcome": completion.outcome,
                "first_token_ms": completion.first_token_ms,
                "error_message": completion.error_message[:2000],
                "lease_id": lease_id,
                "key_id": key.pk,
                "record_sample": success and completion.first_token_ms is not None,
                "bind": success,
                "binding_expires_at": now + timedelta(seconds=settings.KIROPOOL_AFFINITY_TTL_SECONDS),
            },
        )
        row = cursor.fetchone()
    if row is None:
        return None
    wakeups.released_locally()
    lease = Lease(id=lease_id, account_name=row[0], outcome=completion.outcome, completed_at=now)
    return Completed(lease=lease, session_bound=bool(row[1]))


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
            session_bind(key=key, session_id=lease.session_id, account_id=lease.account_id, now=now)
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
    sql = wakeups.release_sql()
    if sql:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    transaction.on_commit(wakeups.released_locally)


# --- sessions ------------------------------------------------------------------


def session_bind(*, key: ApiKey, session_id: str, account_id: int, now: datetime | None = None) -> None:
    """Bind (key, session id) → account, refreshing its TTL: one upsert.
    The per-account binding count follows through the database triggers."""
    now = now or timezone.now()
    expires_at = now + timedelta(seconds=settings.KIROPOOL_AFFINITY_TTL_SECONDS)
    SessionBinding.objects.bulk_create(
        [
            SessionBinding(
                api_key=key,
                session_id=session_id,
                account_id=account_id,
                created_at=now,
                updated_at=now,
                expires_at=expires_at,
            )
        ],
        update_conflicts=True,
        unique_fields=["api_key", "session_id"],
        update_fields=["account", "updated_at", "expires_at"],
    )


# --- leases past their TTL -------------------------------------------------------

# Leases closed per transaction by the reaper; bounds how long it holds locks.
REAP_BATCH = 1000


def lease_reap_expired(*, now: datetime | None = None, identity_ids: list[int] | None = None) -> int:
    """Close leases past their TTL and give their slots back. Safe to run in
    several processes at once: each lease is closed by exactly one of them."""
    now = now or timezone.now()
    total = 0
    while True:
        with transaction.atomic():
            expired = Lease.objects.filter(completed_at__isnull=True, expires_at__lte=now)
            if identity_ids is not None:
                expired = expired.filter(identity_id__in=identity_ids)
            rows = list(
                expired.select_for_update(skip_locked=True)
                .order_by("expires_at")
                .values_list("id", "identity_id", "api_key_id", "counted_on_key")[:REAP_BATCH]
            )
            if not rows:
                return total
            ids = [lease_id for lease_id, *_ in rows]
            closed = Lease.objects.filter(id__in=ids, completed_at__isnull=True).update(
                completed_at=now, outcome=LeaseOutcome.EXPIRED
            )
            if closed != len(ids):
                # Someone completed one between our read and update; redo the batch.
                transaction.set_rollback(True)
                continue
            keys = Counter(key_id for _, _, key_id, counted in rows if counted and key_id is not None)
            for key_id in sorted(keys):
                ApiKey.objects.filter(pk=key_id).update(in_flight=F("in_flight") - keys[key_id])
            identities = Counter(identity_id for _, identity_id, _, _ in rows)
            for identity_id in sorted(identities):
                RoutingIdentity.objects.filter(pk=identity_id).update(
                    in_flight=F("in_flight") - identities[identity_id]
                )
            _release_notify()
            total += closed
        if len(rows) < REAP_BATCH:
            return total


# --- background maintenance ------------------------------------------------------
# The periodic tasks' writes (routing/tasks.py). Each is idempotent and safe to
# run in several workers at once: rows are deleted in bounded batches by id,
# every delete re-checks its condition, and nothing here reads a counter to
# write it back (``Account.binding_rows`` follows binding deletes through the
# database triggers). Maintenance yields to the hot path: on PostgreSQL a batch
# that waits for a row lock longer than ``MAINTENANCE_LOCK_TIMEOUT`` gives up
# and is retried, so a dispatch or completion never ends in a deadlock with it.


# Rows deleted per transaction: bounds how long a run holds its locks and how
# much one statement writes.
MAINTENANCE_BATCH = 1000
# Well under PostgreSQL's deadlock_timeout (1 s), so in a lock cycle with a
# dispatch or a completion it is always the maintenance batch that backs off.
MAINTENANCE_LOCK_TIMEOUT = "200ms"
MAINTENANCE_RETRIES = 3
# Snapshot rows kept: a short history for the admin, and the table stays tiny.
SNAPSHOTS_KEPT = 10


def latency_snapshot_refresh(*, now: datetime | None = None) -> LatencySnapshot:
    """Aggregate the samples of the last ``SNAPSHOT_WINDOW`` into a new
    snapshot row, and drop all but the newest ``SNAPSHOTS_KEPT`` rows."""
    now = now or timezone.now()
    samples = (
        LatencySample.objects.filter(recorded_at__gt=now - SNAPSHOT_WINDOW, recorded_at__lte=now)
        .values_list("account__name", "proxy_url", "first_token_ms")
        .iterator(chunk_size=5000)
    )
    built = latency_snapshot_build(samples, generated_at=now)
    snapshot = LatencySnapshot.objects.create(
        generated_at=now,
        window_seconds=int(SNAPSHOT_WINDOW.total_seconds()),
        global_avg_ms=built.global_avg_ms,
        sample_count=sum(stats.samples for stats in built.accounts.values()),
        accounts={name: [stats.samples, stats.avg_ms] for name, stats in sorted(built.accounts.items())},
        proxies={url: [stats.samples, stats.avg_ms] for url, stats in sorted(built.proxies.items())},
    )
    stale = list(
        LatencySnapshot.objects.order_by("-generated_at", "-id").values_list("id", flat=True)[
            SNAPSHOTS_KEPT : SNAPSHOTS_KEPT + MAINTENANCE_BATCH
        ]
    )
    LatencySnapshot.objects.filter(id__in=stale).delete()
    # This process reads the new one at once; others within their cache period.
    selectors.latency_snapshot_cache_clear()
    return snapshot


def binding_purge(*, now: datetime | None = None, max_entries: int | None = None) -> tuple[int, int]:
    """Delete the expired session bindings, then evict the least recently
    updated live ones beyond the capacity (SPEC §3). Returns (expired, evicted)."""
    now = now or timezone.now()
    limit = max(1, settings.KIROPOOL_AFFINITY_MAX_ENTRIES if max_entries is None else max_entries)
    expired = _bindings_delete(Q(expires_at__lte=now))
    live = SessionBinding.objects.filter(expires_at__gt=now)
    if live.count() <= limit:
        return expired, 0
    # The oldest binding that stays is the limit-th most recently updated.
    # Deleting older rows never moves that line, so a second purge running at
    # the same time draws the same one and evicts nothing extra.
    line = list(live.order_by("-updated_at", "-id").values_list("updated_at", "id")[limit - 1 : limit])
    if not line:
        return expired, 0
    updated_at, pk = line[0]
    older = Q(updated_at__lt=updated_at) | Q(updated_at=updated_at, id__lt=pk)
    return expired, _bindings_delete(Q(expires_at__gt=now) & older)


def _bindings_delete(condition: Q) -> int:
    total = 0
    while True:
        batch = _bindings_delete_batch(condition)
        if batch is None:  # kept losing lock waits to the hot path: the next run finishes
            return total
        found, deleted = batch
        total += deleted
        if found < MAINTENANCE_BATCH:
            return total


def _bindings_delete_batch(condition: Q) -> tuple[int, int] | None:
    """One batch: (rows found, rows deleted), or None after repeated lock timeouts."""
    for attempt in range(MAINTENANCE_RETRIES):
        try:
            with transaction.atomic():
                _maintenance_lock_timeout()
                # SKIP LOCKED: a concurrent purge takes other rows, and a row a
                # completion is re-binding right now is left to the next run.
                rows = list(
                    SessionBinding.objects.filter(condition)
                    .select_for_update(skip_locked=True)
                    .order_by("id")
                    .values_list("id", "account_id")[:MAINTENANCE_BATCH]
                )
                if not rows:
                    return 0, 0
                # The triggers update each binding's account: lock those rows
                # in id order first, so two purges never wait on each other in a cycle.
                account_ids = sorted({account_id for _, account_id in rows})
                list(Account.objects.filter(id__in=account_ids).order_by("id").select_for_update().values_list("id"))
                deleted, _ = SessionBinding.objects.filter(condition, id__in=[pk for pk, _ in rows]).delete()
                return len(rows), deleted
        except OperationalError:
            if connection.vendor != "postgresql":
                raise
            time.sleep(0.05 * (attempt + 1))
    return None


def _maintenance_lock_timeout() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{MAINTENANCE_LOCK_TIMEOUT}'")


def latency_sample_prune(*, now: datetime | None = None) -> int:
    """Delete the samples that have left the snapshot window. Returns how many."""
    now = now or timezone.now()
    return _prune(LatencySample, Q(recorded_at__lte=now - SNAPSHOT_WINDOW))


def history_prune(*, now: datetime | None = None) -> int:
    """Delete completed leases and cooldown events older than the retention
    (``KIROPOOL_HISTORY_RETENTION_DAYS``); live leases are never touched."""
    now = now or timezone.now()
    before = now - timedelta(days=settings.KIROPOOL_HISTORY_RETENTION_DAYS)
    leases = _prune(Lease, Q(completed_at__isnull=False, completed_at__lte=before))
    return leases + _prune(CooldownEvent, Q(created_at__lte=before))


def _prune(model, condition: Q) -> int:
    """Delete ``model`` rows matching ``condition`` in bounded batches by id;
    each delete re-checks the condition, so two runs at once are harmless."""
    total = 0
    while True:
        ids = list(model.objects.filter(condition).order_by("pk").values_list("pk", flat=True)[:MAINTENANCE_BATCH])
        if not ids:
            return total
        deleted, _ = model.objects.filter(condition, pk__in=ids).delete()
        total += deleted
        if len(ids) < MAINTENANCE_BATCH:
            return total
