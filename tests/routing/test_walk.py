"""The head of a large pool read through ``PoolOrder`` (routing/selectors/walk.py).

- The triggers keep every ``PoolOrder`` row equal to its sources, whatever
  writes them, on both vendors.
- On random pools, every kind of special account among them, the walk's
  head is the full read's, row for row, exactly when it says it is.
- A dispatch on a large pool goes through the walk, falls back to the full
  read when the walk cannot show its head, and grants what the full read
  grants.
"""

from __future__ import annotations

import dataclasses
import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import Count
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import Account, AccountGroup, ApiKey, Pool, RoutingIdentity
from routing.dispatch import DispatchRequest
from routing.maintenance import counters_reconcile
from routing.models import PoolOrder, SessionBinding
from routing.pool_order import pool_order_rebuild
from routing.pools import pool_seed, uniform_pool
from routing.selectors import dispatch as reads
from routing.selectors.candidates import HEAD_ROWS
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory
from tests.routing.gateway import Gateway
from tests.routing.random_pools import account_specs, identity_specs, names_at, pool_build, pool_key, walk_head_check

pytestmark = pytest.mark.django_db

ORDER_TABLE = f'"{PoolOrder._meta.db_table}"'


# --- the triggers keep the copies true ---------------------------------------------------


def _expected() -> set[tuple]:
    """Every row ``PoolOrder`` must hold, from the sources counted afresh."""
    aliases = dict(Account.objects.values("identity").annotate(n=Count("*")).values_list("identity", "n"))
    bindings = dict(SessionBinding.objects.values("account").annotate(n=Count("*")).values_list("account", "n"))
    rows = set()
    for a in Account.objects.select_related("identity").prefetch_related("groups"):
        plain = a.pool == Pool.BALANCED and aliases[a.identity_id] == 1
        credits = -(a.remaining_credits if a.remaining_credits is not None else -1.0)
        copy = (a.pk, a.enabled, plain, bindings.get(a.pk, 0), a.identity.last_started_at, credits, a.name)
        rows |= {(scope, *copy) for scope in (PoolOrder.ALL_ACCOUNTS, *(g.pk for g in a.groups.all()))}
    return rows


def _actual() -> set[tuple]:
    return set(
        PoolOrder.objects.values_list(
            "scope_id", "account_id", "enabled", "plain", "binding_rows", "last_started_at", "credits_sort", "name"
        )
    )


def _binding(account: Account, n: int, *, expired: bool = False) -> SessionBinding:
    now = timezone.now()
    return SessionBinding.objects.create(
        api_key=ApiKey.objects.first() or ApiKeyFactory(),
        session_id=f"s-{account.pk}-{n}-{now.timestamp()}",
        account=account,
        created_at=now - timedelta(hours=1),
        updated_at=now - timedelta(hours=1),
        expires_at=now - timedelta(seconds=1) if expired else now + timedelta(hours=1),
    )


def _apply(op: str, pick: int, data) -> None:
    """One write of the kind the admin, the operator API, the dispatcher or a
    maintenance task makes; ``pick`` chooses the rows."""
    accounts = list(Account.objects.order_by("pk"))
    identities = list(RoutingIdentity.objects.order_by("pk"))
    groups = list(AccountGroup.objects.order_by("pk"))
    account = accounts[pick % len(accounts)] if accounts else None
    identity = identities[pick % len(identities)]
    group = groups[pick % len(groups)]
    if op == "account_create" or account is None:
        AccountFactory(identity=identity, pool=data.draw(st.sampled_from(Pool.values)))
    elif op == "account_delete":
        account.delete()
    elif op == "account_move":  # to another identity: both sides' aliases change
        Account.objects.filter(pk=account.pk).update(identity=identity)
    elif op == "account_edit":
        Account.objects.filter(pk=account.pk).update(
            enabled=data.draw(st.booleans()),
            pool=data.draw(st.sampled_from(Pool.values)),
            remaining_credits=data.draw(st.one_of(st.none(), st.floats(-5, 500, allow_nan=False))),
            name=f"renamed-{pick}-{account.pk}",
        )
    elif op == "account_saved_whole":  # an object read earlier, saved with every column
        stale = Account.objects.get(pk=account.pk)
        RoutingIdentity.objects.filter(pk=account.identity_id).update(last_started_at=timezone.now())
        stale.remaining_credits = 42.0
        stale.save()
    elif op == "lease_start":
        RoutingIdentity.objects.filter(pk=identity.pk).update(last_started_at=timezone.now())
    elif op == "group_add":
        group.accounts.add(account)
    elif op == "group_remove":
        group.accounts.remove(account)
    elif op == "group_replace":
        group.accounts.set(accounts[pick % 3 :: 2])
    elif op == "binding_create":
        _binding(account, pick, expired=data.draw(st.booleans()))
    elif op == "binding_delete":
        SessionBinding.objects.filter(pk__in=SessionBinding.objects.filter(account=account).values("pk")[:1]).delete()
    elif op == "bindings_delete_many":  # one statement over several accounts, as the purge deletes
        every = SessionBinding.objects.order_by("pk").values_list("pk", flat=True)
        SessionBinding.objects.filter(pk__in=list(every)[pick % 2 :: 2]).delete()
    elif op == "binding_move":
        SessionBinding.objects.filter(account=account).update(account=accounts[(pick + 1) % len(accounts)])


