"""The candidates read: the key's candidate accounts as one ORM queryset,
ordered by the database exactly as ``routing/selection.py`` orders them.

:func:`candidates_queryset` is the specification of the read. Every sort key
of the ordering contract (SPEC §2) is an annotation, and the queryset's
``ORDER BY`` is the contract's key order, so a dispatch reads only the head
of the order (``HEAD_ROWS`` rows, the ones a lease could start on now first)
whatever the size of the pool. The rules it applies (what makes an identity
claimable, the latency band) are expressions of ``rules.py``. The explain
endpoint (``explain.py``) reads every row of the same queryset and orders it
with ``selection.order_candidates``; a property-based test checks on random
pools that both orders agree. ``dispatch.py`` runs it for a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.db.models import (
    BooleanField,
    Case,
    ExpressionWrapper,
    F,
    FloatField,
    IntegerField,
    Max,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce, Collate, Greatest

from accounts.models import Account, ApiKey, RouteStrategy
from routing import selection
from routing.models import SessionBinding
from routing.selectors import counts, rules, walk

# Rows of the order a dispatch reads: the first is claimed, and the others
# are there for when a concurrent dispatch took its slot a moment earlier.
HEAD_ROWS = 4


# --- the shape of a candidates read ------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What changes the SQL of the read (everything else is a parameter)."""

    scope: str  # "fixed", "group" or "all"
    preferred_pool: str
    with_session: bool = False  # read the (key, session id) binding too
    bound_only: bool = False  # only the bound account (the sticky read)
    spread: bool = False  # SPEC §2 key 3 is active
    latency: bool = False  # the snapshot may order (bands)
    excluded: int = 0  # number of excluded names
    preferred: int = 0  # number of model-preferred names
    head: bool = False  # only the first HEAD_ROWS rows, ready ones first
    walk: bool = False  # order only the walked and special accounts (walk.py)


def scope_of(key: ApiKey) -> str:
    if key.route_strategy == RouteStrategy.FIXED:
        return "fixed"
    return "group" if key.account_group_id is not None else "all"


PARAMETERS = {
    "now": datetime,
    "lease_floor": datetime,  # reaped.lease_floor: no lease that expired before it is open
    "slow_start_seconds": float,
    "key_id": int,
    "session_id": str,
    "group_id": int,  # written into the statement, not sent (dispatch.compiled)
    "fixed_account_id": int,
    "snapshot_id": int,
    "global_avg_ms": float,
    "band_width_ms": float,  # 2 × the band tolerance
    "account_part_ms": float,  # an account's part of a score without samples (G, weighted)
    "proxy_part_ms": float,  # a proxy's part without samples, or without a proxy
}


def live_binding(values: Mapping[str, object]) -> QuerySet:
    """The account of the live binding of (key, session id), if any: the
    sticky read's condition, and the binding look-up's
    (``dispatch.session_bound``)."""
    return SessionBinding.objects.filter(
        api_key_id=values["key_id"], session_id=values["session_id"], expires_at__gt=values["now"]
    ).values("account_id")[:1]


