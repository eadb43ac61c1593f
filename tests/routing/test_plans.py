"""The hot statements' plans under statistics that no longer describe the
tables: taken before a key's sessions arrived, or while few leases were out.
A busy table is in that state between two ANALYZE runs, and a plan chosen for
it must not turn a lookup by key into a scan of everything the table holds."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import psycopg
import pytest
from django.db import DataError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import Account, AccountGroup, ApiKey, RoutingIdentity
from routing import pg, slots
from routing.backend import backend
from routing.models import Lease, SessionBinding
from routing.pools import bindings_seed, pool_seed, uniform_pool
from tests.factories import AccountFactory, ApiKeyFactory, LeaseFactory
from tests.routing.gateway import Gateway
from tests.routing.reads import head_read

pytestmark = pytest.mark.django_db


def _analyze(model) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {model._meta.db_table}")


def _plan(sql: str, params=None) -> dict:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        (plan,) = cursor.fetchone()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    return plan[0]["Plan"]


def _nodes(node: dict):
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def _scans(plan: dict, *models) -> list[dict]:
    tables = {model._meta.db_table for model in models}
    return [node for node in _nodes(plan) if node.get("Relation Name") in tables and "Scan" in node["Node Type"]]


def _statements(ctx, *models, kinds=("SELECT", "WITH", "UPDATE")) -> list[str]:
    """The statements ``ctx`` captured that read or write ``models``' tables."""
    tables = [f'"{model._meta.db_table}"' for model in models]
    statements = [
        q["sql"]
        for q in ctx.captured_queries
        if any(t in q["sql"] for t in tables) and q["sql"].lstrip().split(None, 1)[0] in kinds
    ]
    assert statements, [q["sql"] for q in ctx.captured_queries]
    return statements


def _pool_key() -> ApiKey:
    """The key of a new pool of three accounts (its own group)."""
    return ApiKey.objects.get(pk=pool_seed(prefix="p-", identities=uniform_pool(3)).key_ids["gateway"])


def test_a_new_sessions_binding_lookup_uses_the_key_and_session_id_index(postgres_only):
    """With a one-column index on the key beside the unique (key, session id)
    one, PostgreSQL chose the former and filtered 3,000 rows on a bench key."""
    busy, quiet = ApiKeyFactory(), ApiKeyFactory()
    accounts = AccountFactory.create_batch(4)

    def bind(key, count):
        bindings_seed(key_id=key.pk, accounts=accounts, count=count, session_prefix=f"{key.pk}-")

    bind(quiet, 2_000)
    _analyze(SessionBinding)
    bind(busy, 3_000)  # after the statistics: the planner believes it has none

    query, values = head_read(busy)
    lookups = [
        node for node in _scans(_plan(*query.statement(values)), SessionBinding) if "session_id" in json.dumps(node)
    ]
    assert lookups, "the read looks the session's binding up"
    for node in lookups:
        assert "session_id" in node.get("Index Cond", ""), node
        assert "session_id" not in node.get("Filter", ""), node
    assert len(query.fetch(values)) == 4


# --- the candidates read runs on its generic plan ------------------------------------


def _generic_plan(query, values) -> dict:
    """The plan PostgreSQL makes of ``query`` once for any values (what a
    prepared statement reuses), run with ``values``: PREPARE it, and EXPLAIN
    its EXECUTE under ``force_generic_plan``."""
    sql, params = query.statement(values)
    numbered = iter(range(1, len(params) + 1))
    sql = re.sub(r"%s", lambda _: f"${next(numbered)}", sql)
    types = ", ".join(_pg_type(value) for value in params)
    with connection.cursor() as cursor:
        cursor.execute(f"PREPARE generic_read ({types}) AS {sql}")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    literal = psycopg.ClientCursor(connection.connection)  # the values as literals of EXECUTE
    literal.execute(f"EXPLAIN (FORMAT JSON) EXECUTE generic_read ({', '.join(['%s'] * len(params))})", params)
    (plan,) = literal.fetchone()
    literal.execute("DEALLOCATE generic_read")
    plan = plan if isinstance(plan, list) else json.loads(plan)
    return plan[0]["Plan"]


def _pg_type(value) -> str:
    for kind, name in ((bool, "boolean"), (int, "bigint"), (float, "double precision")):
        if isinstance(value, kind):
            return name
    return "timestamptz" if hasattr(value, "tzinfo") else "text"


