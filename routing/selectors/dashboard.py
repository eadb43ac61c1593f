"""Reads of the dashboards (SPEC §6): a fixed number of queries per page,
whatever the size of the pool. Live counts come from the hot counters minus
the expired rows not yet purged (the same bounded read the dispatcher makes),
and lists are capped. Credentials are never loaded."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import Avg, Count, Max, Q, Sum
from django.db.models.functions import TruncMinute

from accounts.models import Account
from routing.models import CooldownEvent, Lease, SessionBinding
from routing.selectors.counts import expired_bindings, expired_leases
from routing.selectors.latency import StoredSnapshot, latency_snapshot_latest
from routing.selectors.reaped import lease_floor


def _dashboard_accounts(now: datetime):
    return (
        Account.objects.select_related("identity", "proxy")
        .defer("credentials")
        .annotate(expired_bindings=expired_bindings(now), expired_leases=expired_leases(now, lease_floor()))
    )


def dashboard_accounts(*, now: datetime) -> list[Account]:
    """Every account with its identity and proxy, in one query.

    Annotated with ``expired_bindings`` and ``expired_leases`` (rows past their
    expiry that the periodic tasks have not removed yet), so the live figures
    are ``binding_rows - expired_bindings`` and ``identity.in_flight -
    expired_leases``. Credentials are never loaded."""
    return list(_dashboard_accounts(now).order_by("name"))


def dashboard_account(*, name: str, now: datetime) -> Account | None:
    """One account, annotated like ``dashboard_accounts``."""
    return _dashboard_accounts(now).filter(name=name).first()


def dashboard_identity_aliases(*, identity_id: int, now: datetime) -> list[Account]:
    """Every account of one identity with its ``expired_bindings``, for the identity's session total."""
    return list(
        Account.objects.filter(identity_id=identity_id)
        .only("id", "name", "pool", "enabled", "quota_exhausted", "binding_rows", "identity_id")
        .annotate(expired_bindings=expired_bindings(now))
        .order_by("name")
    )


def dashboard_account_bindings(*, account_id: int, now: datetime):
    """The account's live bindings, most recently used first (a queryset: the page slices it)."""
    return (
        SessionBinding.objects.filter(account_id=account_id, expires_at__gt=now)
        .select_related("api_key")
        .only("id", "session_id", "created_at", "updated_at", "expires_at", "api_key__id", "api_key__name")
        .order_by("-updated_at", "-id")
    )


def dashboard_account_leases(*, account_id: int, limit: int = 50) -> list[Lease]:
    """The account's most recent leases, newest first."""
    return list(
        Lease.objects.filter(account_id=account_id)
        .select_related("api_key")
        .defer("api_key__key_hash", "api_key__model_preferences")
        .order_by("-started_at")[:limit]
    )


def dashboard_account_events(*, account: Account, limit: int = 30) -> list:
    """Cooldown and quota history of the account, its identity and its proxy, newest first."""
    scope = Q(account_id=account.pk) | Q(identity_id=account.identity_id)
    if account.proxy_id is not None:
        scope |= Q(proxy_id=account.proxy_id)
    return list(
        CooldownEvent.objects.filter(scope)
        .select_related("identity", "proxy", "account")
        .only("kind", "reason", "until", "created_at", "identity__name", "proxy__name", "account__name")
        .order_by("-created_at", "-id")[:limit]
    )


def dashboard_account_minutes(*, account_id: int, since: datetime) -> list[dict]:
    """The account's leases started since ``since``, one row per (minute, outcome):
    ``{"minute", "outcome", "leases", "first_token_sum", "first_token_count"}``.

    One aggregate query over the account's index range, so its cost follows
    the window's traffic, not the history kept; the outcome of an uncompleted
    lease is ``""``."""
    return list(
        Lease.objects.filter(account_id=account_id, started_at__gte=since)
        .annotate(minute=TruncMinute("started_at"))
        .values("minute", "outcome")
        .annotate(leases=Count("id"), first_token_sum=Sum("first_token_ms"), first_token_count=Count("first_token_ms"))
        .order_by("minute", "outcome")
    )


def dashboard_pool_latency_minutes(*, since: datetime) -> list[dict]:
    """The whole pool's first-token latency per minute since ``since``:
    ``{"minute", "avg_ms", "samples"}``, the reference an account's line is
    read against. From the leases, which are kept for the history window,
    not the latency samples, which last one snapshot window (an hour)."""
    return list(
        Lease.objects.filter(started_at__gte=since, first_token_ms__isnull=False)
        .annotate(minute=TruncMinute("started_at"))
        .values("minute")
        .annotate(avg_ms=Avg("first_token_ms"), samples=Count("id"))
        .order_by("minute")
    )


def dashboard_latency_snapshot() -> StoredSnapshot | None:
    """The newest stored snapshot, uncached: a page shows what is stored now."""
    return latency_snapshot_latest()


def dashboard_binding(*, binding_id: int) -> SessionBinding | None:
    return (
        SessionBinding.objects.select_related("account")
        .only("id", "session_id", "account__name")
        .filter(pk=binding_id)
        .first()
    )


# The window of the sticky statistics on the overview.
STICKY_WINDOW = timedelta(hours=1)


def dashboard_sticky_stats(*, now: datetime) -> tuple[dict[str, int], float | None, float | None]:
    """Leases of bound sessions started in the last hour: how many were
    served at once, after waiting, or moved; the waits' mean and maximum."""
    rows = (
        Lease.objects.filter(started_at__gte=now - STICKY_WINDOW)
        .exclude(sticky="")
        .values("sticky")
        .annotate(n=Count("*"), wait_avg=Avg("waited_ms"), wait_max=Max("waited_ms"))
        .order_by()
    )
    counts, avg, top = {}, None, None
    for row in rows:
        counts[row["sticky"]] = row["n"]
        if row["sticky"] == "waited":
            avg, top = row["wait_avg"], row["wait_max"]
    return counts, avg, top
