"""The reap mark: where the reads' probe for unreaped leases starts
(``routing/selectors/reaped.py``)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
from django.utils import timezone

from accounts.models import Account, RoutingIdentity
from core.recent import RecentValue
from routing import slots
from routing.models import Lease, LeaseOutcome, LeaseReapMark
from routing.selectors import counts, reaped
from routing.selectors.counts import EXPIRY_FLOOR
from tests.factories import AccountFactory, LeaseFactory
from tests.routing.reads import head_read

pytestmark = pytest.mark.django_db


def mark():
    return LeaseReapMark.objects.values_list("reaped_through", flat=True).first()


def open_lease(account, *, expired_ago: timedelta) -> Lease:
    """An open lease on ``account``'s identity that expired ``expired_ago``,
    its slot counted in the identity's ``in_flight``."""
    lease = LeaseFactory(account=account, expires_at=timezone.now() - expired_ago)
    RoutingIdentity.objects.filter(pk=account.identity_id).update(in_flight=1)
    return lease


# --- the reaper moves it ------------------------------------------------------------


def test_a_reap_over_every_identity_marks_the_time_it_ran():
    before = timezone.now()
    slots.lease_reap_expired()
    assert before <= mark() <= timezone.now()


def test_the_mark_only_moves_forward_and_never_past_the_clock():
    slots.lease_reap_expired()
    first = mark()
    slots.lease_reap_expired(now=first - timedelta(hours=1))  # an older run finishing late
    assert mark() == first
    slots.lease_reap_expired(now=timezone.now() + timedelta(hours=1))  # what will have expired by then
    assert first < mark() <= timezone.now()


def test_a_reap_of_some_identities_leaves_the_mark():
    account = AccountFactory()
    lease = open_lease(account, expired_ago=timedelta(seconds=5))
    assert slots.lease_reap_expired(identity_ids=[account.identity_id]) == 1
    assert Lease.objects.get(pk=lease.pk).outcome == LeaseOutcome.EXPIRED
    assert mark() is None


def test_a_reap_that_gave_way_to_the_hot_path_leaves_the_mark(postgres_only, monkeypatch):
    """The periodic run gives way when a batch waits too long for a row lock
    (``lock_timeout``): leases it did not reach are still open."""

    def lock_timed_out(**kwargs):
        raise OperationalError("canceling statement due to lock timeout")

    monkeypatch.setattr(slots, "_reap_batch", lock_timed_out)
    assert slots.lease_reap_expired(lock_timeout=True) == 0
    assert mark() is None


# --- each process reads it ----------------------------------------------------------


def reread_each_time(monkeypatch) -> None:
    """This process reads the mark on every call, as if the refresh interval had passed."""
    monkeypatch.setattr(reaped, "_floor", RecentValue(reaped._floor_read, seconds=0.0))


def test_the_floor_is_the_mark_less_the_margin_and_read_again_after_a_while(monkeypatch):
    assert reaped.lease_floor() == EXPIRY_FLOOR  # no run yet: from the oldest expiry
    slots.lease_reap_expired()
    assert reaped.lease_floor() == EXPIRY_FLOOR  # read a moment ago: not yet
    reread_each_time(monkeypatch)
    assert reaped.lease_floor() == mark() - reaped.MARGIN
    # A lower mark (another database's, say) never lowers what this process read.
    LeaseReapMark.objects.update(reaped_through=mark() - timedelta(hours=1))
    assert reaped.lease_floor() == mark() + timedelta(hours=1) - reaped.MARGIN


# --- what the reads see -------------------------------------------------------------


def test_a_lease_past_its_ttl_still_stops_counting_at_once_after_a_reap(gw, statements, monkeypatch):
    """SPEC §3: a lease past its TTL is ignored by every read before any
    reaper closes it; the mark does not hide the ones that expired since."""
    reread_each_time(monkeypatch)
    account = AccountFactory(name="a")
    slots.lease_reap_expired()
    lease = open_lease(account, expired_ago=timedelta(seconds=1))
    assert reaped.lease_floor() < lease.expires_at
    assert gw.dispatch(max_wait_ms=0).status_code == 200
    assert Lease.objects.get(pk=lease.pk).outcome == LeaseOutcome.EXPIRED