def _plans_of(statement_start: str) -> list[tuple[int, int]]:
    """(generic plans, custom plans) of this connection's prepared
    statements whose SQL starts with ``statement_start``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s",
            [f"{statement_start}%".replace("%s", "$%")],
        )
        return cursor.fetchall()


def _plan_mode() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW plan_cache_mode")
        return cursor.fetchone()[0]


def test_the_head_read_runs_on_a_generic_plan_planned_once(postgres_only):
    """Planned afresh on every run, the read spent 1.2-1.8 ms planning and
    0.4 ms running on 10 accounts. The connection plans prepared statements
    once, for any values; the read is prepared on its first run and sends
    nothing with it (a SET and RESET around each read cost new sessions a
    tenth of their median latency)."""
    query, values = head_read(_pool_key())
    with CaptureQueriesContext(connection) as ctx:
        for _ in range(8):
            assert len(query.fetch(values)) == 3
    assert len(ctx.captured_queries) == 8
    assert _plan_mode() == "force_generic_plan"
    assert _plans_of(query.statement(values)[0][:200]) == [(8, 0)]  # none was planned afresh


def test_the_claims_and_the_completion_run_on_one_generic_plan(postgres_only):
    """The one-statement claims and the completion run as they are, with no
    SET of plan_cache_mode around them: sent with each, it cost the steady
    state a quarter of its dispatch rate (``routing/pg.py``). psycopg
    prepares each on its sixth run, and every run from then on reuses one
    generic plan: none is planned for its values."""
    assert backend.statements is not None  # PostgreSQL's default
    gateway = Gateway(pool_seed(prefix="p-", identities=uniform_pool(3)).key)
    statements = ("\nWITH done AS", "\nWITH bound AS")
    for _ in range(12):  # prepared by psycopg on the sixth
        gateway.cycle(session_id="returning")
    settled = {start: _plans_of(start) for start in statements}
    with CaptureQueriesContext(connection) as ctx:
        for _ in range(10):
            gateway.cycle(session_id="returning")
    assert [q["sql"] for q in ctx.captured_queries if "plan_cache_mode" in q["sql"]] == []
    for start in statements:
        ((generic, custom),) = settled[start]
        assert custom == 0, start
        assert _plans_of(start) == [(generic + 10, 0)], start  # ten runs, ten on the one generic plan


def test_without_prepared_statements_the_read_runs_as_it_is(postgres_only, monkeypatch):
    """Behind a pooler that cannot keep prepared statements
    (``DATABASE_PREPARE_THRESHOLD=0``; the settings then leave the
    connection's plan setting alone, ``tests/test_settings.py``), the read
    is sent as it is and not prepared."""
    query, values = head_read(_pool_key())
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "prepare_threshold", None)
    with CaptureQueriesContext(connection) as ctx:
        assert len(query.fetch(values)) == 3
    assert len(ctx.captured_queries) == 1
    assert _plans_of(query.statement(values)[0][:200]) == []


def test_a_failed_read_raises_its_own_error_and_prepares_as_before(postgres_only):
    """The read's error reaches the caller as Django's, and the connection
    goes back to psycopg's own count for the statements after it."""
    query, values = head_read(_pool_key())
    connection.ensure_connection()
    threshold = connection.connection.prepare_threshold
    assert threshold == 5  # the settings' default
    with pytest.raises(DataError, match="invalid input syntax"), transaction.atomic():
        query.fetch({**values, "now": "not a time"})
    assert connection.connection.prepare_threshold == threshold
    assert len(query.fetch(values)) == 3


@pytest.mark.django_db(transaction=True)
def test_the_latency_refresh_plans_its_statements_for_their_values(postgres_only):
    """On the connection's generic plan, the refresh read its hour of
    samples (most of the table) through the index on their time: 82-125 ms
    for 360,000 rows, against 50 ms for the scan planned for the hour's
    values. The whole refresh asks for plans made for its values, and the
    connection's setting is back once it is done."""
    from routing.maintenance import latency_snapshot_refresh

    with CaptureQueriesContext(connection) as ctx:
        latency_snapshot_refresh()
    sql = [q["sql"] for q in ctx.captured_queries]
    (aggregate,) = [i for i, q in enumerate(sql) if 'FROM "routing_latencysample"' in q and "SUM(" in q]
    assert "force_custom_plan" in sql[0], sql[0]
    assert sql[-1] == "RESET plan_cache_mode"
    assert 0 < aggregate < len(sql) - 1
    assert _plan_mode() == "force_generic_plan"


@pytest.mark.django_db(transaction=True)
def test_custom_plans_end_with_their_block_even_in_an_error(postgres_only):
    with pg.custom_plans():
        assert _plan_mode() == "force_custom_plan"
    assert _plan_mode() == "force_generic_plan"
    with pytest.raises(DataError, match="invalid input syntax"), pg.custom_plans(), connection.cursor() as cursor:
        cursor.execute("SELECT %s::timestamptz", ["not a time"])
    assert _plan_mode() == "force_generic_plan"


@pytest.mark.django_db(transaction=True)
def test_custom_plans_raise_the_blocks_own_error_when_the_connection_is_gone(postgres_only):
    """A block that ends in an error on a connection that broke under it
    raises its own error, not the failed reset's."""
    with pytest.raises(ValueError, match="the block's own"), pg.custom_plans():
        connection.connection.close()
        raise ValueError("the block's own error")
    connection.close()  # the broken connection is dropped; the next statement opens a fresh one
    assert _plan_mode() == "force_generic_plan"


def test_custom_plans_in_a_transaction_last_as_long_as_it(postgres_only):
    with transaction.atomic():
        with pg.custom_plans():
            assert _plan_mode() == "force_custom_plan"
        assert _plan_mode() == "force_custom_plan"  # the transaction's: nothing is sent to end it early
    # The test's own transaction is still open: a savepoint's release keeps it.
    assert _plan_mode() == "force_custom_plan"


def test_a_small_groups_generic_plan_knows_the_group_is_small(postgres_only):
    """With the group as a parameter, the generic plan assumed the average
    group: beside a 400-account group, a 10-account key's read was planned
    for 205 accounts, and in the bench's table of 2,162 accounts it scanned
    all of them. With the group's id in the statement the plan expects the
    group's own size."""
    pool_seed(prefix="big-", identities=uniform_pool(400, name="big"))
    small = pool_seed(prefix="small-", identities=uniform_pool(10, name="small"))
    members = AccountGroup.accounts.through
    for model in (Account, members, RoutingIdentity):
        _analyze(model)
    plan = _generic_plan(*head_read(ApiKey.objects.get(pk=small.key_ids["gateway"])))
    (group,) = [node for node in _rows_of(plan) if node.get("Relation Name") == members._meta.db_table]
    assert group["Plan Rows"] <= 20, group


def _rows_of(node: dict):
    """The nodes that produce the read's rows: ``node``'s, without the
    subplans that compute a value for them."""
    yield node
    for child in node.get("Plans", ()):
        if child.get("Parent Relationship") not in ("InitPlan", "SubPlan"):
            yield from _rows_of(child)


def test_the_generic_plan_expects_few_expired_bindings(postgres_only):
    """Not knowing ``now``, PostgreSQL expected a third of all bindings
    expired and sized the read's hashed subplan for them (0.5 ms with
    65,536 bindings, even when none had expired). The expiry floor makes the
    condition a range, estimated at 0.5 % of the table."""
    key = ApiKeyFactory()
    accounts = AccountFactory.create_batch(4)
    bindings_seed(key_id=key.pk, accounts=accounts, count=3_000, session_prefix="live-")
    _analyze(SessionBinding)
    plan = _generic_plan(*head_read(key))
    expiry = [node for node in _scans(plan, SessionBinding) if "expires_at" in node.get("Index Cond", "")]
    expiry = [node for node in expiry if "session_id" not in node.get("Index Cond", "")]
    assert expiry, "the read counts expired bindings"
    for node in expiry:
        assert node["Plan Rows"] <= 30, node  # 1 % of the table


# --- leases are closed by id -----------------------------------------------------------


def _leases(count: int, *, key=None, accounts=None, finished: bool = False) -> None:
    """``count`` leases of ``key`` over ``accounts`` (a new one when None),
    open for another 15 minutes, or finished a few minutes ago."""
    accounts = accounts or [AccountFactory()]
    now = timezone.now()
    done = {"completed_at": now - timedelta(minutes=4), "outcome": "success"} if finished else {}
    Lease.objects.bulk_create(
        LeaseFactory.build(
            api_key=key,
            account=(account := accounts[i % len(accounts)]),
            account_name=account.name,
            identity=account.identity,
            started_at=now - timedelta(minutes=5),
            expires_at=now + timedelta(minutes=15),
            **done,
        )
        for i in range(count)
    )


def _leases_out(count: int) -> None:
    """``count`` open leases of no key, after statistics taken with none out."""
    _analyze(Lease)
    _leases(count)


def _by_id(scan: dict) -> bool:
    """Whether a scan finds its rows by the lease id in the index itself
    (the primary key, or the key's index, which holds the id too)."""
    by_id = re.compile(r"\(id = ")
    return bool(by_id.search(scan.get("Index Cond", ""))) and not by_id.search(scan.get("Filter", ""))


def _lease_scans(ctx, *, updates_only: bool = False) -> list[dict]:
    """The scans of the lease table in the statements ``ctx`` captured (those
    that update it, with ``updates_only``)."""
    statements = _statements(ctx, Lease)
    if updates_only:
        statements = [sql for sql in statements if f'UPDATE "{Lease._meta.db_table}"' in sql]
    return [scan for sql in statements for scan in _scans(_plan(sql), Lease)]


@pytest.mark.parametrize("outcome", ["success", "rate_limited"])
def test_a_completion_finds_its_lease_by_id(postgres_only, gw, statements, outcome):
    """``completed_at IS NULL`` matches the live-lease partial indexes; with
    statistics taken while none were out, PostgreSQL scanned one of them and
    filtered 2,000 open leases by id to close one (0.4 ms, growing with the
    leases out), on both completion paths."""
    AccountFactory.create_batch(2)
    _leases_out(2_000)
    lease_id = gw.dispatch().json()["lease_id"]
    with CaptureQueriesContext(connection) as ctx:
        assert gw.complete(lease_id, outcome=outcome, first_token_ms=200).status_code == 200
    scans = _lease_scans(ctx)
    assert scans
    for scan in scans:
        assert _by_id(scan), scan


def test_the_reaper_closes_expired_leases_by_id(postgres_only):
    _leases_out(2_000)
    expired = LeaseFactory(expires_at=timezone.now() - timedelta(seconds=1))
    RoutingIdentity.objects.filter(pk=expired.identity_id).update(in_flight=1)  # the slot it holds
    with CaptureQueriesContext(connection) as ctx:
        assert slots.lease_reap_expired() == 1
    expired.refresh_from_db()
    assert expired.completed_at is not None
    for scan in _lease_scans(ctx, updates_only=True):  # its search for expired leases is by expiry
        assert _by_id(scan), scan


def _unbounded(plan: dict, *models) -> list[dict]:
    """The scans of ``models``' tables that read the whole table or a whole
    index: a sequential scan, or an index scan with no index condition."""
    return [
        node
        for node in _scans(plan, *models)
        if node["Node Type"] == "Seq Scan" or ("Index" in node["Node Type"] and "Index Cond" not in node)
    ]


def test_no_gateway_statement_scans_the_big_tables_whole(postgres_only, gw, key, statements):
    """Every statement of a dispatch and its completion (a new session, its
    sticky return, a session-less call, a failure), with 3,000 bindings of
    the key, 2,000 leases out and 3,000 finished ones arrived after the
    statistics: none reads the binding or lease table, or an index of them,
    whole. The two cases above were found in the bench's plans; this holds
    every gateway statement, and any added later, to the same."""
    accounts = AccountFactory.create_batch(4)
    # The statistics describe another key's traffic (a table analyzed while
    # it was still empty has no histogram at all, and PostgreSQL then takes
    # a third of the bindings for expired: autovacuum analyzes long before
    # that matters); this key's rows all arrive after them.
    other = ApiKeyFactory()
    bindings_seed(key_id=other.pk, accounts=accounts, count=1_000, session_prefix="other-")
    _leases(1_000, key=other, accounts=accounts, finished=True)
    _analyze(SessionBinding)
    _analyze(Lease)
    bindings_seed(key_id=key.pk, accounts=accounts, count=3_000, session_prefix="old-")
    _leases(3_000, key=key, accounts=accounts, finished=True)
    _leases(2_000, key=other, accounts=accounts)
    with CaptureQueriesContext(connection) as ctx:
        for body, outcome in (
            ({"session_id": "conv-1"}, "success"),
            ({"session_id": "conv-1"}, "success"),
            ({}, "success"),
            ({"session_id": "conv-2"}, "retry_next"),
        ):
            response = gw.dispatch(**body)
            assert response.status_code == 200, response.content
            done = gw.complete(response.json()["lease_id"], outcome=outcome, first_token_ms=150)
            assert done.status_code == 200, done.content

    statements = _statements(ctx, Lease, SessionBinding)
    assert len(statements) >= 8  # each dispatch and each completion reads or writes them
    whole = {sql[:120]: scans for sql in statements if (scans := _unbounded(_plan(sql), Lease, SessionBinding))}
    assert whole == {}


def test_a_small_groups_read_looks_its_accounts_up_by_key(postgres_only):
    """Priced for a spinning disk (PostgreSQL's default random_page_cost), a
    lookup by key looked dearer than reading the whole table: a 50-account
    key's read scanned all 3,162 accounts of the bench's installation on
    every dispatch. kiropool's connections price index lookups for a cached
    table, so a small group's read fetches only its own accounts."""
    pool_seed(prefix="big-", identities=uniform_pool(400, name="big"))
    small = pool_seed(prefix="small-", identities=uniform_pool(10, name="small"))
    for model in (Account, AccountGroup.accounts.through, RoutingIdentity):
        _analyze(model)
    plan = _generic_plan(*head_read(ApiKey.objects.get(pk=small.key_ids["gateway"])))
    (accounts,) = [node for node in _rows_of(plan) if node.get("Relation Name") == Account._meta.db_table]
    assert accounts["Node Type"] != "Seq Scan", accounts