OPS = [
    "account_create",
    "account_delete",
    "account_move",
    "account_edit",
    "account_saved_whole",
    "lease_start",
    "group_add",
    "group_remove",
    "group_replace",
    "binding_create",
    "binding_delete",
    "bindings_delete_many",
    "binding_move",
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50)), min_size=1, max_size=12), data=st.data())
def test_every_write_leaves_the_order_rows_equal_to_their_sources(steps, data):
    with transaction.atomic():
        identities = RoutingIdentityFactory.create_batch(3)
        AccountFactory(identity=identities[0])
        AccountFactory(identity=identities[0])  # aliases
        AccountFactory(identity=identities[1], pool=Pool.CREDIT_FIRST)
        AccountFactory(identity=identities[2], remaining_credits=7.5)
        AccountGroup.objects.create(name="a").accounts.set(Account.objects.all()[:2])
        AccountGroup.objects.create(name="b")
        assert _actual() == _expected()
        for op, pick in steps:
            _apply(op, pick, data)
            assert _actual() == _expected(), op
        transaction.set_rollback(True)


def test_a_counter_the_reconcile_task_sets_right_reaches_the_order_rows():
    """A whole-row save with a stale binding counter (what the admin no
    longer does) puts the counter wrong; the reconcile task's correction is
    an update like any other, and the copies follow it."""
    account = AccountFactory()
    stale = Account.objects.get(pk=account.pk)
    _binding(account, 1)
    stale.save()
    assert PoolOrder.objects.get(account=account).binding_rows == 0  # the counter's wrong value, copied
    counters_reconcile()
    assert PoolOrder.objects.get(account=account).binding_rows == 1
    assert _actual() == _expected()


def test_a_deleted_group_takes_its_rows_and_the_accounts_keep_theirs():
    accounts = AccountFactory.create_batch(3)
    group = AccountGroup.objects.create(name="g")
    group.accounts.set(accounts)
    assert PoolOrder.objects.filter(scope_id=group.pk).count() == 3
    group.delete()
    assert not PoolOrder.objects.filter(scope_id=group.pk).exists()
    assert _actual() == _expected()
    assert PoolOrder.objects.filter(scope_id=PoolOrder.ALL_ACCOUNTS).count() == 3


def test_an_order_table_left_behind_is_rebuilt_from_its_sources():
    """What a restore with triggers off leaves: a wrong copy, a missing row,
    a row of no membership. The command sets all three right, and a second
    run finds nothing to do."""
    first, second, third = AccountFactory.create_batch(3)
    AccountGroup.objects.create(name="g").accounts.set([first])
    PoolOrder.objects.filter(account=first).update(binding_rows=9)  # two rows: the whole pool, the group
    PoolOrder.objects.filter(account=second).delete()
    PoolOrder.objects.create(
        scope_id=777, account=third, enabled=True, plain=True, binding_rows=0, credits_sort=1.0, name="ghost"
    )
    out = io.StringIO()
    call_command("pool_order_rebuild", stdout=out)
    assert out.getvalue().strip() == "pool order: 4 row(s) were wrong; rebuilt"
    assert _actual() == _expected()
    assert pool_order_rebuild() == 0


# --- the walk's head is the full read's head -------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Mostly one account per identity (plain, the walk's rows), some aliases,
    # some credit_first, bindings past expiry, cooling proxies, busy and
    # paced identities: every kind of account the walk must not miss.
    accounts=account_specs(identities=14, min_size=4, max_size=16, samples=st.none()),
    # Most identities able to start, so the head is often full of them.
    identities=identity_specs(
        14, cooling=st.sampled_from([False] * 7 + [True]), in_flight=st.sampled_from([0, 0, 0, 0, 1, 3])
    ),
    proxy_cooling=st.tuples(st.booleans(), st.just(False)),  # one proxy of two may cool
    preferred_pool=st.sampled_from([Pool.BALANCED, Pool.CREDIT_FIRST]),
    spread=st.booleans(),
    excluded=st.sets(st.integers(0, 15), max_size=2),
    preferred=st.sets(st.integers(0, 15), max_size=2),
    grouped=st.booleans(),
)
def test_the_walks_head_is_the_full_reads_head_whenever_it_says_so(
    accounts, identities, proxy_cooling, preferred_pool, spread, excluded, preferred, grouped
):
    with transaction.atomic():
        made = pool_build(
            accounts, identities, proxy_cooling=proxy_cooling, global_avg=None, proxy_samples=(None, None)
        )
        key = pool_key(made, accounts, grouped=grouped, preferred_pool=preferred_pool)
        walk_head_check(
            key,
            DispatchRequest(session_id="s" if spread else None, exclude_accounts=names_at(made, excluded)),
            preferred=names_at(made, preferred),
            snapshot=None,
        )
        transaction.set_rollback(True)