def test_a_lease_that_expired_below_the_floor_counts_until_the_next_reap(gw, statements, monkeypatch):
    """The trade: a lease still open with an expiry below the floor (a claim
    that committed long after its own clock) holds its slot until the next
    periodic run, which reads from the oldest expiry and closes it."""
    reread_each_time(monkeypatch)
    account = AccountFactory(name="a")
    slots.lease_reap_expired()
    lease = open_lease(account, expired_ago=reaped.MARGIN + timedelta(minutes=5))
    assert gw.dispatch(max_wait_ms=0).status_code == 429
    assert slots.lease_reap_expired(lock_timeout=True) == 1
    assert Lease.objects.get(pk=lease.pk).outcome == LeaseOutcome.EXPIRED
    assert gw.dispatch(max_wait_ms=0).status_code == 200


def test_the_probe_reads_from_the_floor_not_through_every_completed_lease(postgres_only, key):
    """What the mark is for: a completed lease's old row version stays in
    the index of open leases until a vacuum, and the probe for unreaped
    leases walked every one that had expired. From the floor it walks only
    those that expired since. Counted in buffers the read touches, on its
    generic plan as dispatches run it, before and after 20,000 leases
    completed two hours ago (other tests' rolled-back rows count in both)."""
    AccountFactory(name="a")
    now = timezone.now()
    floor = now - reaped.MARGIN

    def buffers(floor) -> int:
        query, values = head_read(key)
        sql, params = query.statement({**values, "lease_floor": floor})
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params)
            plan = cursor.fetchone()[0]
        plan = json.loads(plan) if isinstance(plan, str) else plan
        return plan[0]["Plan"]["Shared Hit Blocks"] + plan[0]["Plan"]["Shared Read Blocks"]

    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE routing_lease SET (autovacuum_enabled = false)")  # undone with the test
        cursor.execute("ANALYZE routing_lease")
    before = {"oldest": buffers(EXPIRY_FLOOR), "floor": buffers(floor)}
    account = Account.objects.get(name="a")
    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO routing_lease (id, api_key_id, identity_id, account_id, account_name, proxy_url, session_id,
                   model, started_at, expires_at, outcome, waited_ms, sticky, moved_from, quota_probe, error_message)
               SELECT gen_random_uuid(), %s, %s, %s, 'a', '', '', '', %s, %s + g * interval '1 ms', '', 0, '', '',
                      false, ''
                 FROM generate_series(1, 20000) AS g""",
            [key.pk, account.identity_id, account.pk, now - timedelta(hours=3), now - timedelta(hours=2)],
        )
        cursor.execute("UPDATE routing_lease SET completed_at = %s, outcome = 'success'", [now - timedelta(hours=2)])
        # Statistics as autovacuum's analyze keeps them: nearly every lease completed.
        cursor.execute("ANALYZE routing_lease")
    after = {"oldest": buffers(EXPIRY_FLOOR), "floor": buffers(floor)}
    assert after["oldest"] - before["oldest"] > 200, (before, after)  # walked the completed leases
    assert after["floor"] - before["floor"] < 20, (before, after)  # did not


def test_the_probe_cannot_read_the_open_leases_of_every_identity_or_key(postgres_only):
    """An analyze of a large lease table sees no open lease, and every
    index of open leases then looks empty: a plan once read
    ``lease_live_key_idx`` whole for the probe, through every completed
    lease not yet vacuumed, whatever the floor. Those indexes hold only rows
    that name their identity or key, so the probe (which names neither)
    can only take the index by expiry (with scans of the table ruled out,
    the plan's only other choices read every lease)."""
    lease = LeaseFactory(expires_at=timezone.now() - timedelta(hours=1))
    Lease.objects.filter(pk=lease.pk).update(completed_at=timezone.now(), outcome=LeaseOutcome.SUCCESS)
    probe = Lease.objects.filter(counts.expired(timezone.now(), EXPIRY_FLOOR), completed_at__isnull=True)
    sql, params = probe.values("identity_id").query.sql_with_params()

    def plan() -> str:
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN {sql}", params)
            return "\n".join(row[0] for row in cursor.fetchall())

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE routing_lease")
        cursor.execute("SET LOCAL enable_seqscan = off")
    assert "lease_live_expiry_idx" in plan()
    # Even were the index by expiry gone (dropped for the test, and back with
    # its rollback), the other two could not serve the probe.
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX lease_live_expiry_idx")
    other = plan()
    assert "lease_live_key_idx" not in other and "lease_live_identity_idx" not in other, other
