"""A key's concurrency limit is held in slot rows (``accounts.KeySlot``):
each counted lease holds one, a completion or the reaper frees it, rows are
made on demand up to the limit, and a lowered limit is never passed."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from accounts.models import Account, ApiKey, KeySlot, RoutingIdentity
from core.errors import RateLimited
from routing import leases, maintenance, slots
from routing.dispatch import DispatchRequest
from routing.models import Lease, StickyOutcome
from routing.selectors import dispatch as reads
from tests.accounts.test_migrations import migrate
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory
from tests.routing.gateway import Gateway
from tests.routing.test_concurrency import hammer
from tests.support import lock_wait_seen

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("statements")]


@pytest.fixture
def wide_pool():
    """Identities with room to spare, so only the key's limit binds."""
    for i in range(4):
        AccountFactory(name=f"wide-{i}", identity=RoutingIdentityFactory(max_concurrency=10))


def open_leases(key) -> list[Lease]:
    return list(Lease.objects.filter(api_key=key, completed_at__isnull=True))


def taken(key) -> set[int]:
    return set(KeySlot.objects.filter(api_key=key, taken=True).values_list("pk", flat=True))


@pytest.mark.usefixtures("wide_pool")
def test_each_lease_holds_its_own_slot_and_gives_it_back():
    key = ApiKeyFactory(max_concurrency=3)
    gw = Gateway(key.plaintext)
    held = [gw.dispatch().json()["lease_id"] for _ in range(3)]
    leases = open_leases(key)
    assert {lease.key_slot_id for lease in leases} == taken(key)
    assert len(taken(key)) == 3 == ApiKey.objects.get(pk=key.pk).in_flight
    assert gw.dispatch().status_code == 429  # no free slot: refused at once

    assert gw.complete(held[0], outcome="success").status_code == 200
    assert gw.complete(held[1], outcome="fatal", error_message="upstream 500").status_code == 200
    assert len(taken(key)) == 1
    assert gw.dispatch().status_code == 200
    assert gw.dispatch().status_code == 200
    assert gw.dispatch().status_code == 429
    assert KeySlot.objects.filter(api_key=key).count() == 3  # rows are reused, never more than the limit


@pytest.mark.usefixtures("wide_pool")
def test_slots_are_made_on_demand_up_to_the_limit_and_when_it_is_raised():
    key = ApiKeyFactory(max_concurrency=2)
    gw = Gateway(key.plaintext)
    assert not KeySlot.objects.filter(api_key=key).exists()  # a key that never dispatched has none
    assert [gw.dispatch().status_code for _ in range(3)] == [200, 200, 429]
    ApiKey.objects.filter(pk=key.pk).update(max_concurrency=4)
    gw = Gateway(key.plaintext)
    assert [gw.dispatch().status_code for _ in range(3)] == [200, 200, 429]
    assert sorted(KeySlot.objects.filter(api_key=key).values_list("number", flat=True)) == [0, 1, 2, 3]


def test_a_large_limit_gets_its_rows_as_the_key_uses_them():
    key = ApiKeyFactory(max_concurrency=1000)

    def numbers() -> list[int]:
        return list(KeySlot.objects.filter(api_key=key).order_by("number").values_list("number", flat=True))

    assert slots.key_slots_grow(key_id=key.pk, cap=1000)
    assert numbers() == list(range(slots.KEY_SLOTS_FIRST))
    KeySlot.objects.filter(api_key=key).update(taken=True)  # every one held: the next claim finds none free
    assert slots.key_slots_grow(key_id=key.pk, cap=1000)
    assert numbers() == list(range(2 * slots.KEY_SLOTS_FIRST))
    KeySlot.objects.filter(api_key=key).update(taken=True)
    assert not slots.key_slots_grow(key_id=key.pk, cap=100)  # a lower limit has all its rows, none free
    assert slots.key_slots_grow(key_id=key.pk, cap=130)  # ... and a little higher, the missing two
    assert numbers() == list(range(130))


