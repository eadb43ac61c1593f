"""Live figures as SQL expressions, shared by every read: the hot counters
minus the rows already past their expiry that the periodic tasks have not
removed yet (SPEC §3, §4: expired rows are ignored at once by every read)."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db.models import Case, Count, IntegerField, OuterRef, Q, Subquery, Value, When
from django.db.models.functions import Coalesce

from routing.models import Lease, SessionBinding

# Earlier than any expiry a row can have. Every "already expired" condition
# of the reads says "after it" too: that changes no result, but it tells a
# generic plan (a prepared read planned once, without knowing ``now``) that
# few rows are expired. PostgreSQL estimates a comparison with an unknown
# value at a third of the table, and a range between two unknown values at
# 0.5 %; with a third of 65,536 bindings expected, the read's hashed subplan
# over expired bindings took 0.5 ms to set up even when it found none.
EXPIRY_FLOOR = datetime(1970, 1, 1, tzinfo=UTC)


def expired(now: datetime, floor: datetime = EXPIRY_FLOOR) -> Q:
    """The rows (leases, bindings) whose expiry has passed at ``now``; of
    leases, those that expired after ``floor`` (``reaped.lease_floor``:
    every lease that expired before it is closed)."""
    return Q(expires_at__gt=floor, expires_at__lte=now)


def count_subquery(queryset, field: str) -> Coalesce:
    """COUNT(*) of ``queryset`` correlated on ``field`` = the outer row's key."""
    counted = queryset.order_by().values(field).annotate(n=Count("*")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def expired_bindings(now: datetime, *, account_ref: str = "pk") -> Coalesce:
    """Per account (outer row): its bindings already expired but not yet purged."""
    return count_subquery(SessionBinding.objects.filter(expired(now), account=OuterRef(account_ref)), "account")


def expired_leases(now: datetime, floor: datetime = EXPIRY_FLOOR, *, identity_ref: str = "identity_id") -> Coalesce:
    """Per identity (outer row): its live-looking leases already past their TTL."""
    return count_subquery(
        Lease.objects.filter(expired(now, floor), identity=OuterRef(identity_ref), completed_at__isnull=True),
        "identity",
    )


def live_leases(now: datetime, *, identity_ref: str = "identity_id") -> Coalesce:
    """Per identity (outer row): its uncompleted leases within their TTL."""
    return count_subquery(
        Lease.objects.filter(identity=OuterRef(identity_ref), completed_at__isnull=True, expires_at__gt=now),
        "identity",
    )


def unreaped_leases(now: datetime, floor: datetime) -> Case:
    """Per account (outer row): :func:`expired_leases` of its identity, probed
    only for the identities that have any (few: the reaper closes them), not
    for every row of the pool; among the leases that expired after ``floor``."""
    return Case(
        When(
            identity_id__in=Lease.objects.filter(expired(now, floor), completed_at__isnull=True).values("identity_id"),
            then=expired_leases(now, floor),
        ),
        default=Value(0),
    )
