"""Writes of a lease's end: the gateway reports how the upstream call went
(SPEC §2, "Completing a lease"), and the pool learns from it.

- Every completion releases the slot (and the key's), once: a second one is
  a 409 that changes nothing.
- ``success`` records the first-token latency (bounded, so one report cannot
  drag the global average far) and binds the session.
- ``rate_limited`` cools the identity (and with ``proxy_failure`` the proxy).
- ``quota_exhausted`` takes every alias of the identity out of selection.
- ``retry_next`` / ``fatal`` release only, but count toward the identity's
  failure streak: after ``KIROPOOL_EJECTION_FAILURES`` in a row it is ejected
  (out of selection for a while, doubled on each ejection in a row) and comes
  back with a slow start. A success ends the streak.
- Any completion may report ``remaining_credits`` and ``quota_resets_at``.

On PostgreSQL a plain success runs as one statement (``routing/pg.py``).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import F
from django.utils import timezone

from accounts.models import ApiKey, KeySlot, Proxy, RoutingIdentity
from accounts.throttling import key_rate_take
from core.errors import Conflict, NotFound
from routing import metrics, quotas, sessions, wakeups
from routing.backend import backend
from routing.dispatch import Completed, Completion
from routing.models import LEASE_OPEN, CooldownEvent, CooldownKind, LatencySample, Lease, LeaseOutcome

# A gateway's rate-limit report cools the identity this long unless it says
# otherwise; the cap keeps a buggy or hostile report from benching an account
# for hours.
DEFAULT_COOLDOWN_SECONDS = 300
MAX_COOLDOWN_SECONDS = 900

FAILURES = (LeaseOutcome.RETRY_NEXT, LeaseOutcome.FATAL)

# What a cooldown's or an event's reason holds (their columns' max_length).
REASON_LENGTH = 500

_COMPLETED = "this lease is already completed or expired"


def lease_complete(*, key: ApiKey, lease_id: uuid.UUID, completion: Completion) -> Completed:
    """Release a lease and apply its outcome. A lease of another key is 404;
    one already completed (or reaped) is 409 and nothing changes."""
    if backend.statements is not None and _plain(completion):
        now = timezone.now()
        done = _retrying(
            lambda: backend.statements.complete(
                key=key,
                lease_id=lease_id,
                outcome=completion.outcome,
                first_token_ms=_sample(completion.first_token_ms),
                error_message=completion.error_message[:2000],
                now=now,
                binding_expires_at=sessions.binding_expiry(now),
            )
        )
        if done is not None:
            wakeups.released_locally()
            return Completed(lease_id, done.account_name, completion.outcome, done.session_bound)
    return _retrying(lambda: _lease_complete(key=key, lease_id=lease_id, completion=completion))


def _plain(completion: Completion) -> bool:
    """A success that reports nothing but its latency."""
    return (
        completion.outcome == LeaseOutcome.SUCCESS
        and completion.remaining_credits is None
        and completion.quota_resets_at is None
    )


def _sample(first_token_ms: float | None) -> float | None:
    """A first-token time as recorded: at most ``KIROPOOL_MAX_FIRST_TOKEN_MS``,
    so one gateway's absurd report moves the global average only so far."""
    if first_token_ms is None:
        return None
    return min(first_token_ms, settings.KIROPOOL_MAX_FIRST_TOKEN_MS)


def _lease_complete(*, key: ApiKey, lease_id: uuid.UUID, completion: Completion) -> Completed:
    lease = (
        Lease.objects.filter(pk=lease_id, api_key=key)
        .only(
            "id",
            "account_id",
            "account_name",
            "identity_id",
            "proxy_url",
            "session_id",
            "key_slot_id",
            "quota_probe",
            "started_at",
            "outcome",
        )
        .first()
    )
    if lease is None:
        raise NotFound("no such lease for this API key")
    if lease.outcome:
        # Refused before anything is counted: a gateway retrying a completion
        # that got through would spend the key's capacity reports. (Closing
        # the lease below checks again, as it holds the row.)
        raise Conflict(_COMPLETED)
    now = timezone.now()
    if _takes_capacity(completion) and not _report_allowed(key):
        # Over its rate of capacity-taking reports: the lease is released and
        # its outcome recorded, but one gateway no longer benches accounts
        # and proxies for everyone.
        completion = Completion(
            outcome=completion.outcome,
            first_token_ms=completion.first_token_ms,
            remaining_credits=completion.remaining_credits,
            quota_resets_at=completion.quota_resets_at,
            error_message=completion.error_message,
            report_limited=True,
            # The gateway's own failure stays its own: it counts toward no ejection.
            abandoned=completion.abandoned,
        )
    outcome = completion.outcome
    with transaction.atomic():
        closed = Lease.objects.filter(LEASE_OPEN, pk=lease.pk).update(
            completed_at=now,
            outcome=outcome,
            first_token_ms=_sample(completion.first_token_ms),
            error_message=completion.error_message[:2000],
        )
        if not closed:
            raise Conflict(_COMPLETED)
        if lease.key_slot_id is not None:
            KeySlot.objects.filter(pk=lease.key_slot_id).update(taken=False)
        cooldown = _identity_release(lease=lease, completion=completion, now=now)
        bound = False
        if lease.account_id is not None:
            bound = _account_effects(key=key, lease=lease, completion=completion, now=now, cooldown=cooldown)
        wakeups.release_notify()
    return Completed(lease.id, lease.account_name, outcome, bound, report_applied=not completion.report_limited)


def _takes_capacity(completion: Completion) -> bool:
    return completion.outcome in (LeaseOutcome.RATE_LIMITED, LeaseOutcome.QUOTA_EXHAUSTED) or completion.proxy_failure


