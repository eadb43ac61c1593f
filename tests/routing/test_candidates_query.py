"""The dispatcher's read against its specification.

``candidates_queryset`` orders the key's accounts in the database; the
ordering contract itself is ``selection.order_candidates``. On random pools
both must agree, account for account and key for key. And the compiled-once
SQL must be exactly what Django compiles afresh for the same values."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import Account, AccountGroup, ApiKey, Pool, Proxy, RoutingIdentity
from routing import readiness, selection
from routing.dispatch import DispatchRequest
from routing.models import LatencySnapshot, Lease, SessionBinding
from routing.selectors import dispatch as reads
from routing.selectors.candidates import HEAD_ROWS, PARAMETERS, Shape, candidates_queryset
from routing.selectors.compiled import CompiledQuery, adapt, sentinel_values
from routing.selectors.latency import latency_snapshot_latest
from tests.factories import AccountFactory, ApiKeyFactory, latency_snapshot_create
from tests.routing.reads import head_read

pytestmark = pytest.mark.django_db


# --- compiled once, the same as compiled afresh ------------------------------------------


SHAPES = [
    Shape(scope="all", preferred_pool=Pool.BALANCED),
    Shape(scope="group", preferred_pool=Pool.CREDIT_FIRST, with_session=True, spread=True, head=True),
    Shape(scope="fixed", preferred_pool=Pool.BALANCED, with_session=True, bound_only=True, excluded=2),
    Shape(scope="all", preferred_pool=Pool.BALANCED, latency=True, excluded=1, preferred=3, head=True),
]


def _values(shape: Shape, **changes) -> dict[str, object]:
    """A request's values for a read of ``shape``, with ``changes``."""
    return {
        "now": timezone.now(),
        "key_id": 41,
        "session_id": "conversation-7",
        "group_id": 3,
        "fixed_account_id": 12,
        "snapshot_id": 99,
        "global_avg_ms": 512.5,
        "band_width_ms": 153.75,
        "account_part_ms": 358.75,
        "proxy_part_ms": 153.75000000000003,
        "slow_start_seconds": 60.0,
        "excluded": [f"gone-{i}" for i in range(shape.excluded)],
        "preferred": [f"liked-{i}" for i in range(shape.preferred)],
        **changes,
    }


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.scope}-{s.excluded}x-{s.preferred}p")
def test_the_cached_sql_is_what_django_compiles_afresh(shape):
    values = _values(shape)
    now = values["now"]
    cached = reads.compiled(shape)
    fresh_sql, fresh_params = candidates_queryset(shape, values).query.sql_with_params()
    assert cached.sql == fresh_sql
    assert cached.params(values) == [adapt(p) for p in fresh_params]
    # and with other values, still the same statement
    later = {**values, "now": now + timedelta(minutes=3), "key_id": 5, "session_id": "other"}
    assert cached.params(later) == [adapt(p) for p in candidates_queryset(shape, later).query.sql_with_params()[1]]


def test_the_group_is_written_into_the_statement_and_every_other_value_sent():
    """What runs is Django's statement with the group's id in place of its
    parameters: the same SQL and values otherwise."""
    shape, group = SHAPES[1], 7_654_321
    values = _values(shape, group_id=group)
    sql, params = reads.compiled(shape).statement(values)
    fresh_sql, fresh_params = candidates_queryset(shape, values).query.sql_with_params()
    fresh = iter(fresh_params)
    written = re.sub(r"%s", lambda _: str(group) if next(fresh) == group else "%s", fresh_sql)
    assert fresh_sql.count("%s") - sql.count("%s") == fresh_params.count(group) == 3  # the read and two subqueries
    assert sql == written
    assert params == [adapt(p) for p in fresh_params if p != group]


def test_only_an_integer_is_ever_written_into_a_statement():
    """A written value is SQL text: a session id there would be an injection."""
    query = CompiledQuery(
        lambda values: candidates_queryset(SHAPES[1], values),
        sentinel_values(PARAMETERS, {"excluded": 0, "preferred": 0}),
        written=frozenset({"session_id"}),
    )
    with pytest.raises(TypeError, match="only an integer"):
        query.statement(_values(SHAPES[1], session_id="1; DROP TABLE x"))


@pytest.mark.parametrize(
    ("shape", "names"),
    [
        (SHAPES[1], {"now", "slow_start_seconds", "key_id", "session_id", "group_id"}),
        (SHAPES[2], {"now", "slow_start_seconds", "key_id", "session_id", "fixed_account_id", "excluded"}),
        (
            SHAPES[3],
            {
                "now",
                "slow_start_seconds",
                "snapshot_id",
                "global_avg_ms",
                "band_width_ms",
                "account_part_ms",
                "proxy_part_ms",
                "excluded",
                "preferred",
            },
        ),
    ],
)
def test_a_compiled_query_takes_each_value_of_its_shape_as_a_parameter(shape, names):
    query = reads.compiled(shape)
    assert isinstance(query, CompiledQuery)
    assert {slot[0] for slot in query.slots if slot is not None} == names