@pytest.mark.usefixtures("wide_pool")
def test_a_lowered_limit_is_never_passed_while_leases_above_it_finish():
    key = ApiKeyFactory(max_concurrency=3)
    gw = Gateway(key.plaintext)
    held = {}
    for _ in range(3):
        lease = gw.dispatch().json()["lease_id"]
        held[Lease.objects.get(pk=lease).key_slot.number] = lease
    ApiKey.objects.filter(pk=key.pk).update(max_concurrency=2)

    assert gw.dispatch().status_code == 429  # 3 out, limit 2
    gw.complete(held[0], outcome="success")
    assert gw.dispatch().status_code == 429  # 2 out, limit 2
    gw.complete(held[1], outcome="success")
    # One out, but it holds slot 2, above the new limit: the key waits for it
    # rather than count two and pass the limit by a race.
    assert gw.dispatch().status_code == 429
    gw.complete(held[2], outcome="success")
    assert [gw.dispatch().status_code for _ in range(3)] == [200, 200, 429]
    assert {lease.key_slot.number for lease in open_leases(key)} == {0, 1}


@pytest.mark.usefixtures("wide_pool")
def test_the_reaper_frees_the_slot_of_a_lease_past_its_ttl():
    key = ApiKeyFactory(max_concurrency=1)
    gw = Gateway(key.plaintext)
    lease = gw.dispatch().json()["lease_id"]
    assert gw.dispatch().status_code == 429
    Lease.objects.filter(pk=lease).update(expires_at=timezone.now())
    assert slots.lease_reap_expired() == 1
    assert not taken(key)
    assert gw.dispatch().status_code == 200


@pytest.mark.usefixtures("wide_pool")
def test_a_lease_past_its_ttl_stops_counting_against_its_key_before_the_reaper_runs():
    # SPEC §2: a lease never completed stops counting at its TTL; §4: with no
    # task run too. The next dispatch goes to another identity (never
    # started), so only the key's slot still holds the expired lease.
    key = ApiKeyFactory(max_concurrency=1)
    gw = Gateway(key.plaintext)
    lease = gw.dispatch().json()["lease_id"]
    assert gw.dispatch(max_wait_ms=0).status_code == 429
    Lease.objects.filter(pk=lease).update(expires_at=timezone.now() - timedelta(seconds=1))
    second = gw.dispatch(max_wait_ms=0)
    assert second.status_code == 200, second.content
    assert second.json()["account"]["name"] != Lease.objects.get(pk=lease).account_name
    assert Lease.objects.get(pk=lease).outcome == "expired"
    assert {lease.key_slot_id for lease in open_leases(key)} == taken(key)
    assert len(taken(key)) == 1
    assert gw.dispatch(max_wait_ms=0).status_code == 429  # the live one still counts


@pytest.mark.usefixtures("wide_pool")
def test_a_key_full_of_expired_leases_waits_for_a_slot_rather_than_refuse_at_once():
    # Before its first wait a dispatch reads its key's slots (key_limits_recheck):
    # one held by a lease past its TTL is free by then. Here the expired lease
    # is on an account the key no longer routes to, and every other identity
    # is full with another key's leases, so the dispatch waits.
    key = ApiKeyFactory(max_concurrency=1)
    gw = Gateway(key.plaintext)
    lease = gw.dispatch().json()["lease_id"]
    Lease.objects.filter(pk=lease).update(expires_at=timezone.now() - timedelta(seconds=1))
    Account.objects.filter(name=Lease.objects.get(pk=lease).account_name).update(enabled=False)
    RoutingIdentity.objects.filter(accounts__enabled=True).update(max_concurrency=1)
    other = Gateway(ApiKeyFactory(max_concurrency=10).plaintext)
    assert [other.dispatch(max_wait_ms=0).status_code for _ in range(3)] == [200, 200, 200]
    refused = gw.dispatch(max_wait_ms=50)
    assert refused.status_code == 429
    assert "concurrency or pacing limit" in refused.json()["error"]["message"]  # waited, not "this API key"
    assert not taken(key)


