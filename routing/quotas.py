"""Writes of the accounts' upstream quota: exhaustion, balances, resets and
the half-open probe.

An account is out of selection while its quota is exhausted or its known
balance is at or below its ``min_remaining_credits``. It comes back:

- at its ``quota_resets_at`` (set by an operator or reported by a
  completion; the read lets it in at that moment, and the periodic
  :func:`quota_resets_apply` records the reset and clears the state);
- without a known reset time, through one probe lease every
  ``KIROPOOL_QUOTA_PROBE_SECONDS`` (half-open): a success or a balance above
  its minimum restores it, another exhaustion restarts the wait;
- when an operator resets it.

The quota belongs to the upstream user, so exhaustion, resets and probes
cover every alias of the routing identity.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from accounts.models import Account
from routing.models import CooldownEvent, CooldownKind


def _next_probe(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.KIROPOOL_QUOTA_PROBE_SECONDS)


def identity_quota_exhaust(*, identity_id: int, reason: str, now: datetime) -> int:
    """Take every alias of the identity out of selection; the first probe
    may go at ``now + KIROPOOL_QUOTA_PROBE_SECONDS`` unless a reset time is known."""
    ids = list(Account.objects.filter(identity_id=identity_id, quota_exhausted=False).values_list("id", flat=True))
    Account.objects.filter(identity_id=identity_id).update(
        quota_exhausted=True,
        quota_exhausted_at=now,
        quota_exhausted_reason=reason,
        quota_next_probe_at=_next_probe(now),
    )
    CooldownEvent.objects.bulk_create(
        CooldownEvent(
            kind=CooldownKind.QUOTA_EXHAUSTED, account_id=pk, identity_id=identity_id, reason=reason, created_at=now
        )
        for pk in ids
    )
    return len(ids)


def identity_quota_restore(*, identity_id: int, reason: str, now: datetime) -> int:
    """Put every alias of the identity back into selection; a balance at or
    below the minimum is forgotten (it is what took them out)."""
    return accounts_quota_restore(
        accounts=Account.objects.filter(identity_id=identity_id), reason=reason, now=now, identity_id=identity_id
    )


def accounts_quota_restore(*, accounts: QuerySet, reason: str, now: datetime, identity_id: int | None = None) -> int:
    """Put the spent ones of ``accounts`` back into selection: those whose
    quota is exhausted, and those whose known balance is at or below their
    minimum (the balance is forgotten: it is what took them out). Their
    probe's wait ends with them. Returns how many; each gets an event
    (naming ``identity_id`` when the restore was the identity's)."""
    spent = Q(quota_exhausted=True) | Q(remaining_credits__lte=F("min_remaining_credits"))
    ids = list(accounts.filter(spent).values_list("id", flat=True))
    Account.objects.filter(id__in=ids).update(
        quota_exhausted=False,
        quota_exhausted_at=None,
        quota_exhausted_reason="",
        quota_next_probe_at=None,
    )
    Account.objects.filter(id__in=ids, remaining_credits__lte=F("min_remaining_credits")).update(remaining_credits=None)
    CooldownEvent.objects.bulk_create(
        CooldownEvent(
            kind=CooldownKind.QUOTA_RESET, account_id=pk, identity_id=identity_id, reason=reason, created_at=now
        )
        for pk in ids
    )
    return len(ids)


def account_report(
    *,
    identity_id: int,
    account_id: int,
    remaining_credits: float | None,
    resets_at: datetime | None,
    now: datetime,
) -> None:
    """What a completion reported of the account's quota."""
    if resets_at is not None:
        # The reset time is the upstream user's, so every alias shares it.
        Account.objects.filter(identity_id=identity_id).update(quota_resets_at=resets_at)
    if remaining_credits is None:
        return
    Account.objects.filter(pk=account_id).update(remaining_credits=remaining_credits)
    above = Q(pk=account_id, min_remaining_credits__lt=remaining_credits)
    back = Account.objects.filter(above, quota_exhausted=True).values_list("id", flat=True)
    for pk in list(back):
        Account.objects.filter(pk=pk).update(
            quota_exhausted=False, quota_exhausted_at=None, quota_exhausted_reason="", quota_next_probe_at=None
        )
        CooldownEvent.objects.create(
            kind=CooldownKind.QUOTA_RESET,
            account_id=pk,
            identity_id=identity_id,
            reason=f"a balance of {remaining_credits:g} was reported",
            created_at=now,
        )
    accounts_probe_schedule(accounts=Account.objects.filter(pk=account_id), now=now)


def accounts_probe_schedule(*, accounts: QuerySet, now: datetime) -> int:
    """Those of ``accounts`` whose known balance is at or below their
    minimum (reported, or set by an operator) stop being handed out; without
    a reset time they get a probe later, like an exhausted account. A probe
    time already past is one left from an earlier spell (the balance came
    back since, reported or set by an operator): the wait starts now. One
    to come is kept: the probe taken, or another lease's report, started it.
    Returns how many got a probe time."""
    no_probe_to_come = Q(quota_next_probe_at__isnull=True) | Q(quota_next_probe_at__lte=now)
    return accounts.filter(no_probe_to_come, remaining_credits__lte=F("min_remaining_credits")).update(
        quota_next_probe_at=_next_probe(now)
    )


def quota_resets_apply(*, now: datetime | None = None) -> int:
    """Return to selection every account whose quota reset time has come
    (every alias of its identity), and record it. Returns how many accounts."""
    now = now or timezone.now()
    identities = set(Account.objects.filter(quota_resets_at__lte=now).values_list("identity_id", flat=True).distinct())
    return sum(_identity_reset(identity_id=identity_id, now=now) for identity_id in sorted(identities))


def identity_reset_before(*, identity_id: int, started_at: datetime, now: datetime) -> int:
    """Before a completion's quota report: apply the identity's reset now if
    its time came before the lease started. The report then tells of the
    quota since the reset, and lands on it: an exhaustion or an empty
    balance takes the accounts out again (the read lets every account of a
    passed reset time in, and the periodic task would have cleared the
    report with the reset). A reset that came while the lease was out is
    left to the periodic task: the report may tell of the quota before it."""
    if not Account.objects.filter(identity_id=identity_id, quota_resets_at__lte=started_at).exists():
        return 0
    return _identity_reset(identity_id=identity_id, now=now, due_by=started_at)


def _identity_reset(*, identity_id: int, now: datetime, due_by: datetime | None = None) -> int:
    """Apply the identity's reset if its time came by ``due_by`` (default
    ``now``) and no one has applied it since. The aliases are locked first,
    and whether the reset is still due is read after, in a statement of its
    own: the caller decided from an earlier read (the task, from its list of
    identities; a completion, from its check), and meanwhile a completion
    may have applied the reset and reported the quota spent again. Applied
    once more, the reset would undo that report and hand the spent accounts
    out again."""
    with transaction.atomic():
        aliases = Account.objects.filter(identity_id=identity_id)
        list(aliases.select_for_update().order_by("pk").values_list("pk", flat=True))
        if not aliases.filter(quota_resets_at__lte=due_by or now).exists():
            return 0
        restored = identity_quota_restore(identity_id=identity_id, reason="the quota reset time came", now=now)
        Account.objects.filter(identity_id=identity_id, quota_resets_at__lte=now).update(quota_resets_at=None)
    return restored
