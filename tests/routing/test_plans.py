"""The hot statements' plans under statistics that no longer describe the
tables: taken before a key's sessions arrived, or while few leases were out.
A busy table is in that state between two ANALYZE runs, and a plan chosen for
it must not turn a lookup by key into a scan of everything the table holds."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import RoutingIdentity
from routing import slots
from routing.dispatch import DispatchRequest
from routing.models import Lease, SessionBinding
from routing.pools import bindings_seed
from routing.selectors import dispatch as reads
from tests.factories import AccountFactory, ApiKeyFactory, LeaseFactory

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


def test_a_new_sessions_binding_lookup_uses_the_key_and_session_id_index(postgres_only):
    """With a one-column index on the key beside the unique (key, session id)
    one, PostgreSQL chose the former and filtered 3,000 rows on a bench key."""
    busy, quiet = ApiKeyFactory(), ApiKeyFactory()
    accounts = AccountFactory.create_batch(4)
    now = timezone.now()

    def bind(key, count):
        bindings_seed(key_id=key.pk, accounts=accounts, count=count, session_prefix=f"{key.pk}-")

    bind(quiet, 2_000)
    _analyze(SessionBinding)
    bind(busy, 3_000)  # after the statistics: the planner believes it has none

    shape, values = reads.request_shape(
        key=busy, request=DispatchRequest(session_id="a-new-one"), now=now, snapshot=None, spread=True, head=True
    )
    query = reads.compiled(shape)
    lookups = [
        node
        for node in _scans(_plan(query.sql, query.params(values)), SessionBinding)
        if "session_id" in json.dumps(node)
    ]
    assert lookups, "the read looks the session's binding up"
    for node in lookups:
        assert "session_id" in node.get("Index Cond", ""), node
        assert "session_id" not in node.get("Filter", ""), node
    assert len(query.fetch(values)) == 4


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