def test_a_key_without_a_limit_takes_no_slot(settings):
    settings.KIROPOOL_KEY_MAX_CONCURRENCY = 0
    AccountFactory()
    key = ApiKeyFactory()
    gw = Gateway(key.plaintext)
    lease = gw.dispatch().json()["lease_id"]
    assert Lease.objects.get(pk=lease).key_slot_id is None
    assert not KeySlot.objects.exists()
    assert gw.complete(lease, outcome="success").status_code == 200


# --- across connections, on PostgreSQL -----------------------------------------------


def _threads(count: int, work) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            work(i)
        except BaseException as error:  # noqa: BLE001  reported by the test thread below
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only", "wide_pool")
def test_a_new_keys_first_dispatches_at_once_are_all_served():
    """Every thread finds no slot row and makes them at the same moment; none
    is refused for it (the key's limit, 64 by default, is far off)."""
    key = ApiKeyFactory()
    statuses: list[int] = []
    _threads(8, lambda i: statuses.append(Gateway(key.plaintext).dispatch(session_id=f"s{i}").status_code))
    assert statuses == [200] * 8
    assert len(taken(key)) == 8 == len(open_leases(key))


def nothing_written() -> bool:
    """The open transaction has written nothing (a row lock is a write)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_xact_id_if_assigned()")
        return cursor.fetchone() == (None,)


def on_another_connection(call) -> list:
    """``call()`` run on a thread of its own, so on a database connection of
    its own, while the caller's transaction stays open: ``[its result]``,
    or ``[]`` if it raised."""
    result: list = []

    def run() -> None:
        try:
            result.append(call())
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return result


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only", "wide_pool")
def test_a_new_sessions_sticky_look_up_holds_no_slot_of_the_key():
    """The sticky look-up of a session with no binding serves nothing, so it
    must not lock the key's slot: with a limit of 1 another dispatch is
    served while the look-up's transaction is still open. Nor may it write
    at all, or its commit would wait for a WAL flush on every new
    conversation."""
    key = ApiKeyFactory(max_concurrency=1)
    Gateway(key.plaintext).cycle()  # the key's one slot row exists, free

    with transaction.atomic():
        acquired, bound = leases._sticky_fast_path(key=key, request=DispatchRequest(session_id="new"))
        assert (acquired, bound) == (None, None)
        assert nothing_written()
        served = on_another_connection(
            lambda: Gateway(key.plaintext).dispatch(session_id="other", max_wait_ms=0).status_code
        )
    assert served == [200]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_sticky_claim_on_a_busy_identity_holds_no_slot_of_the_key():
    """A returning turn whose bound account's identity is at its limit is
    not served by the sticky fast path (it waits for it, or moves); its
    statement must not lock a slot of the key meanwhile, or a dispatch for
    another identity finds the key's last slot taken (a 429)."""
    for name in ("a", "b"):
        AccountFactory(name=name, identity=RoutingIdentityFactory(max_concurrency=1))
    key = ApiKeyFactory(max_concurrency=2)
    gw = Gateway(key.plaintext)
    bound = gw.cycle(session_id="s1")  # binds the session
    held = gw.dispatch(session_id="s1")  # its identity's one slot, and one of the key's two
    assert held.status_code == 200 and held.json()["account"]["name"] == bound

    with transaction.atomic():
        acquired, row = leases._sticky_fast_path(key=key, request=DispatchRequest(session_id="s1"))
        assert acquired is None and row.candidate.account == bound
        assert nothing_written()
        served = on_another_connection(lambda: Gateway(key.plaintext).account_of(max_wait_ms=0))
    assert served == [{"a": "b", "b": "a"}[bound]]