def test_a_prepared_read_is_never_jit_compiled(postgres_only):
    """PostgreSQL compiles a plan whose estimated cost passes jit_above_cost;
    a generic plan of the head read (a prepared statement after its fifth
    run) once estimated a third of every binding expired and passed it, and
    compiling took over 100 ms on every execution. kiropool's connections
    turn JIT off; here the threshold is dropped to 0, so any plan would be
    compiled if JIT were on."""
    key = ApiKeyFactory()
    AccountFactory.create_batch(3)
    query, values = head_read(key)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL jit_above_cost = 0")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query.sql, query.params(values))
        (plan,) = cursor.fetchone()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    assert len(query.fetch(values)) == 3
    assert "JIT" not in plan[0]


# --- the database order is the ordering contract ----------------------------------------------


accounts_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "identity": st.integers(0, 4),  # several accounts may alias one identity
            "pool": st.sampled_from([Pool.BALANCED, Pool.CREDIT_FIRST]),
            "credits": st.one_of(st.none(), st.floats(0, 1000, allow_nan=False).map(lambda x: round(x, 1))),
            "proxy": st.sampled_from([None, 0, 1]),
            "bindings": st.integers(0, 3),
            "expired_bindings": st.integers(0, 1),
            "samples": st.one_of(st.none(), st.tuples(st.integers(1, 40), st.floats(50, 3000, allow_nan=False))),
            # Out of the read, whose sessions key 3 and whose balance the best
            # known credit_first balance must not count: disabled, exhausted,
            # or outside the key's group.
            "enabled": st.sampled_from([True, True, True, False]),
            "exhausted": st.sampled_from([False, False, False, True]),
            "in_group": st.sampled_from([True, True, True, False]),
        }
    ),
    min_size=1,
    max_size=9,
)
identities_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "started_ago": st.one_of(st.none(), st.integers(1, 600)),
            "cooling": st.booleans(),
            "max_concurrency": st.integers(1, 3),
            "in_flight": st.integers(0, 3),
            "pacing_ms": st.sampled_from([0, 0, 500, 60_000]),
        }
    ),
    min_size=5,
    max_size=5,
)


def _build(accounts, identities, *, proxy_cooling, global_avg, proxy_samples):
    for model in (Lease, SessionBinding, LatencySnapshot, ApiKey, AccountGroup, Account, RoutingIdentity, Proxy):
        model.objects.all().delete()
    now = timezone.now()
    proxies = [
        Proxy.objects.create(
            name=f"p{i}", url=f"http://p{i}:1", cooldown_until=now + timedelta(minutes=5) if cooling else None
        )
        for i, cooling in enumerate(proxy_cooling)
    ]
    made_identities = []
    for i, spec in enumerate(identities):
        identity = RoutingIdentity.objects.create(
            name=f"i{i}",
            max_concurrency=spec["max_concurrency"],
            min_start_interval_ms=spec["pacing_ms"],
            cooldown_until=now + timedelta(minutes=1) if spec["cooling"] else None,
            last_started_at=now - timedelta(seconds=spec["started_ago"]) if spec["started_ago"] else None,
        )
        made_identities.append(identity)
    other_key = ApiKeyFactory(name="other")
    made = []
    for n, spec in enumerate(accounts):
        # Mixed case and punctuation: names must order by code point in both places.
        account = AccountFactory(
            name=f"{'Ab'[n % 2]}-{n:02d}",
            identity=made_identities[spec["identity"]],
            pool=spec["pool"],
            remaining_credits=spec["credits"],
            proxy=proxies[spec["proxy"]] if spec["proxy"] is not None else None,
            enabled=spec["enabled"],
            quota_exhausted=spec["exhausted"],
        )
        for b in range(spec["bindings"] + spec["expired_bindings"]):
            expires = now - timedelta(seconds=5) if b >= spec["bindings"] else now + timedelta(hours=1)
            SessionBinding.objects.create(
                api_key=other_key,
                session_id=f"{account.name}-{b}",
                account=account,
                created_at=now - timedelta(hours=2),
                updated_at=now - timedelta(hours=2),
                expires_at=expires,
            )
        made.append(account)
    for identity, spec in zip(made_identities, identities, strict=True):
        # Live leases make the in-flight counter; the claim path keeps it so.
        for _ in range(spec["in_flight"]):
            Lease.objects.create(
                account=identity.accounts.first() or made[0],
                account_name="x",
                identity=identity,
                started_at=now,
                expires_at=now + timedelta(minutes=15),
            )
        RoutingIdentity.objects.filter(pk=identity.pk).update(in_flight=spec["in_flight"])
    if global_avg is not None:
        latency_snapshot_create(
            global_avg_ms=global_avg,
            accounts={a.name: spec["samples"] for a, spec in zip(made, accounts, strict=True) if spec["samples"]},
            proxies={p.url: s for p, s in zip(proxies, proxy_samples, strict=True) if s},
        )
    return made


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    accounts=accounts_strategy,
    identities=identities_strategy,
    proxy_cooling=st.tuples(st.booleans(), st.booleans()),
    proxy_samples=st.tuples(
        st.one_of(st.none(), st.tuples(st.integers(1, 40), st.floats(50, 3000, allow_nan=False))),
        st.one_of(st.none(), st.tuples(st.integers(1, 40), st.floats(50, 3000, allow_nan=False))),
    ),
    global_avg=st.one_of(st.none(), st.floats(100, 2000, allow_nan=False)),
    preferred_pool=st.sampled_from([Pool.BALANCED, Pool.CREDIT_FIRST]),
    spread=st.booleans(),
    excluded=st.sets(st.integers(0, 8), max_size=3),
    preferred=st.sets(st.integers(0, 8), max_size=3),
    grouped=st.booleans(),
)
def test_the_database_orders_candidates_exactly_as_the_contract(
    accounts, identities, proxy_cooling, proxy_samples, global_avg, preferred_pool, spread, excluded, preferred, grouped
):
    # Each example in its own savepoint, rolled back: one example's failure
    # is reported as itself, not as a broken transaction in the next one.
    with transaction.atomic():
        _check_one(
            accounts,
            identities,
            proxy_cooling,
            proxy_samples,
            global_avg,
            preferred_pool,
            spread,
            excluded,
            preferred,
            grouped,
        )
        transaction.set_rollback(True)


