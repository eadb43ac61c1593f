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

from accounts.models import Pool, RoutingIdentity
from routing import pg, pool_order, readiness, selection
from routing.dispatch import DispatchRequest
from routing.selectors import dispatch as reads
from routing.selectors.candidates import HEAD_ROWS, PARAMETERS, Shape, candidates_queryset
from routing.selectors.compiled import CompiledQuery, adapt, sentinel_values
from routing.selectors.latency import latency_snapshot_latest
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory
from tests.routing.random_pools import (
    account_specs,
    identity_specs,
    names_at,
    pool_build,
    pool_key,
    walk_head_check,
)
from tests.routing.reads import head_read

pytestmark = pytest.mark.django_db


# --- compiled once, the same as compiled afresh ------------------------------------------


SHAPES = [
    Shape(scope="all", preferred_pool=Pool.BALANCED),
    Shape(scope="group", preferred_pool=Pool.CREDIT_FIRST, with_session=True, spread=True, head=True),
    Shape(scope="fixed", preferred_pool=Pool.BALANCED, with_session=True, bound_only=True, excluded=2),
    Shape(scope="all", preferred_pool=Pool.BALANCED, latency=True, excluded=1, preferred=3, head=True),
    Shape(
        scope="group", preferred_pool=Pool.BALANCED, with_session=True, spread=True, head=True, walk=True, preferred=2
    ),
]


def _values(shape: Shape, **changes) -> dict[str, object]:
    """A request's values for a read of ``shape``, with ``changes``."""
    return {
        "now": timezone.now(),
        "lease_floor": timezone.now() - timedelta(minutes=20),
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
    later = {
        **values,
        "now": now + timedelta(minutes=3),
        "lease_floor": now - timedelta(minutes=1),
        "key_id": 5,
        "session_id": "other",
    }
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
        (SHAPES[1], {"now", "lease_floor", "slow_start_seconds", "key_id", "session_id", "group_id"}),
        (
            SHAPES[2],
            {"now", "lease_floor", "slow_start_seconds", "key_id", "session_id", "fixed_account_id", "excluded"},
        ),
        # the walk's scope is the group too (a BigIntegerField's value, sent as psycopg's Int8)
        (SHAPES[4], {"now", "lease_floor", "slow_start_seconds", "key_id", "session_id", "group_id", "preferred"}),
        (
            SHAPES[3],
            {
                "now",
                "lease_floor",
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


@pytest.mark.parametrize(("reserved", "plus_leases"), [(True, 1), (False, 0), (True, 0)])
def test_a_condition_in_named_form_selects_what_it_selects_compiled(postgres_only, reserved, plus_leases):
    """The completion runs ``rules.slot_free`` in named form (``pg._slot_free``):
    on identities leased, held for returning turns and ramping back from an
    ejection, it matches the rows the positional form matches, and not all
    of them."""
    now = timezone.now()
    states = [
        {"in_flight": 0},
        {"in_flight": 1},
        {"in_flight": 2},
        {"in_flight": 1, "sticky_waiters": 1, "sticky_wait_until": now + timedelta(seconds=30)},
        {"in_flight": 1, "sticky_waiters": 1, "sticky_wait_until": now - timedelta(seconds=30)},
        {"in_flight": 0, "ejected_until": now - timedelta(seconds=1)},  # ramped limit: 1 slot
        {"in_flight": 1, "ejected_until": now - timedelta(seconds=50)},  # ramped limit: 1 slot of 2
    ]
    ids = [RoutingIdentityFactory(max_concurrency=2).pk for _ in states]
    for pk, state in zip(ids, states, strict=True):
        RoutingIdentity.objects.filter(pk=pk).update(**state)
    query = pg._slot_free(reserved=reserved, plus_leases=plus_leases)
    values = {"now": now, "slow_start_seconds": 60.0}
    table = connection.ops.quote_name(RoutingIdentity._meta.db_table)
    named, constants = query.named("c_")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {table} WHERE {query.sql}", query.params(values))
        positional = {row[0] for row in cursor.fetchall()}
        cursor.execute(f"SELECT id FROM {table} WHERE {named}", {**values, **constants})
        assert {row[0] for row in cursor.fetchall()} == positional
    assert positional and positional != set(ids)


def test_a_query_of_lists_has_no_named_form():
    query = reads.compiled(SHAPES[2])  # excluded names: a list
    with pytest.raises(ValueError, match="named form"):
        query.named("c_")


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


accounts_strategy = account_specs(identities=5, max_size=9)
identities_strategy = identity_specs(5)


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
    made = pool_build(
        accounts, identities, proxy_cooling=proxy_cooling, global_avg=global_avg, proxy_samples=proxy_samples
    )
    key = pool_key(made, accounts, grouped=grouped, preferred_pool=preferred_pool)
    # The group's rows get their bands once its memberships commit
    # (routing/signals.py); this example's transaction never does.
    pool_order.pool_order_bands_catch_up()
    excluded_names, preferred_names = names_at(made, excluded), names_at(made, preferred)
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

    # The head through the walk (walk.py): exact exactly when the head's
    # last row can start on a proxy not cooling, and then row for row the
    # same, every value included. Otherwise the dispatcher reads in full.
    walk_head_check(key, request, preferred=preferred_names, snapshot=stored)
