"""Reads of the operator API and /metrics: one query per list whatever the
size of the pool, live figures computed in SQL the way the dispatcher
computes them (hot counters minus rows past their expiry, leases past their
TTL not counted). Credentials are never loaded."""

from __future__ import annotations

from datetime import datetime

from django.db.models import (
    BooleanField,
    ExpressionWrapper,
    F,
    IntegerField,
    OuterRef,
    Prefetch,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce

from accounts.models import Account, AccountGroup, RoutingIdentity
from routing.models import COUNTER_NAMES, CounterDrift, LatencySnapshot, SessionBinding
from routing.selectors.counts import count_subquery, expired_bindings, live_leases


def identity_operator_list(*, now: datetime):
    """Identities annotated with ``live_leases`` (uncompleted, within their
    TTL) and ``live_sessions`` (live bindings of all their accounts)."""
    binding_rows = (
        Account.objects.filter(identity=OuterRef("pk")).order_by().values("identity").annotate(n=Sum("binding_rows"))
    )
    expired = count_subquery(
        SessionBinding.objects.filter(account__identity=OuterRef("pk"), expires_at__lte=now), "account__identity"
    )
    return RoutingIdentity.objects.annotate(
        live_leases=live_leases(now, identity_ref="pk"),
        live_sessions=Coalesce(Subquery(binding_rows.values("n"), output_field=IntegerField()), Value(0)) - expired,
    ).order_by("name")


def account_operator_list(*, now: datetime):
    """Accounts with identity and proxy, annotated with ``live_sessions`` (its
    own live bindings), ``live_leases`` (its identity's) and ``has_credentials``."""
    return (
        Account.objects.select_related("identity", "proxy")
        .defer("credentials")
        .annotate(
            live_sessions=F("binding_rows") - expired_bindings(now),
            live_leases=live_leases(now),
            has_credentials=ExpressionWrapper(~Q(credentials={}), output_field=BooleanField()),
        )
        .order_by("name")
    )


def group_operator_list():
    """Groups with their account names prefetched: two queries for the list."""
    return AccountGroup.objects.prefetch_related(
        Prefetch("accounts", queryset=Account.objects.only("id", "name").order_by("name"))
    ).order_by("name")


def binding_operator_list(*, now: datetime, account: str | None = None, key_id: int | None = None):
    """Live session bindings, most recently used first, optionally of one
    account (by name) and/or one API key (by id)."""
    bindings = (
        SessionBinding.objects.filter(expires_at__gt=now)
        .select_related("account", "api_key")
        .only(
            "id",
            "session_id",
            "created_at",
            "updated_at",
            "expires_at",
            "account__id",
            "account__name",
            "api_key__id",
            "api_key__name",
        )
        .order_by("-updated_at", "-id")
    )
    if account is not None:
        bindings = bindings.filter(account__name=account)
    if key_id is not None:
        bindings = bindings.filter(api_key_id=key_id)
    return bindings


def latency_snapshot_newest_state() -> tuple[datetime, float | None, datetime | None] | None:
    """When the newest latency snapshot was built, its global average and
    when its bands were whole (``bands_whole_at``); None without a snapshot."""
    return LatencySnapshot.objects.newest_first().values_list("generated_at", "global_avg_ms", "bands_whole_at").first()


def counter_drift_list() -> list[tuple[str, int]]:
    """(counter, total drift found) for every counter of the reconcile task,
    0 for those never off, so the series exists from the first scrape."""
    found = dict(CounterDrift.objects.values_list("counter", "total"))
    return [(name, found.get(name, 0)) for name in COUNTER_NAMES]
