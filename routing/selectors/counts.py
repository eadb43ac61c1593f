"""Live figures as SQL expressions, shared by every read: the hot counters
minus the rows already past their expiry that the periodic tasks have not
removed yet (SPEC §3, §4: expired rows are ignored at once by every read)."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Count, IntegerField, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce

from routing.models import Lease, SessionBinding


def count_subquery(queryset, field: str) -> Coalesce:
    """COUNT(*) of ``queryset`` correlated on ``field`` = the outer row's key."""
    counted = queryset.order_by().values(field).annotate(n=Count("*")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def expired_bindings(now: datetime, *, account_ref: str = "pk") -> Coalesce:
    """Per account (outer row): its bindings already expired but not yet purged."""
    return count_subquery(SessionBinding.objects.filter(account=OuterRef(account_ref), expires_at__lte=now), "account")


def expired_leases(now: datetime, *, identity_ref: str = "identity_id") -> Coalesce:
    """Per identity (outer row): its live-looking leases already past their TTL."""
    return count_subquery(
        Lease.objects.filter(identity=OuterRef(identity_ref), completed_at__isnull=True, expires_at__lte=now),
        "identity",
    )


def live_leases(now: datetime, *, identity_ref: str = "identity_id") -> Coalesce:
    """Per identity (outer row): its uncompleted leases within their TTL."""
    return count_subquery(
        Lease.objects.filter(identity=OuterRef(identity_ref), completed_at__isnull=True, expires_at__gt=now),
        "identity",
    )