def candidates_queryset(shape: Shape, values: Mapping[str, object]) -> QuerySet:
    """The key's selectable accounts with every sort key of SPEC §2, in
    dispatch order. ``values`` holds the parameters (``PARAMETERS``, and the
    lists ``excluded`` and ``preferred``)."""
    now = values["now"]
    # Out of selection: quota exhausted, or a known balance at or below the
    # account's minimum; back at the reset time, or for one probe lease when
    # no reset time is known (half-open).
    spent = Q(quota_exhausted=True) | Q(
        remaining_credits__isnull=False, remaining_credits__lte=F("min_remaining_credits")
    )
    reset = Q(quota_resets_at__lte=now)
    probe = Q(quota_resets_at__isnull=True, quota_next_probe_at__lte=now)
    selectable = Q(enabled=True) & (~spent | reset | probe)
    accounts = Account.objects.filter(selectable)
    if shape.scope == "fixed":
        accounts = accounts.filter(pk=values["fixed_account_id"])
    elif shape.scope == "group":
        accounts = accounts.filter(groups=values["group_id"])
    # The candidate set before any annotation: key 3 and the credit_first
    # balance of an unknown account aggregate over it (subqueries, below).
    candidates = accounts
    if shape.walk:
        accounts = accounts.filter(
            pk__in=walk.head_or_special(selectable, values, spread=shape.spread, latency=shape.latency, rows=HEAD_ROWS)
        )

    binding = live_binding(values)
    if shape.bound_only:
        accounts = accounts.filter(pk=Subquery(binding))

    if shape.latency:
        accounts = rules.latency_joins(accounts, values["snapshot_id"])
    # Excluded accounts stay in the read (key 3 counts their sessions) and
    # sort after every account a lease could start on.
    included = ~Q(name__in=values["excluded"]) if shape.excluded else Q()
    accounts = accounts.annotate(
        expired_leases=counts.unreaped_leases(now, values["lease_floor"]),
        excluded=(
            ExpressionWrapper(Q(name__in=values["excluded"]), output_field=BooleanField())
            if shape.excluded
            else Value(False)
        ),
        # CASE, not the bare comparison: without a proxy it would be NULL,
        # which PostgreSQL sorts after true and SQLite before false.
        proxy_cooling=Case(When(proxy__cooldown_until__gt=now, then=Value(True)), default=Value(False)),
        quota_probe=ExpressionWrapper(spent & ~reset, output_field=BooleanField()),
        reserved=Case(When(identity__sticky_wait_until__gt=now, then=F("identity__sticky_waiters")), default=Value(0)),
        ready=ExpressionWrapper(
            included
            & rules.identity_claimable(
                now, values["slow_start_seconds"], prefix="identity__", expired_leases=F("expired_leases")
            ),
            output_field=BooleanField(),
        ),
    )
    if shape.bound_only:
        # One row, the bound account's, for the sticky fast path: whether a
        # lease can start on it is all it asks. The sort keys are not read (and
        # planning them for every sticky claim cost more than running it).
        return accounts.annotate(
            **{name: Value(None, output_field=output) for name, output in _SORT_KEY_OUTPUTS.items()},
            live_sessions=Value(None, output_field=IntegerField()),
            bound_account_id=F("id"),
        ).values_list(*COLUMNS)
    accounts = accounts.annotate(
        live_sessions=_live_sessions(now),
        model_preferred=(
            ExpressionWrapper(Q(name__in=values["preferred"]), output_field=BooleanField())
            if shape.preferred
            else Value(False)
        ),
        pool_rank=Case(
            *(When(pool=pool, then=Value(rank)) for pool, rank in selection.pool_ranks(shape.preferred_pool).items()),
            output_field=IntegerField(),
        ),
        # Credits descending, a key of each pool's tie-breakers at its own
        # place (below): one column per place, 0 in the other pool, so each
        # row computes its balance once and the order reads the columns.
        # Unknown in credit_first: the best known credit_first balance among
        # the candidates (SPEC §2), so a fresh account is not starved; a
        # subquery the database runs at most once (an InitPlan), and only
        # when a row needs it. (A window over every row cost a third of a
        # 1,000-account read.)
        credit_first_credits=Case(
            When(
                pool=selection.POOL_CREDIT_FIRST,
                then=-Coalesce(
                    "remaining_credits",
                    Subquery(_best_credit_first(candidates.filter(included)), output_field=FloatField()),
                    Value(0.0),
                ),
            ),
            default=Value(0.0),
            output_field=FloatField(),
        ),
        balanced_credits=Case(
            When(
                pool=selection.POOL_BALANCED,
                then=-Coalesce("remaining_credits", Value(selection.UNKNOWN_BALANCED_CREDITS)),
            ),
            default=Value(0.0),
            output_field=FloatField(),
        ),
        band=rules.band(values) if shape.latency else Value(None, output_field=IntegerField()),
        identity_sessions=(
            _identity_sessions(candidates, now) if shape.spread else Value(None, output_field=IntegerField())
        ),
        bound_account_id=(
            Subquery(binding, output_field=IntegerField()) if shape.with_session else Value(None, IntegerField())
        ),
        credit_burn=Case(
            # Credit pacing: credits an hour to burn to use the balance before
            # the reset (selection.credit_burn_per_hour).
            When(
                pool=selection.POOL_CREDIT_FIRST,
                remaining_credits__isnull=False,
                quota_resets_at__isnull=False,
                then=ExpressionWrapper(
                    F("remaining_credits")
                    * Value(3600.0)
                    / Greatest(
                        rules.Elapsed(F("quota_resets_at"), Value(now)),
                        Value(selection.MIN_PACING_SECONDS),
                    ),
                    output_field=FloatField(),
                ),
            ),
            default=Value(None, output_field=FloatField()),
        ),
    )
    order = [F("ready").desc()] if shape.head else []
    order += [
        F("proxy_cooling").asc(),
        F("model_preferred").desc(),
        F("identity_sessions").asc(),
        F("pool_rank").asc(),
        # credit_first: credit pacing, credits, band, last started; balanced:
        # band, last started, credits. One layout each, told apart by the pool
        # rank above (credit pacing is NULL in the balanced pool).
        F("credit_burn").desc(nulls_last=True),
        F("credit_first_credits").asc(),
        F("band").asc(nulls_last=True),
        F("identity__last_started_at").asc(nulls_first=True),
        F("balanced_credits").asc(),
        Collate(F("name"), _BINARY_COLLATION[connection.vendor]),
    ]
    accounts = accounts.order_by(*order).values_list(*COLUMNS)
    return accounts[:HEAD_ROWS] if shape.head else accounts


