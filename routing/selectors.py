"""Reads for the decision. A dispatch issues a fixed number of queries here,
whatever the size of the pool or the number of live bindings."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from django.db import connection
from django.db.models import (
    BooleanField,
    Count,
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
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from accounts.models import Account, AccountGroup, ApiKey, RouteStrategy, RoutingIdentity
from routing import selection
from routing.models import LatencySnapshot, Lease, SessionBinding

if TYPE_CHECKING:
    from routing.services import DispatchRequest


@dataclass(frozen=True, slots=True)
class CandidateRow:
    """A selectable account: the pure ``Candidate`` plus the ids and fields
    the services and the response need."""

    candidate: selection.Candidate
    account_id: int
    identity_id: int
    region: str
    profile_arn: str
    expired_leases: int  # live-looking leases on the identity already past their TTL


def _count_subquery(queryset, field: str) -> Coalesce:
    """COUNT(*) of ``queryset`` correlated on ``field`` = the outer row's key."""
    counted = queryset.order_by().values(field).annotate(n=Count("*")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def _expired_bindings(now: datetime) -> Coalesce:
    """Per account (outer row): its bindings already expired but not yet purged."""
    return _count_subquery(SessionBinding.objects.filter(account=OuterRef("pk"), expires_at__lte=now), "account")


def _expired_leases(now: datetime) -> Coalesce:
    """Per account (outer row): its identity's live-looking leases already past their TTL."""
    return _count_subquery(
        Lease.objects.filter(identity=OuterRef("identity_id"), completed_at__isnull=True, expires_at__lte=now),
        "identity",
    )


@dataclass(frozen=True, slots=True)
class Binding:
    account_id: int
    account_name: str


# The dispatcher's one read, written out because it runs on every dispatch:
# compiling the equivalent ORM query (two correlated counts, two session
# subqueries) cost more than running it. Plain SQL that PostgreSQL and SQLite
# both speak; every value is a parameter.
_CANDIDATES_SQL = """
SELECT a.id, a.name, a.pool, a.remaining_credits, a.region, a.profile_arn, a.binding_rows,
       i.id, i.name, i.last_started_at, i.cooldown_until, i.in_flight, i.max_concurrency, i.min_start_interval_ms,
       p.url, p.cooldown_until,
       (SELECT COUNT(*) FROM routing_sessionbinding eb
         WHERE eb.account_id = a.id AND eb.expires_at <= %(now)s),
       (SELECT COUNT(*) FROM routing_lease el
         WHERE el.identity_id = i.id AND el.completed_at IS NULL AND el.expires_at <= %(now)s)
       {session_columns}
  FROM accounts_account a
  JOIN accounts_routingidentity i ON i.id = a.identity_id
  LEFT JOIN accounts_proxy p ON p.id = a.proxy_id
 WHERE a.enabled AND NOT a.quota_exhausted {scope}
"""

# Uncorrelated: evaluated once per query, not per row.
_SESSION_COLUMNS = """,
       (SELECT sb.account_id FROM routing_sessionbinding sb
         WHERE sb.api_key_id = %(key_id)s AND sb.session_id = %(session_id)s AND sb.expires_at > %(now)s),
       (SELECT sa.name FROM routing_sessionbinding sb JOIN accounts_account sa ON sa.id = sb.account_id
         WHERE sb.api_key_id = %(key_id)s AND sb.session_id = %(session_id)s AND sb.expires_at > %(now)s)"""

_SCOPES = {
    RouteStrategy.FIXED: "AND a.id = %(fixed_account_id)s",
    "group": "AND a.id IN (SELECT ga.account_id FROM accounts_accountgroup_accounts ga"
    " WHERE ga.accountgroup_id = %(group_id)s)",
    "all": "",
}


def _scope(key: ApiKey) -> str:
    if key.route_strategy == RouteStrategy.FIXED:
        return RouteStrategy.FIXED
    return "group" if key.account_group_id is not None else "all"


def scoped_sql(sql: str, key: ApiKey) -> str:
    """``sql`` with its ``{scope}`` limited to the key's accounts (alias ``a``)."""
    return sql.replace("{scope}", _SCOPES[_scope(key)])


def scope_params(key: ApiKey) -> dict:
    return {"fixed_account_id": key.fixed_account_id, "group_id": key.account_group_id}


# Only the account the (key, session id) is bound to: the sticky fast path
# needs no other candidate.
_BOUND_ONLY = """
   AND a.id = (SELECT sb.account_id FROM routing_sessionbinding sb
                WHERE sb.api_key_id = %(key_id)s AND sb.session_id = %(session_id)s AND sb.expires_at > %(now)s)"""


@functools.cache
def _candidates_sql(scope: str, with_session: bool, bound_only: bool = False) -> str:
    return _CANDIDATES_SQL.format(
        scope=_SCOPES[scope] + (_BOUND_ONLY if bound_only else ""),
        session_columns=_SESSION_COLUMNS if with_session else "",
    )


def _candidates_fetch(key: ApiKey, *, now: datetime, session_id: str | None, bound_only: bool = False):
    sql = _candidates_sql(_scope(key), bool(session_id), bound_only)
    params = {
        "now": connection.ops.adapt_datetimefield_value(now),
        "key_id": key.pk,
        "session_id": session_id,
        **scope_params(key),
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        values = cursor.fetchall()
    binding = None
    if session_id and values and values[0][-2] is not None:
        binding = Binding(account_id=values[0][-2], account_name=values[0][-1])
    return [_candidate_row(v) for v in values], binding


def dispatch_candidates(
    key: ApiKey, *, now: datetime, session_id: str | None = None
) -> tuple[list[CandidateRow], Binding | None]:
    """The key's enabled, not quota-exhausted accounts, and the live binding
    of (key, session id) if any, in one query.

    Live bound sessions per account come from the trigger-maintained
    ``binding_rows`` minus the rows already expired but not yet purged: an
    index range that the purge task keeps short, so the cost does not grow with
    the number of live bindings. Expired-but-unreaped leases are counted the
    same way, so a lease past its TTL stops counting at once."""
    return _candidates_fetch(key, now=now, session_id=session_id)


def sticky_candidate(key: ApiKey, *, now: datetime, session_id: str) -> CandidateRow | None:
    """The account (key, session id) is bound to, if the binding is live and
    the account is one of the key's selectable accounts: a single-row query."""
    rows, _ = _candidates_fetch(key, now=now, session_id=session_id, bound_only=True)
    return rows[0] if rows else None


def account_credentials(*, account_id: int) -> dict:
    """The account's upstream secrets, decrypted (accounts/fields.py). Only
    the dispatch response of a key with credentials access reads them."""
    credentials = Account.objects.filter(pk=account_id).values_list("credentials", flat=True).first()
    return dict(credentials or {})


def model_preference(key: ApiKey, model: str | None) -> frozenset[str]:
    """Accounts the key prefers for this model; empty when none is active."""
    wanted = key.model_preferences.get(model, []) if model and key.model_preferences else []
    return frozenset(name for name in wanted if isinstance(name, str))


def _aware(value):
    """SQLite hands raw SQL datetimes back naive (they are stored in UTC);
    PostgreSQL's are aware already."""
    if value is None or getattr(value, "tzinfo", None) is not None:
        return value
    if isinstance(value, str):
        value = parse_datetime(value)
    return value.replace(tzinfo=UTC) if timezone.is_naive(value) else value


def _candidate_row(v: tuple) -> CandidateRow:
    (
        pk,
        name,
        pool,
        credits,
        region,
        profile_arn,
        binding_rows,
        identity_id,
        identity_name,
        last_started_at,
        cooldown_until,
        in_flight,
        max_concurrency,
        interval_ms,
        proxy_url,
        proxy_cooldown_until,
        expired_bindings,
        expired_leases,
    ) = v[:18]
    return CandidateRow(
        candidate=selection.Candidate(
            account=name,
            routing_identity=identity_name,
            pool=pool,
            proxy_url=proxy_url,
            proxy_cooldown_until=_aware(proxy_cooldown_until),
            remaining_credits=credits,
            last_started_at=_aware(last_started_at),
            identity_cooldown_until=_aware(cooldown_until),
            in_flight=max(0, in_flight - expired_leases),
            max_concurrency=max_concurrency,
            min_start_interval_ms=interval_ms,
            bound_sessions=max(0, binding_rows - expired_bindings),
        ),
        account_id=pk,
        identity_id=identity_id,
        region=region,
        profile_arn=profile_arn,
        expired_leases=expired_leases,
    )


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """Everything one walk needs, read in a fixed number of queries."""

    now: datetime
    session: str  # "none" | "sticky" | "new"
    binding: Binding | None
    rows: list[CandidateRow]  # the key's selectable accounts
    candidates: list[CandidateRow]  # ... minus the request's exclusions
    snapshot: selection.LatencySnapshot | None
    preferred_accounts: frozenset[str]
    fast_path: CandidateRow | None  # the bound account, when the sticky fast path applies
    ranked: list[selection.Ranked]  # the ordered walk (SPEC §2 keys 1-6)
    walk: list[CandidateRow]  # rows in ``ranked`` order


def dispatch_plan(*, key: ApiKey, request: DispatchRequest, now: datetime) -> DispatchPlan:
    rows, binding = dispatch_candidates(key, now=now, session_id=request.session_id)
    candidates = [row for row in rows if row.candidate.account not in request.exclude_accounts]
    snapshot = latency_snapshot_current() if key.latency_routing_enabled else None
    preferred = model_preference(key, request.model)
    session = "none" if not request.session_id else ("sticky" if binding else "new")
    ctx = selection.SelectionContext(
        now=now,
        preferred_pool=key.preferred_pool,
        latency_routing_enabled=key.latency_routing_enabled,
        snapshot=snapshot,
        preferred_accounts=preferred,
    )
    fast_path = None
    if binding is not None and not preferred:
        bound = next((row for row in candidates if row.account_id == binding.account_id), None)
        if bound is not None and selection.sticky_fast_path_ok(bound.candidate, ctx):
            fast_path = bound
    if request.session_id and fast_path is None:
        # Key 3: a new session, or a bound one that must move, goes to the
        # least-loaded identity.
        ctx = dataclasses.replace(ctx, spread_sessions=True)
    ranked = selection.order_candidates([row.candidate for row in candidates], ctx)
    by_name = {row.candidate.account: row for row in candidates}
    return DispatchPlan(
        now=now,
        session=session,
        binding=binding,
        rows=rows,
        candidates=candidates,
        snapshot=snapshot,
        preferred_accounts=preferred,
        fast_path=fast_path,
        ranked=ranked,
        walk=[by_name[r.candidate.account] for r in ranked],
    )


# --- the latency snapshot ----------------------------------------------------

# The snapshot is rebuilt every 60 s by a task; a process may keep the one it
# read for at most that long, so the dispatch hot path rarely touches the row.
SNAPSHOT_CACHE_SECONDS = 60.0

_snapshot_lock = threading.Lock()
_snapshot_cache: tuple[float, selection.LatencySnapshot | None] | None = None


def snapshot_from_row(row: LatencySnapshot) -> selection.LatencySnapshot:
    def stats(mapping: dict) -> dict[str, selection.LatencyStats]:
        return {name: selection.LatencyStats(samples=int(n), avg_ms=float(avg)) for name, (n, avg) in mapping.items()}

    return selection.LatencySnapshot(
        generated_at=row.generated_at,
        global_avg_ms=row.global_avg_ms,
        accounts=stats(row.accounts),
        proxies=stats(row.proxies),
    )


def latency_snapshot_latest() -> selection.LatencySnapshot | None:
    """The newest stored snapshot, uncached."""
    row = LatencySnapshot.objects.order_by("-generated_at").first()
    return snapshot_from_row(row) if row else None


def latency_snapshot_current() -> selection.LatencySnapshot | None:
    """The newest snapshot, cached in this process for up to a refresh period."""
    global _snapshot_cache
    cached = _snapshot_cache
    if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_CACHE_SECONDS:
        return cached[1]
    snapshot = latency_snapshot_latest()
    with _snapshot_lock:
        _snapshot_cache = (time.monotonic(), snapshot)
    return snapshot


def latency_snapshot_cache_clear() -> None:
    global _snapshot_cache
    with _snapshot_lock:
        _snapshot_cache = None


# --- dashboard reads ----------------------------------------------------------
# A fixed number of queries per page, whatever the size of the pool: live
# counts come from the trigger-kept counters minus the expired rows not yet
# purged (the same bounded read the dispatcher makes), and lists are capped.


def _dashboard_accounts(now: datetime):
    return (
        Account.objects.select_related("identity", "proxy")
        .defer("credentials")
        .annotate(expired_bindings=_expired_bindings(now), expired_leases=_expired_leases(now))
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
        .annotate(expired_bindings=_expired_bindings(now))
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
    from django.db.models import Q

    from routing.models import CooldownEvent

    scope = Q(account_id=account.pk) | Q(identity_id=account.identity_id)
    if account.proxy_id is not None:
        scope |= Q(proxy_id=account.proxy_id)
    return list(
        CooldownEvent.objects.filter(scope)
        .select_related("identity", "proxy", "account")
        .only("kind", "reason", "until", "created_at", "identity__name", "proxy__name", "account__name")
        .order_by("-created_at", "-id")[:limit]
    )


def dashboard_latency_snapshot() -> tuple[selection.LatencySnapshot | None, int]:
    """The newest stored snapshot (uncached: a page shows what is stored now) and its sample count."""
    row = latency_snapshot_row_latest()
    if row is None:
        return None, 0
    return snapshot_from_row(row), row.sample_count


def dashboard_binding(*, binding_id: int) -> SessionBinding | None:
    return (
        SessionBinding.objects.select_related("account")
        .only("id", "session_id", "account__name")
        .filter(pk=binding_id)
        .first()
    )


# --- operator reads ----------------------------------------------------------------
# The operator API's and /metrics' reads: one query per list whatever the size
# of the pool, live figures computed in SQL the way the dispatcher computes them
# (trigger-kept counters minus rows past their expiry, leases past their TTL
# not counted). Credentials are never loaded.


def _live_lease_count(identity_ref: str, *, now: datetime) -> Coalesce:
    return _count_subquery(
        Lease.objects.filter(identity=OuterRef(identity_ref), completed_at__isnull=True, expires_at__gt=now),
        "identity",
    )


def identity_operator_list(*, now: datetime):
    """Identities annotated with ``live_leases`` (uncompleted, within their
    TTL) and ``live_sessions`` (live bindings of all their accounts)."""
    binding_rows = (
        Account.objects.filter(identity=OuterRef("pk")).order_by().values("identity").annotate(n=Sum("binding_rows"))
    )
    expired = _count_subquery(
        SessionBinding.objects.filter(account__identity=OuterRef("pk"), expires_at__lte=now), "account__identity"
    )
    return RoutingIdentity.objects.annotate(
        live_leases=_live_lease_count("pk", now=now),
        live_sessions=Coalesce(Subquery(binding_rows.values("n"), output_field=IntegerField()), Value(0)) - expired,
    ).order_by("name")


def account_operator_list(*, now: datetime):
    """Accounts with identity and proxy, annotated with ``live_sessions`` (its
    own live bindings), ``live_leases`` (its identity's) and ``has_credentials``."""
    return (
        Account.objects.select_related("identity", "proxy")
        .defer("credentials")
        .annotate(
            live_sessions=F("binding_rows") - _expired_bindings(now),
            live_leases=_live_lease_count("identity_id", now=now),
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


def latency_snapshot_row_latest() -> LatencySnapshot | None:
    """The newest stored snapshot row, uncached: what the operator asked to see."""
    return LatencySnapshot.objects.order_by("-generated_at", "-id").first()
