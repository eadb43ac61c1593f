"""The SPEC's rules as ORM expressions, shared by the candidates read
(``candidates.py``) and the claim statements (``routing/pg.py``,
``routing/slots.py``): what lets a lease start on an identity, the effective
concurrency after an ejection, pacing, and the latency band. Each mirrors a
function of ``routing/readiness.py`` or ``routing/selection.py``; the
property test of the order checks them against those."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from django.db.models import (
    BooleanField,
    Case,
    ExpressionWrapper,
    F,
    FilteredRelation,
    FloatField,
    Func,
    IntegerField,
    Q,
    QuerySet,
    Value,
    When,
)
from django.db.models.functions import Abs, Cast, Coalesce, Floor, Least, Sign
from django.db.models.lookups import LessThan

from routing import selection


class Elapsed(Func):
    """Seconds from ``start`` to ``end`` (datetimes), as a float."""

    output_field = FloatField()
    arity = 2

    def as_postgresql(self, compiler, connection, **extra):
        return self.as_sql(
            compiler, connection, template="EXTRACT(EPOCH FROM (%(expressions)s))::float8", arg_joiner=" - ", **extra
        )

    def as_sqlite(self, compiler, connection, **extra):
        # julianday() resolves to about 50 µs at today's dates: plenty for
        # pacing in milliseconds on the embedded, single-host default.
        return self.as_sql(
            compiler,
            connection,
            template="((julianday(%(expressions)s)) * 86400.0)",
            arg_joiner=") - julianday(",
            **extra,
        )


def identity_claimable(now, slow_start_seconds, *, prefix: str = "", reserved: bool = True, expired_leases=None) -> Q:
    """What lets a lease start on an identity at ``now`` (SPEC §2 and the
    outlier ejection): no cooldown, not ejected, a free slot under its
    effective concurrency (slow start after an ejection), slots held for
    waiting sticky sessions counted unless ``reserved`` is False (the sticky
    session's own claim), pacing allows. Claims check it on the row as locked;
    ``prefix`` reaches the identity from another model (``"identity__"``), and
    ``expired_leases`` discounts leases past their TTL not yet reaped."""
    f = functools.partial(_field, prefix)
    return (
        (Q(**{f("cooldown_until__isnull"): True}) | Q(**{f("cooldown_until__lte"): now}))
        & (Q(**{f("ejected_until__isnull"): True}) | Q(**{f("ejected_until__lte"): now}))
        & slot_free(now, slow_start_seconds, prefix=prefix, reserved=reserved, expired_leases=expired_leases)
        & pacing_allows(now, prefix=prefix)
    )


def slot_free(
    now, slow_start_seconds, *, prefix: str = "", reserved: bool = True, expired_leases=None, plus_leases: int = 0
) -> Q:
    """A slot free under the identity's effective concurrency, the slots held
    for waiting sticky sessions counted unless ``reserved`` is False. With
    ``plus_leases``, as if that many more leases were in flight: the
    one-statement completion, which sees the row after its release, asks
    whether the slot it frees was free before (``routing/pg.py``)."""
    f = functools.partial(_field, prefix)
    held = F(f("in_flight"))
    if plus_leases:
        held = held + Value(plus_leases)
    if expired_leases is not None:
        held = held - expired_leases
    if reserved:
        held = held + Case(When(**{f("sticky_wait_until__gt"): now}, then=F(f("sticky_waiters"))), default=Value(0))
    return Q(LessThan(held, effective_concurrency(now, slow_start_seconds, prefix=prefix)))


def effective_concurrency(now, slow_start_seconds, *, prefix: str = ""):
    """``readiness.effective_concurrency`` in SQL: back from an ejection, the
    limit ramps from 1 to ``max_concurrency`` over the slow-start window."""
    f = functools.partial(_field, prefix)
    limit = F(f("max_concurrency"))
    since = Elapsed(Value(now), F(f("ejected_until")))
    window = Value(slow_start_seconds, output_field=FloatField())
    ramp = Least(
        Cast(limit, FloatField()),
        ExpressionWrapper(1 + Floor((limit - 1) * since / window), output_field=FloatField()),
    )
    return Case(
        When(Q(**{f("ejected_until__lte"): now}) & Q(LessThan(since, window)), then=ramp),
        default=Cast(limit, FloatField()),
        output_field=FloatField(),
    )


def pacing_allows(now, *, prefix: str = "") -> Q:
    f = functools.partial(_field, prefix)
    elapsed_ms = ExpressionWrapper(Elapsed(Value(now), F(f("last_started_at"))) * 1000.0, output_field=FloatField())
    return (
        Q(**{f("min_start_interval_ms"): 0})
        | Q(**{f("last_started_at__isnull"): True})
        | Q(**{f("min_start_interval_ms__lte"): elapsed_ms})
    )


def _field(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def latency_joins(queryset: QuerySet, snapshot_id: int) -> QuerySet:
    """Accounts joined to their and their proxy's stats in the snapshot
    ``snapshot_id``, the joins :func:`band` reads."""
    return queryset.alias(
        account_stat=FilteredRelation("latency_stats", condition=Q(latency_stats__snapshot_id=snapshot_id)),
        proxy_stat=FilteredRelation("proxy__latency_stats", condition=Q(proxy__latency_stats__snapshot_id=snapshot_id)),
    )


def band_values(global_avg_ms: float) -> dict[str, float]:
    """The parameters of :func:`band` for a snapshot's global average."""
    return {
        "global_avg_ms": global_avg_ms,
        "band_width_ms": 2 * selection.band_tolerance(global_avg_ms),
        "account_part_ms": selection.account_score_part(None, global_avg_ms),
        "proxy_part_ms": selection.proxy_score_part(None, global_avg_ms),
    }


def band(values: Mapping[str, object]):
    """SPEC §2's latency band, computed by the database with the same
    floating-point operations as ``selection.latency_band``: the score is the
    account's part plus the proxy's part, each as the snapshot refresh stored
    it (``selection.account_score_part`` / ``proxy_score_part``), or the
    global average's when there are no samples; the band is the score's
    distance from G in band widths, rounded half away from zero."""
    g = Value(values["global_avg_ms"], output_field=FloatField())
    score = ExpressionWrapper(
        Coalesce(F("account_stat__score_part"), Value(values["account_part_ms"], output_field=FloatField()))
        + Coalesce(F("proxy_stat__score_part"), Value(values["proxy_part_ms"], output_field=FloatField())),
        output_field=FloatField(),
    )
    x = ExpressionWrapper(
        (score - g) / Value(values["band_width_ms"], output_field=FloatField()), output_field=FloatField()
    )
    whole = Floor(Abs(x))
    magnitude = Case(When(GreaterEqualHalf(Abs(x) - whole), then=whole + 1), default=whole, output_field=FloatField())
    return Cast(Sign(x) * magnitude, IntegerField())


class GreaterEqualHalf(Func):
    """``value >= 0.5`` as a condition (for ``When``)."""

    template = "(%(expressions)s >= 0.5)"
    output_field = BooleanField()
    conditional = True