def _live_sessions(now: datetime):
    """An account's live bindings: the trigger-kept counter minus the rows
    already past their expiry that the periodic task has not removed yet.
    Those rows are few, so the correction probes only the accounts that have
    any, not every row of the pool."""
    expired = Case(
        When(
            pk__in=SessionBinding.objects.filter(counts.expired(now)).values("account_id"),
            then=counts.expired_bindings(now),
        ),
        default=Value(0),
    )
    return ExpressionWrapper(F("binding_rows") - expired, output_field=IntegerField())


def _best_credit_first(candidates: QuerySet) -> QuerySet:
    """The best known credit_first balance among ``candidates`` (one row)."""
    known = candidates.filter(pool=selection.POOL_CREDIT_FIRST, remaining_credits__isnull=False)
    return known.order_by().values("pool").annotate(best=Max("remaining_credits")).values("best")


def _identity_sessions(candidates: QuerySet, now: datetime):
    """Key 3: the live sessions of the row's identity, summed over every
    candidate of the key (excluded ones included). An identity with one
    account has that account's own figure; only one with aliases sums over
    its candidates (a correlated subquery). Which identities have aliases is
    the trigger-kept ``account_rows`` of the identity row the read joins
    anyway: counting the account table on every read cost 1.0-1.5 ms. A
    window partitioned by identity had to sort every row of the pool to say
    the same."""
    summed = (
        candidates.filter(identity_id=OuterRef("identity_id"))
        .order_by()
        .values("identity_id")
        .annotate(total=Sum(_live_sessions(now)))
        .values("total")
    )
    return Case(
        When(identity__account_rows__gt=1, then=Subquery(summed, output_field=IntegerField())),
        default=F("live_sessions"),
        output_field=IntegerField(),
    )


# The sort keys a bound-only read leaves out, with their types.
_SORT_KEY_OUTPUTS = {
    "model_preferred": BooleanField(),
    "identity_sessions": IntegerField(),
    "pool_rank": IntegerField(),
    "band": IntegerField(),
    "credit_first_credits": FloatField(),
    "balanced_credits": FloatField(),
    "credit_burn": FloatField(),
}

# Account names order by code point, as Python compares strings.
_BINARY_COLLATION = {"postgresql": "C", "sqlite": "BINARY"}

COLUMNS = (
    "id",
    "name",
    "pool",
    "remaining_credits",
    "region",
    "profile_arn",
    "identity_id",
    "identity__name",
    "identity__last_started_at",
    "identity__cooldown_until",
    "identity__in_flight",
    "identity__max_concurrency",
    "identity__min_start_interval_ms",
    "proxy__url",
    "proxy__cooldown_until",
    "identity__ejected_until",
    "quota_resets_at",
    "quota_probe",
    "reserved",
    "expired_leases",
    "live_sessions",
    "excluded",
    "ready",
    "bound_account_id",
    # the sort keys, as the database computed them (SortKeys)
    "proxy_cooling",
    "model_preferred",
    "identity_sessions",
    "pool_rank",
    "band",
    "credit_first_credits",
    "balanced_credits",
    "credit_burn",
)