# --- the dispatcher -----------------------------------------------------------------------


def _reads(ctx) -> list[str]:
    """The head reads ``ctx`` captured: they select the readiness verdict of
    ``HEAD_ROWS`` rows."""
    return [q["sql"] for q in ctx.captured_queries if '"ready"' in q["sql"] and f"LIMIT {HEAD_ROWS}" in q["sql"]]


def test_a_large_pools_dispatch_reads_its_head_through_the_order_table(settings):
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = 6
    seeded = pool_seed(prefix="big-", identities=uniform_pool(6))
    gw = Gateway(seeded.key)
    with CaptureQueriesContext(connection) as ctx:
        assert gw.account_of(session_id="new-1").startswith("big-")
    (read,) = _reads(ctx)
    assert ORDER_TABLE in read


def test_a_pool_below_the_threshold_keeps_the_full_read(settings):
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = 7
    seeded = pool_seed(prefix="small-", identities=uniform_pool(6))
    with CaptureQueriesContext(connection) as ctx:
        Gateway(seeded.key).account_of(session_id="new-1")
    (read,) = _reads(ctx)
    assert ORDER_TABLE not in read


def test_when_fewer_than_a_head_of_accounts_can_start_the_full_read_decides(settings):
    """Five of six identities busy: the walk finds one account, which cannot
    show it is the head (a busy account may sort before a special one), so
    the full read runs too, and the last free account is granted; then none
    is left, and the answer is the full read's 429."""
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = 6
    seeded = pool_seed(prefix="full-", identities=uniform_pool(6))
    gw = Gateway(seeded.key)
    held = {gw.account_of(session_id=f"held-{n}") for n in range(5)}
    with CaptureQueriesContext(connection) as ctx:
        last = gw.account_of(session_id="the-last-one")
    walked, full = _reads(ctx)
    assert ORDER_TABLE in walked and ORDER_TABLE not in full
    assert {last} == {a.name for a in seeded.accounts} - held
    assert gw.dispatch(session_id="one-too-many", max_wait_ms=0).status_code == 429


def _granted(prefix: str, min_accounts: int, settings) -> list[str]:
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = min_accounts
    return scripted_day(pool_seed(prefix=prefix, identities=uniform_pool(7, max_concurrency=2)), prefix)


def scripted_day(seeded, prefix: str) -> list[str]:
    """The accounts a scripted day of dispatches on the new pool ``seeded``
    gets, without the pool's prefix: new sessions, returning turns,
    completions, a failure."""
    gw = Gateway(seeded.key)
    granted, open_leases = [], []
    for n in range(16):
        response = gw.dispatch(session_id=f"conversation-{n % 11}")
        assert response.status_code == 200, response.content
        body = response.json()
        granted.append(body["account"]["name"].removeprefix(prefix))
        open_leases.append(body["lease_id"])
        if n % 3 == 2:
            lease = open_leases.pop(0)
            assert gw.complete(lease, outcome="success" if n != 8 else "retry_next").status_code == 200
    return granted


def test_the_walk_grants_what_the_full_read_grants(settings):
    assert _granted("walked-", 1, settings) == _granted("sorted-", 10_000, settings)


def test_the_walk_reads_the_index_and_not_the_pool(postgres_only):
    """On 300 accounts, beside 300 more that sort first in the whole pool's
    order: the walk reads four rows of the key's scope from the order index,
    and no scan of the accounts runs."""
    pool_seed(prefix="other-", identities=uniform_pool(300))
    seeded = pool_seed(prefix="many-", identities=uniform_pool(300))
    Account.objects.filter(pk__in=[a.pk for a in seeded.accounts]).update(binding_rows=3)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {PoolOrder._meta.db_table}")
        cursor.execute(f"ANALYZE {Account._meta.db_table}")
    key = ApiKey.objects.get(pk=seeded.key_ids["gateway"])
    shape, values = reads.request_shape(
        key=key, request=DispatchRequest(session_id="new"), now=timezone.now(), snapshot=None, spread=True, head=True
    )
    sql, params = reads.compiled(dataclasses.replace(shape, walk=True)).statement(values)
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        (plan,) = cursor.fetchone()
    nodes = list(_nodes(plan[0]["Plan"]))
    walked = [n for n in nodes if n.get("Index Name") == "pool_order_spread_idx"]
    assert walked and walked[0]["Actual Rows"] == HEAD_ROWS
    # (the best credit_first balance is a scan, run only for a credit_first row without one)
    scanned = [n for n in nodes if n.get("Relation Name") == Account._meta.db_table and n["Node Type"] == "Seq Scan"]
    assert not [n for n in scanned if n["Actual Loops"]]


def _nodes(node: dict):
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)