def head_row(key, account):
    """``account``'s row of the key's head as a walk reads it."""
    request = DispatchRequest(session_id=None, max_wait_ms=0)
    head = reads.read(key=key, request=request, now=timezone.now(), snapshot=None, spread=False, head=True).rows
    return next(row for row in head if row.account_id == account.pk)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_claim_that_lost_its_identity_holds_no_slot_of_the_key():
    """A dispatch read its head, and another took the identity it was
    about to claim. Its claim fails; it must not lock a slot of the key on
    the way, or a third dispatch, for the other identity, finds the key's
    last slot taken (a 429), and the failed claim's commit waits for a WAL
    flush."""
    first = AccountFactory(name="a-first", identity=RoutingIdentityFactory(max_concurrency=1))
    AccountFactory(name="b-second", identity=RoutingIdentityFactory(max_concurrency=1))
    key = ApiKeyFactory(max_concurrency=2)
    request = DispatchRequest(session_id=None, max_wait_ms=0)
    slots.key_slots_grow(key_id=key.pk, cap=2)  # the key's slot rows exist, free
    stale = head_row(key, first)
    assert stale.ready
    assert Gateway(key.plaintext).account_of() == first.name  # takes the identity the stale row offers

    with transaction.atomic():
        assert slots.slot_claim(key=key, row=stale, request=request, waited_ms=0) is None
        assert nothing_written()
        served = on_another_connection(lambda: Gateway(key.plaintext).account_of(max_wait_ms=0))
    assert served == ["b-second"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_claim_queued_on_its_identitys_row_holds_no_slot_of_the_key():
    """While a claim waits for its identity's row (a completion or another
    claim on it has not committed yet: during a slow WAL flush, tens of
    milliseconds), it holds none of the key's slots, so a dispatch for
    another identity takes the key's last one (before: a 429). Once the
    row is free the queued claim finds the key full."""
    busy = AccountFactory(name="busy", identity=RoutingIdentityFactory(max_concurrency=4))
    AccountFactory(name="free", identity=RoutingIdentityFactory(max_concurrency=4))
    # "busy" started a moment ago, so a fresh dispatch's walk offers "free" first.
    RoutingIdentity.objects.filter(pk=busy.identity_id).update(last_started_at=timezone.now())
    key = ApiKeyFactory(max_concurrency=1)
    slots.key_slots_grow(key_id=key.pk, cap=1)
    row = head_row(key, busy)
    request = DispatchRequest(session_id=None, max_wait_ms=0)
    queued: list[object] = []

    def claim_on_busy() -> None:
        try:
            queued.append(slots.slot_claim(key=key, row=row, request=request, waited_ms=0))
        except RateLimited as refused:
            queued.append(refused)
        finally:
            connections.close_all()

    holder = connections.create_connection("default")  # holds the busy identity's row, as a slow commit would
    try:
        holder.set_autocommit(False)
        with holder.cursor() as cursor:
            cursor.execute("SELECT id FROM accounts_routingidentity WHERE id = %s FOR UPDATE", [busy.identity_id])
        thread = threading.Thread(target=claim_on_busy)
        thread.start()
        lock_wait_seen()  # until the claim waits for the row
        assert thread.is_alive(), queued
        assert Gateway(key.plaintext).account_of(max_wait_ms=0) == "free"  # the key's one slot
    finally:
        holder.rollback()
        holder.close()
    thread.join(30)
    assert len(queued) == 1 and isinstance(queued[0], RateLimited)  # the key's slot went to "free"
    assert Lease.objects.filter(api_key=key, completed_at__isnull=True).count() == 1


@contextlib.contextmanager
def key_watched(key):
    """Count the key's open leases, and the leases sharing a slot, from
    outside the dispatcher while the block runs; yields the highest seen."""
    stop, seen = threading.Event(), {"peak": 0, "shared": 0}

    def watch() -> None:
        try:
            with connections["default"].cursor() as cursor:
                while not stop.is_set():
                    cursor.execute(
                        "SELECT count(*), count(*) - count(DISTINCT key_slot_id) FROM routing_lease "
                        "WHERE api_key_id = %s AND completed_at IS NULL",
                        [key.pk],
                    )
                    out, shared = cursor.fetchone()
                    seen["peak"], seen["shared"] = max(seen["peak"], out), max(seen["shared"], shared)
                    time.sleep(0.001)
        finally:
            connections.close_all()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join(30)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_processes_cycling_on_one_key_never_pass_its_limit_nor_share_a_slot():
    """Five OS processes dispatch, hold and complete on a key limited to 2,
    over identities with room to spare, while the key is watched from here."""
    limit, workers, cycles = 2, 5, 20
    identities = [RoutingIdentityFactory(name=f"roomy-{i}", max_concurrency=10) for i in range(4)]
    for identity in identities:
        AccountFactory(name=identity.name, identity=identity)
    key = ApiKeyFactory(max_concurrency=limit)
    with key_watched(key) as seen:
        acquired, _, holders = hammer(key, identities, workers=workers, cycles=cycles, hold_ms=20)

    assert 0 < len(acquired) < workers * cycles  # the limit was reached: some were refused at once
    assert seen["peak"] == limit
    assert seen["shared"] == 0
    assert holders == 0 and not taken(key) and not open_leases(key)
    assert len(set(acquired)) == len(acquired) == Lease.objects.filter(api_key=key).count()
    assert set(maintenance.counters_reconcile().values()) == {0}


# --- the upgrade -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_upgrade_gives_each_open_counted_lease_a_slot():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    before = [("accounts", "0006_identity_account_rows"), ("routing", "0009_pool_order_bands")]
    try:
        old = migrate(before)
        identity = old.get_model("accounts", "RoutingIdentity").objects.create(name="i", in_flight=3)
        key = old.get_model("accounts", "ApiKey").objects.create(name="k", prefix="p", key_hash="h", in_flight=2)
        lease = old.get_model("routing", "Lease")
        now = timezone.now()

        def leased(**fields):
            return lease.objects.create(
                api_key=key, identity=identity, started_at=now, expires_at=now + timedelta(minutes=5), **fields
            ).pk

        counted = [leased(counted_on_key=True), leased(counted_on_key=True)]
        uncounted = leased(counted_on_key=False)
        done = leased(counted_on_key=True, completed_at=now, outcome="success")

        migrate([("routing", "0010_lease_key_slot")])

        slots = {pk: slot for pk, slot in Lease.objects.values_list("pk", "key_slot__number")}
        assert sorted(slots[pk] for pk in counted) == [0, 1]
        assert slots[uncounted] is None and slots[done] is None
        assert list(KeySlot.objects.values_list("taken", flat=True)) == [True, True]
    finally:
        migrate(latest)
    assert ApiKey.objects.get(name="k").in_flight == 2
    assert set(maintenance.counters_reconcile().values()) == {0}


def test_a_bound_sessions_own_claim_may_take_the_slot_held_for_it():
    """Its identity's one free slot is held for a waiting returning turn:
    a claim for that turn's own account (a hit) takes it, any other claim
    does not, on either path (the ORM service and the one statement)."""
    account = AccountFactory(name="bound", identity=RoutingIdentityFactory(max_concurrency=1))
    key = ApiKeyFactory()
    slots.identity_hold(identity_id=account.identity_id, until=timezone.now() + timedelta(minutes=1))
    row = head_row(key, account)
    request = DispatchRequest(session_id="conv", max_wait_ms=0)
    assert slots.slot_claim(key=key, row=row, request=request, waited_ms=0) is None
    assert slots.slot_claim(key=key, row=row, request=request, waited_ms=0, sticky=StickyOutcome.MOVED) is None
    grant = slots.slot_claim(key=key, row=row, request=request, waited_ms=0, sticky=StickyOutcome.HIT)
    assert grant is not None and grant.account_id == account.pk
    assert RoutingIdentity.objects.get(pk=account.identity_id).in_flight == 1