def _check_one(
    accounts, identities, proxy_cooling, proxy_samples, global_avg, preferred_pool, spread, excluded, preferred, grouped
):
    made = _build(accounts, identities, proxy_cooling=proxy_cooling, global_avg=global_avg, proxy_samples=proxy_samples)
    group = None
    if grouped:
        group = AccountGroup.objects.create(name="keyed")
        group.accounts.set([a for a, spec in zip(made, accounts, strict=True) if spec["in_group"]])
    key = ApiKeyFactory(name="gateway", preferred_pool=preferred_pool, model_preferences={}, account_group=group)
    names = [a.name for a in made]
    excluded_names = frozenset(names[i] for i in excluded if i < len(names))
    preferred_names = frozenset(names[i] for i in preferred if i < len(names))
    request = DispatchRequest(session_id="s" if spread else None, exclude_accounts=excluded_names)
    now = timezone.now()
    stored = latency_snapshot_latest()
    read = dict(key=key, request=request, now=now, snapshot=stored, spread=spread, preferred=preferred_names)

    everyone = reads.read(**read).rows
    expected = [
        (a, spec)
        for a, spec in zip(made, accounts, strict=True)
        if spec["enabled"]
        and not spec["exhausted"]
        and (spec["credits"] is None or spec["credits"] > 0)  # above the default minimum balance
        and (spec["in_group"] or not grouped)
    ]
    assert sorted(row.candidate.account for row in everyone) == sorted(a.name for a, _ in expected)
    # Key 3 from the pool as built, not from the read: live bindings per
    # identity over every account the key may be routed to now.
    totals: dict[str, int] = {}
    for a, spec in expected:
        totals[a.identity.name] = totals.get(a.identity.name, 0) + spec["bindings"]
    candidates = [row for row in everyone if not row.excluded]
    ctx = selection.SelectionContext(
        now=now,
        preferred_pool=preferred_pool,
        snapshot=stored.snapshot if stored else None,
        preferred_accounts=preferred_names,
        spread_sessions=spread,
        session_totals=totals,
    )
    ranked = selection.order_candidates([row.candidate for row in candidates], ctx)

    assert [row.candidate.account for row in candidates] == [r.candidate.account for r in ranked]
    for row, r in zip(candidates, ranked, strict=True):
        assert row.keys.proxy_cooling == r.proxy_in_cooldown
        assert row.keys.model_preferred == r.model_preferred
        assert row.keys.session_count == r.session_count
        assert row.keys.pool_rank == r.pool_rank
        assert row.keys.latency_band == r.latency_band
        assert row.keys.remaining_credits_sort == pytest.approx(r.remaining_credits_sort)

    # The head a dispatch reads: the candidates a lease could start on now,
    # in contract order, then the rest.
    head = reads.read(**read, head=True).rows
    startable = [r.candidate.account for r in ranked if readiness.throttle_state(r.candidate, now) == "ready"]
    assert [row.candidate.account for row in head if row.ready] == startable[: len([h for h in head if h.ready])]
    assert len(head) == min(HEAD_ROWS, len(everyone))
    if startable:
        assert head[0].ready and head[0].candidate.account == startable[0]
    else:
        assert not any(row.ready for row in head)
