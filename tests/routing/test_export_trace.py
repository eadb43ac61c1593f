"""manage.py export_trace: leases out as JSON lines, and back in as a replay."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from bench.simulate.runs import simulate_all
from bench.simulate.scenario import Knobs
from bench.simulate.traffic import trace_load
from tests.factories import AccountFactory, ApiKeyFactory, LeaseFactory, RoutingIdentityFactory

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def recorded():
    """Two keys, an identity with an alias, and leases of every shape."""
    gw, batch = ApiKeyFactory(name="gateway"), ApiKeyFactory(name="batch")
    alpha = RoutingIdentityFactory(name="alpha")
    a1 = AccountFactory(name="alpha-1", identity=alpha)
    a2 = AccountFactory(name="alpha-2", identity=alpha)
    b1 = AccountFactory(name="beta-1", identity=RoutingIdentityFactory(name="beta"))

    def lease(at: float, account, **fields):
        started = T0 + timedelta(seconds=at)
        return LeaseFactory(account=account, started_at=started, expires_at=started + timedelta(minutes=15), **fields)

    # created out of order: the export sorts by start
    lease(
        30,
        b1,
        api_key=batch,
        outcome="rate_limited",
        completed_at=T0 + timedelta(seconds=30.2),
    )
    lease(
        0,
        a1,
        api_key=gw,
        session_id="conv-1",
        model="claude-sonnet",
        outcome="success",
        first_token_ms=420.5,
        completed_at=T0 + timedelta(seconds=12),
    )
    lease(60, a2, api_key=gw, session_id="conv-1", model="claude-sonnet")  # still in flight
    lease(90, b1, api_key=None, outcome="success", first_token_ms=900.0, completed_at=T0 + timedelta(seconds=100))
    return T0


def export(*args: str) -> list[dict]:
    out = StringIO()
    call_command("export_trace", *args, stdout=out, stderr=StringIO())
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_every_lease_one_line_oldest_first(recorded):
    lines = export()
    assert [line["started_at"] for line in lines] == [
        "2026-06-01T09:00:00+00:00",
        "2026-06-01T09:00:30+00:00",
        "2026-06-01T09:01:00+00:00",
        "2026-06-01T09:01:30+00:00",
    ]
    assert lines[0] == {
        "started_at": "2026-06-01T09:00:00+00:00",
        "api_key": "gateway",
        "session_id": "conv-1",
        "model": "claude-sonnet",
        "account_name": "alpha-1",
        "routing_identity": "alpha",
        "outcome": "success",
        "first_token_ms": 420.5,
        "completed_at": "2026-06-01T09:00:12+00:00",
    }
    rate_limited, in_flight, keyless = lines[1:]
    assert (rate_limited["api_key"], rate_limited["outcome"], rate_limited["session_id"]) == (
        "batch",
        "rate_limited",
        None,
    )
    assert (in_flight["outcome"], in_flight["completed_at"], in_flight["routing_identity"]) == (None, None, "alpha")
    assert keyless["api_key"] is None and keyless["model"] is None


def test_time_window_and_file_output(recorded, tmp_path):
    path = tmp_path / "trace.jsonl"
    call_command(
        "export_trace",
        "--since",
        "2026-06-01T09:00:30Z",
        "--until",
        "2026-06-01T09:01:30+00:00",
        "--output",
        str(path),
        stderr=StringIO(),
    )
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["account_name"] for line in lines] == ["beta-1", "alpha-2"]


def test_a_naive_or_garbled_time_is_refused(recorded):
    for bad in ("2026-06-01T09:00:00", "yesterday"):
        with pytest.raises(CommandError):
            call_command("export_trace", "--since", bad, stdout=StringIO(), stderr=StringIO())


@pytest.mark.parametrize("naive", ["2026-06-01", "2026-06-01T09:00:00"])
def test_the_time_zone_hint_is_a_time_it_accepts(recorded, naive):
    with pytest.raises(CommandError, match="give a time zone, e.g. ") as refused:
        call_command("export_trace", "--since", naive, stdout=StringIO(), stderr=StringIO())
    hint = str(refused.value).rpartition("e.g. ")[2]
    call_command("export_trace", "--since", hint, stdout=StringIO(), stderr=StringIO())  # taken as given


def test_an_output_it_cannot_write_is_refused_with_a_message(recorded, tmp_path):
    with pytest.raises(CommandError, match="cannot write"):
        call_command("export_trace", "--output", str(tmp_path / "missing" / "trace.jsonl"), stderr=StringIO())


def test_empty_database_exports_nothing():
    assert export() == []


def test_the_export_replays_against_every_policy(recorded):
    out = StringIO()
    call_command("export_trace", stdout=out, stderr=StringIO())
    pool, traffic = trace_load(out.getvalue().splitlines(), knobs=Knobs(), seed=1)
    assert {(a.name, a.identity) for a in pool.accounts} == {
        ("alpha-1", "alpha"),
        ("alpha-2", "alpha"),
        ("beta-1", "beta"),
    }
    # the rate-limited lease is a burst on beta, not an arrival
    assert [s.arrival_s for s in traffic.scripts] == [0.0, 60.0, 90.0]
    assert [(b.identity, b.start_s) for b in traffic.bursts] == [("beta", 30.0)]
    results = simulate_all(["kiropool", "round_robin"], pool, Knobs(), traffic, seed=1)
    assert [sum(r.served) for r in results] == [3, 3]