def _report_allowed(key: ApiKey) -> bool:
    return key_rate_take(key, scope="capacity-report", rate=settings.KIROPOOL_CAPACITY_REPORT_RATE) is None


def _identity_release(*, lease: Lease, completion: Completion, now: datetime) -> datetime | None:
    """Release the identity's slot and apply what the outcome says of the
    identity: a cooldown (returned), or the failure streak and ejection."""
    outcome = completion.outcome
    changes: dict = {"in_flight": F("in_flight") - 1}
    cooldown = None
    if outcome == LeaseOutcome.RATE_LIMITED and not completion.report_limited:
        seconds = completion.cooldown_seconds
        seconds = DEFAULT_COOLDOWN_SECONDS if seconds is None else min(seconds, MAX_COOLDOWN_SECONDS)
        cooldown = now + timedelta(seconds=seconds)
        changes.update(cooldown_until=cooldown, cooldown_reason=_reason(completion, "rate limited"))
    elif outcome == LeaseOutcome.SUCCESS:
        changes.update(failure_streak=0, ejections=0)
    elif outcome in FAILURES and not completion.abandoned:
        changes.update(_failure_record(lease=lease, completion=completion, now=now))
    RoutingIdentity.objects.filter(pk=lease.identity_id).update(**changes)
    return cooldown


def _failure_record(*, lease: Lease, completion: Completion, now: datetime) -> dict:
    """One more failure in a row; at ``KIROPOOL_EJECTION_FAILURES`` the
    identity is ejected for ``base · 2^(ejections in a row)``, capped.
    Failures of leases that were already out when it was last ejected count
    for nothing, whether they end during the ejection or after it: they
    tell of the trouble that ejected it, not of the identity since."""
    identity_id = lease.identity_id
    identity = (
        RoutingIdentity.objects.select_for_update()
        .only("failure_streak", "ejections", "ejected_until")
        .get(pk=identity_id)
    )
    if identity.ejected_until is not None and identity.ejected_until > now:
        return {}
    if identity.ejected_until is not None and _ejected_since(identity_id=identity_id, started_at=lease.started_at):
        return {}
    streak = identity.failure_streak + 1
    if streak < settings.KIROPOOL_EJECTION_FAILURES:
        return {"failure_streak": streak}
    seconds = min(
        settings.KIROPOOL_EJECTION_BASE_SECONDS * 2**identity.ejections, settings.KIROPOOL_EJECTION_MAX_SECONDS
    )
    until = now + timedelta(seconds=seconds)
    CooldownEvent.objects.create(
        kind=CooldownKind.EJECTED,
        identity_id=identity_id,
        # The column's length: the gateway's message may fill it alone.
        reason=f"{streak} failed completions in a row ({_reason(completion, completion.outcome)})"[:REASON_LENGTH],
        until=until,
        created_at=now,
    )
    transaction.on_commit(metrics.ejection_observe)
    return {"failure_streak": 0, "ejections": identity.ejections + 1, "ejected_until": until}


def _ejected_since(*, identity_id: int, started_at: datetime) -> bool:
    """Whether the identity was ejected after ``started_at`` (its ejections'
    events outlive any lease: they are kept for the history's retention)."""
    ejections = CooldownEvent.objects.filter(identity_id=identity_id, kind=CooldownKind.EJECTED)
    return ejections.filter(created_at__gt=started_at).exists()


def _account_effects(*, key: ApiKey, lease: Lease, completion: Completion, now: datetime, cooldown) -> bool:
    """What the outcome says of the account (and its proxy, its session).
    Returns whether the session was bound."""
    outcome = completion.outcome
    if completion.remaining_credits is not None or outcome == LeaseOutcome.QUOTA_EXHAUSTED:
        quotas.identity_reset_before(identity_id=lease.identity_id, started_at=lease.started_at, now=now)
    quotas.account_report(
        identity_id=lease.identity_id,
        account_id=lease.account_id,
        remaining_credits=completion.remaining_credits,
        resets_at=completion.quota_resets_at,
        now=now,
    )
    if outcome == LeaseOutcome.SUCCESS:
        if lease.quota_probe:
            quotas.identity_quota_restore(identity_id=lease.identity_id, reason="a probe lease succeeded", now=now)
        if completion.first_token_ms is not None:
            LatencySample.objects.create(
                account_id=lease.account_id,
                proxy_url=lease.proxy_url,
                first_token_ms=_sample(completion.first_token_ms),
                recorded_at=now,
            )
        if lease.session_id:
            sessions.session_bind(key=key, session_id=lease.session_id, account_id=lease.account_id, now=now)
            return True
    elif completion.report_limited:
        return False  # over the key's rate of capacity-taking reports
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
        quotas.identity_quota_exhaust(
            identity_id=lease.identity_id, reason=_reason(completion, "quota exhausted"), now=now
        )
    return False


def _reason(completion: Completion, default: str) -> str:
    return (completion.error_message or default)[:REASON_LENGTH]


# PostgreSQL aborts one of two transactions that wait on each other (two
# completions moving bindings between the same two accounts in opposite
# directions); the loser is simply run again, as one statement or as the ORM
# transaction alike.
_RETRYABLE_SQLSTATES = {"40P01", "40001"}


def _retrying(operation, attempts: int = 3):
    for attempt in range(attempts):
        try:
            return operation()
        except OperationalError as error:
            sqlstate = getattr(getattr(error, "__cause__", None), "sqlstate", None)
            if sqlstate not in _RETRYABLE_SQLSTATES or attempt == attempts - 1:
                raise
