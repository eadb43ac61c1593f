"""How the sticky fast path asks for a session's binding (PostgreSQL): the
sticky statement first while a key's sessions mostly come back, a look-up
of the binding first while they are mostly new (``leases.StickyOdds``).
Either way the answer is the same; the parity suite runs every dispatch
test both ways ("fast" and "fast-lookup", tests/conftest.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from routing import leases
from routing.backend import backend
from routing.dispatch import DispatchRequest
from routing.models import SessionBinding
from routing.selectors import dispatch as reads
from routing.selectors.candidates import live_binding
from routing.selectors.compiled import adapt
from routing.sessions import session_bind
from tests.factories import AccountFactory, ApiKeyFactory
from tests.routing.gateway import Gateway


def test_a_key_starts_with_the_statement_first():
    odds = leases.StickyOdds()
    assert not odds.lookup_first(1)


def test_mostly_new_sessions_turn_a_key_to_the_look_up_and_returning_ones_turn_it_back():
    odds = leases.StickyOdds()
    # From 1.0, each unbound dispatch takes a 32nd of the way to 0: the share
    # is 0.602 after 16 and 0.583 after 17, under the 0.6 threshold.
    for _ in range(16):
        odds.observe(7, bound=False)
    assert not odds.lookup_first(7)
    odds.observe(7, bound=False)
    assert odds.lookup_first(7)
    # Another key keeps its own share.
    assert not odds.lookup_first(8)
    # Two bound sessions bring the share back over 0.6 (0.596, then 0.609).
    odds.observe(7, bound=True)
    assert odds.lookup_first(7)
    odds.observe(7, bound=True)
    assert not odds.lookup_first(7)


@pytest.mark.django_db
def test_the_look_up_finds_a_live_binding_of_the_key_only():
    account, key, other = AccountFactory(), ApiKeyFactory(), ApiKeyFactory()
    now = timezone.now()
    session_bind(key=key, session_id="conv", account_id=account.pk)
    assert reads.session_bound(key=key, session_id="conv", now=now)
    assert not reads.session_bound(key=key, session_id="other-conv", now=now)
    assert not reads.session_bound(key=other, session_id="conv", now=now)
    expiry = SessionBinding.objects.get(api_key=key, session_id="conv").expires_at
    assert not reads.session_bound(key=key, session_id="conv", now=expiry + timedelta(microseconds=1))


@pytest.mark.django_db
def test_the_cached_look_up_is_what_django_compiles_afresh():
    values = {"key_id": 41, "session_id": "conversation-7", "now": timezone.now()}
    cached = reads.binding_lookup()
    sql, params = live_binding(values).query.sql_with_params()
    assert cached.sql == sql
    assert cached.params(values) == [adapt(p) for p in params]


def _sticky_statements(ctx) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries if q["sql"].lstrip().startswith("WITH bound AS")]


@pytest.mark.django_db
@pytest.mark.usefixtures("postgres_only")
def test_a_key_of_new_sessions_skips_the_sticky_statement_and_still_serves_a_returning_turn_sticky(monkeypatch):
    assert backend.statements is not None  # PostgreSQL's default
    monkeypatch.setattr(leases, "sticky_odds", leases.StickyOdds())
    AccountFactory(name="a")
    AccountFactory(name="b")
    key = ApiKeyFactory()
    gw = Gateway(key.plaintext)
    returning = gw.cycle(session_id="returning")

    with CaptureQueriesContext(connection) as ctx:
        response = gw.dispatch(session_id="new-0")
    assert response.status_code == 200 and response.json()["session"] == "new"
    assert len(_sticky_statements(ctx)) == 1  # a key starts with the statement first
    assert gw.complete(response.json()["lease_id"], outcome="success").status_code == 200

    for n in range(1, 18):
        gw.cycle(session_id=f"new-{n}")
    assert leases.sticky_odds.lookup_first(key.pk)

    with CaptureQueriesContext(connection) as ctx:
        response = gw.dispatch(session_id="new-18")
    assert response.status_code == 200 and response.json()["session"] == "new"
    assert _sticky_statements(ctx) == []
    assert gw.complete(response.json()["lease_id"], outcome="success").status_code == 200

    with CaptureQueriesContext(connection) as ctx:
        response = gw.dispatch(session_id="returning")
    assert response.status_code == 200
    assert response.json()["session"] == "sticky" and response.json()["account"]["name"] == returning
    assert len(_sticky_statements(ctx)) == 1


def _binding_lookups(ctx) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries if q["sql"].lstrip().startswith('SELECT "routing_sessionbinding"')]


@pytest.mark.django_db
@pytest.mark.usefixtures("postgres_only")
def test_a_turn_waiting_for_its_account_skips_the_look_up(monkeypatch):
    """Sticky patience retries the fast path for a session it found bound:
    looking the binding up again would only cost a round trip."""
    monkeypatch.setattr(leases, "sticky_odds", leases.StickyOdds(lookup_first_below=float("inf")))
    account, key = AccountFactory(), ApiKeyFactory()
    gw = Gateway(key.plaintext)
    gw.cycle(session_id="warm-up")  # the key's first lease makes its slot rows
    session_bind(key=key, session_id="conv", account_id=account.pk)
    request = DispatchRequest(session_id="conv")

    with CaptureQueriesContext(connection) as ctx:
        acquired, row = leases._sticky_fast_path(key=key, request=request, waited_ms=5)
    assert acquired is not None and row.account_id == account.pk
    assert _binding_lookups(ctx) == [] and len(_sticky_statements(ctx)) == 1
    assert gw.complete(str(acquired.lease.id), outcome="success").status_code == 200

    with CaptureQueriesContext(connection) as ctx:
        acquired, _ = leases._sticky_fast_path(key=key, request=request)
    assert acquired is not None
    assert len(_binding_lookups(ctx)) == 1 and len(_sticky_statements(ctx)) == 1
