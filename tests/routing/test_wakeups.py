"""Waking a dispatch that waits for a slot, in any process: a release, a
slot held for a returning turn given up or lapsed, a cooldown ending, an
operator's edit of the pool."""

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from accounts import services
from accounts.models import Account, AccountGroup, ApiKey, RoutingIdentity
from accounts.onboarding.importer import pool_import
from routing import slots, waiting, wakeups
from routing.models import Lease
from tests.factories import AccountFactory, ApiKeyFactory, RoutingIdentityFactory
from tests.routing.gateway import Gateway
from tests.routing.test_concurrency import ROOT, child_env
from tests.support import until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only", "statements")]


RELEASER = """
import json, os, sys, time, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")
django.setup()
from django.test import Client
client = Client(HTTP_AUTHORIZATION="Bearer " + sys.argv[1])
body = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {"outcome": "success"}
sys.stdin.readline()  # the parent is about to wait
time.sleep(0.3)
sent = time.time()
response = client.post(f"/api/v1/leases/{sys.argv[2]}/complete", body, "application/json")
print(sent, time.time(), response.status_code, flush=True)
"""


def releaser_start(key: str, lease: str, body: dict | None = None) -> subprocess.Popen:
    """Another process that completes ``lease`` a moment after it is told to
    go; its output is read by :func:`releaser_result`."""
    args = [sys.executable, "-c", RELEASER, key, lease] + ([json.dumps(body)] if body else [])
    releaser = subprocess.Popen(
        args,
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    releaser.stdin.write("go\n")
    releaser.stdin.flush()
    return releaser


def releaser_result(releaser: subprocess.Popen) -> tuple[float, float, str]:
    """When the releaser sent its completion, when the answer came, and its status."""
    sent, answered, status = releaser.communicate(timeout=60)[0].split()
    return float(sent), float(answered), status


def dispatch_while_released(gw: Gateway, key, lease: str, **body):
    """Dispatch while another process releases ``lease``. Both succeed and
    the dispatch waited; returns its answer and how long after the release
    was answered it was answered."""
    releaser = releaser_start(key.plaintext, lease)
    response = gw.dispatch(**body)
    acquired_at = time.time()
    _, released_at, status = releaser_result(releaser)
    assert (response.status_code, status) == (200, "200")
    assert response.json()["waited_ms"] > 0
    return response, acquired_at - released_at


def test_waiting_dispatch_wakes_when_another_process_releases():
    identity = RoutingIdentityFactory(max_concurrency=1)
    AccountFactory(identity=identity)
    key = ApiKeyFactory()
    gw = Gateway(key.plaintext)
    held = gw.dispatch().json()["lease_id"]
    _, lag = dispatch_while_released(gw, key, held, max_wait_ms=30_000)
    # Woken by the other process's release (a few ms; slack 1 s for a busy
    # machine), not by the 30 s budget.
    assert lag < 1.0


def test_waiting_dispatch_wakes_when_a_cooldown_set_by_another_process_ends():
    AccountFactory(name="full")
    AccountFactory(name="soon-cooling")
    key = ApiKeyFactory()
    gw = Gateway(key.plaintext)
    gw.dispatch(exclude_accounts=["soon-cooling"])  # holds "full"
    other = gw.dispatch(exclude_accounts=["full"]).json()["lease_id"]
    # The other process reports a 2 s rate limit on "soon-cooling": its
    # release wakes us, we find it cooling, and wake again when that ends.
    releaser = releaser_start(key.plaintext, other, {"outcome": "rate_limited", "cooldown_seconds": 2})
    response = gw.dispatch(max_wait_ms=8_000)
    acquired_at = time.time()
    sent, answered, status = releaser_result(releaser)
    assert (response.status_code, status) == (200, "200")
    assert response.json()["account"]["name"] == "soon-cooling"
    # The cooldown starts while the report is being answered, so it ends
    # at least 2 s after the report was sent (once, the answer took 0.1 s to
    # arrive under load, and 2 s after the answer was too strict), and not at
    # the end of the 8 s budget; slack 3 s after the answer for a busy machine.
    assert acquired_at - sent >= 2.0
    assert acquired_at - answered <= 5.0


def bound_and_full(gw: Gateway) -> str:
    """Bind session "conv" to account "bound" by a first turn, then hold the
    only slot of "bound" ("elsewhere" stays free); returns that lease."""
    first = gw.dispatch(session_id="conv", exclude_accounts=["elsewhere"]).json()["lease_id"]
    gw.complete(first, outcome="success")
    return gw.dispatch(exclude_accounts=["elsewhere"]).json()["lease_id"]


def test_a_returning_turn_waits_for_a_release_in_another_process():
    key = ApiKeyFactory(sticky_patience_ms=6_000)
    AccountFactory(name="bound")
    AccountFactory(name="elsewhere")
    gw = Gateway(key.plaintext)
    held = bound_and_full(gw)
    response, lag = dispatch_while_released(gw, key, held, session_id="conv", max_wait_ms=10_000)
    assert response.json()["account"]["name"] == "bound"  # it waited rather than move
    assert lag < 1.0  # woken by the release; slack for a busy machine
    assert Lease.objects.get(pk=response.json()["lease_id"]).sticky == "waited"


def test_a_returning_turns_wait_does_not_look_up_when_holds_lapse():
    """A hold never keeps a returning turn out, its own included, so its
    waits do not ask when the identity's holds lapse (a query each). The
    turn waits twice, its own hold standing for the second: an operator's
    save wakes it in between. Its patience then runs out and it moves."""
    key = ApiKeyFactory(sticky_patience_ms=3_000)
    AccountFactory(name="bound")
    AccountFactory(name="elsewhere")
    gw = Gateway(key.plaintext)
    bound_and_full(gw)
    bound = Account.objects.get(name="bound").identity_id
    _listening()
    results: dict = {}

    def returning_turn():
        with CaptureQueriesContext(connection) as queries:
            response = gw.dispatch(session_id="conv", max_wait_ms=10_000)
        return response, [query["sql"] for query in queries]

    thread = _in_thread(returning_turn, results, "turn")
    until(
        RoutingIdentity.objects.filter(pk=bound, sticky_waiters=1).exists,
        what="the returning turn never held a slot",
        step=0.01,
    )
    AccountFactory(name="unrelated")  # an operator's save: wakes every waiting dispatch
    thread.join(30)
    response, sql = results["turn"]
    assert response.json()["account"]["name"] == "elsewhere"
    lease, identity = Lease._meta.db_table, RoutingIdentity._meta.db_table
    assert len([q for q in sql if f'MIN("{lease}"."expires_at")' in q]) >= 2  # it waited twice
    assert not [q for q in sql if f'MIN("{identity}"."sticky_wait_until")' in q]


def test_a_release_wakes_the_listeners_only_when_it_frees_a_slot(statements):
    """Of two releases on an identity of two slots, the first frees a slot
    waiters may want (it was full) and notifies every process's listener.
    The one-statement completion spares them the second, which leaves a
    second slot free; the ORM completion notifies on every release."""
    identity = RoutingIdentityFactory(max_concurrency=2)
    AccountFactory(identity=identity)
    gw = Gateway(ApiKeyFactory().plaintext)
    leases = [gw.dispatch().json()["lease_id"] for _ in range(2)]
    params = connection.get_connection_params()
    keep = ("dbname", "user", "password", "host", "port")
    with psycopg.connect(autocommit=True, **{k: params[k] for k in keep if params.get(k)}) as listener:
        listener.execute(f"LISTEN {wakeups.CHANNEL}")
        heard = []
        for lease in leases:
            assert gw.complete(lease, outcome="success").status_code == 200
            # A notification arrives on commit, in milliseconds; slack 1 s.
            heard.append(len(list(listener.notifies(timeout=1.0, stop_after=1))))
    assert heard == ([1, 0] if statements != "orm" else [1, 1])


# --- lost wake-ups ----------------------------------------------------------------
# Each test below failed before its fix: the dispatch slept through what
# freed its slot (a release, a hold given up or lapsed, an operator's edit)
# to the end of its wait budget. The first four caused the occasional 20 s
# stalls of the hammer test (test_concurrency.py).


def _listening() -> None:
    """This process's release listener is connected, so its first wake-up
    (sent on connecting) cannot stand in for the one a test is about."""
    assert wakeups.listening(timeout=10)


def _in_thread(call, results: dict, name: str) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = call()
            results[f"{name}_at"] = time.monotonic()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_release_that_frees_a_slot_held_back_for_a_returning_session_wakes_new_sessions():
    """Two slots: one leased, one held for a returning session waiting in
    another process (its hold is all this test needs of it). A new session
    finds the identity full and waits. Another process releases the lease:
    the identity was not full without the hold, but a slot is now free for
    the new session, and it is woken at once."""
    identity = RoutingIdentityFactory(max_concurrency=2)
    AccountFactory(identity=identity)
    key = ApiKeyFactory()
    gw = Gateway(key.plaintext)
    held = gw.dispatch().json()["lease_id"]
    slots.identity_hold(identity_id=identity.pk, until=timezone.now() + timedelta(seconds=60))
    _listening()
    _, lag = dispatch_while_released(gw, key, held, max_wait_ms=20_000)
    # Woken by the release, not at the end of the 20 s budget; slack 1 s
    # for a busy machine (a wake takes a few ms).
    assert lag < 1.0


def test_a_release_on_an_identity_ramping_back_from_an_ejection_wakes_new_sessions():
    """Back from an ejection a second ago, an identity of four slots takes
    one lease for now (slow start over 60 s), and it is leased. A new session
    waits. Another process releases the lease: the identity was below its
    max_concurrency but at its ramped limit, and the new session is woken at
    once, not at the next slow-start step (20 s on) or the end of its
    10 s budget."""
    identity = RoutingIdentityFactory(max_concurrency=4)
    AccountFactory(identity=identity)
    RoutingIdentity.objects.filter(pk=identity.pk).update(ejected_until=timezone.now() - timedelta(seconds=1))
    key = ApiKeyFactory()
    gw = Gateway(key.plaintext)
    held = gw.dispatch().json()["lease_id"]
    assert gw.dispatch(max_wait_ms=0).status_code == 429  # the ramped limit is one slot
    _listening()
    _, lag = dispatch_while_released(gw, key, held, max_wait_ms=10_000)
    assert lag < 1.0  # slack 1 s for a busy machine (a wake takes a few ms)


def test_a_returning_turn_that_gives_up_its_held_slot_wakes_new_sessions():
    """A returning turn waits for its paced account, holding one of its two
    slots (the other is leased), and runs out of wait budget. A new session
    of another key, kept out by that hold, is woken when the hold is given
    up and takes the slot once the pacing interval ends, not at the end of
    its own budget."""
    identity = RoutingIdentityFactory(max_concurrency=2)
    AccountFactory(name="paced", identity=identity)
    returning = ApiKeyFactory(sticky_patience_ms=10_000)
    gw = Gateway(returning.plaintext)
    gw.cycle(session_id="conv")  # binds the session to "paced"
    assert gw.dispatch().status_code == 200  # leases one of its two slots
    paced_from = time.monotonic()
    RoutingIdentity.objects.filter(pk=identity.pk).update(min_start_interval_ms=4_000, last_started_at=timezone.now())
    results: dict = {}
    waiting_turn = _in_thread(lambda: gw.dispatch(session_id="conv", max_wait_ms=2_000), results, "returning")
    until(
        RoutingIdentity.objects.filter(pk=identity.pk, sticky_waiters=1).exists,
        what="the returning turn never held a slot",
        step=0.01,
    )
    newcomer = Gateway(ApiKeyFactory().plaintext)
    new_session = _in_thread(lambda: newcomer.dispatch(max_wait_ms=15_000), results, "new")
    waiting_turn.join(30)
    new_session.join(30)
    assert results["returning"].status_code == 429  # its budget ended while the account was paced
    assert results["new"].status_code == 200, results["new"].content
    # The pacing interval ends 4 s after it started; woken by the hold given
    # up, the new session waits for exactly that, not for its 15 s budget.
    # Slack 4 s for a busy machine.
    assert 3.9 <= results["new_at"] - paced_from < 8.0


def test_a_release_between_a_returning_turns_read_and_its_wait_wakes_it(monkeypatch):
    """A returning turn finds its account full and starts waiting for it. The
    release lands after it read the account and before it sleeps (here:
    while it takes its hold, timed by the test). It is woken at once rather
    than sleep out its patience."""
    key = ApiKeyFactory(sticky_patience_ms=6_000)
    AccountFactory(name="bound")
    AccountFactory(name="elsewhere")
    gw = Gateway(key.plaintext)
    held = bound_and_full(gw)
    _listening()
    hold, released = slots.identity_hold, {}

    def hold_then_release(**kwargs) -> None:
        hold(**kwargs)
        seen = wakeups.current()
        _, released["at"], released["status"] = releaser_result(releaser_start(key.plaintext, held))
        # the listener has heard of the release
        until(lambda: wakeups.current() != seen, 10, what="the release was never heard of", step=0.005)

    monkeypatch.setattr(slots, "identity_hold", hold_then_release)
    response = gw.dispatch(session_id="conv", max_wait_ms=10_000)
    acquired_at = time.time()
    assert (response.status_code, released["status"]) == (200, "200")
    assert response.json()["account"]["name"] == "bound"
    assert Lease.objects.get(pk=response.json()["lease_id"]).sticky == "waited"
    # Woken by the release it had missed, not after its 6 s patience; slack
    # 1 s for a busy machine.
    assert acquired_at - released["at"] < 1.0


def test_a_slot_held_by_a_returning_turn_that_died_is_free_again_when_its_hold_lapses():
    """A returning turn in another process held one of two slots and died
    waiting (the other slot is leased): nobody will give the hold back or
    announce its end. A new session kept out by it takes the slot when the
    hold lapses, not at the end of its own budget."""
    identity = RoutingIdentityFactory(max_concurrency=2)
    AccountFactory(identity=identity)
    gw = Gateway(ApiKeyFactory().plaintext)
    assert gw.dispatch().status_code == 200
    _listening()
    started = time.monotonic()
    slots.identity_hold(identity_id=identity.pk, until=timezone.now() + timedelta(seconds=1.5))
    response = gw.dispatch(max_wait_ms=15_000)
    assert response.status_code == 200
    # The hold lapses 1.5 s after it was taken; slack 3.5 s for a busy machine.
    assert 1.4 <= time.monotonic() - started < 5.0


def _waiting_on(key, results: dict) -> threading.Thread:
    """A new session of ``key`` dispatching in a thread, once it waits."""
    gw = Gateway(key.plaintext)
    thread = _in_thread(lambda: gw.dispatch(max_wait_ms=20_000), results, "waiter")
    until(lambda: waiting.room.waiting(key.pk), 10, what="the dispatch never waited", step=0.01)
    return thread


@pytest.mark.parametrize("edit", ["saved", "imported"])
def test_an_operator_raising_a_full_identitys_limit_wakes_its_waiting_dispatches(edit):
    """A dispatch waits on a full identity; an operator raises its limit (an
    ordinary save, as the admin and the operator API do, or a bulk import).
    The dispatch takes the new slot at once: the identity is no longer full,
    so none of its releases would have woken it before its 20 s budget
    ended."""
    identity = RoutingIdentityFactory(max_concurrency=1)
    AccountFactory(identity=identity)
    key = ApiKeyFactory()
    assert Gateway(key.plaintext).dispatch().status_code == 200
    _listening()
    results: dict = {}
    waiter = _waiting_on(key, results)
    if edit == "saved":
        identity.refresh_from_db()
        identity.max_concurrency = 2
        identity.save(update_fields=["max_concurrency"])
    else:
        report = pool_import({"identities": [{"name": identity.name, "max_concurrency": 2}]})
        assert report.counts("identities")["update"] == 1
    edited_at = time.monotonic()
    waiter.join(30)
    assert results["waiter"].status_code == 200
    assert results["waiter_at"] - edited_at < 1.0  # slack 1 s for a busy machine; the budget is 20 s


def test_an_operator_adding_an_account_to_a_keys_group_wakes_its_waiting_dispatches():
    """A key routes over a group whose one account is full, and a dispatch
    waits. An operator adds a free account to the group: the dispatch takes
    it at once, not at the end of its 20 s budget."""
    full = AccountFactory(name="full", identity=RoutingIdentityFactory(max_concurrency=1))
    free = AccountFactory(name="free")
    group = AccountGroup.objects.create(name="team")
    group.accounts.add(full)
    key = ApiKeyFactory(account_group=group)
    assert Gateway(key.plaintext).dispatch().status_code == 200
    _listening()
    results: dict = {}
    waiter = _waiting_on(key, results)
    group.accounts.add(free)
    added_at = time.monotonic()
    waiter.join(30)
    assert results["waiter"].status_code == 200
    assert results["waiter"].json()["account"]["name"] == "free"
    assert results["waiter_at"] - added_at < 1.0  # slack 1 s for a busy machine; the budget is 20 s


def test_an_operator_enabling_an_account_in_the_admin_wakes_waiting_dispatches(staff_client):
    """The only enabled account is full, and a dispatch waits. An operator
    enables a second account with the admin's bulk action (an update of the
    queryset, which sends no post_save): the dispatch takes it at once, not
    at the end of its 20 s budget."""
    AccountFactory(name="full", identity=RoutingIdentityFactory(max_concurrency=1))
    off = AccountFactory(name="off", enabled=False)
    key = ApiKeyFactory()
    assert Gateway(key.plaintext).dispatch().status_code == 200
    _listening()
    results: dict = {}
    waiter = _waiting_on(key, results)
    page = staff_client.post(
        reverse("admin:accounts_account_changelist"), {"action": "enable", "_selected_action": [off.pk]}
    )
    assert page.status_code == 302
    enabled_at = time.monotonic()
    waiter.join(30)
    assert results["waiter"].status_code == 200
    assert results["waiter"].json()["account"]["name"] == "off"
    assert results["waiter_at"] - enabled_at < 1.0  # slack 1 s for a busy machine; the budget is 20 s


def test_a_dispatch_waiting_when_its_key_is_disabled_is_refused_not_granted():
    """A dispatch waits on a full identity; an operator disables its key
    (in SQL: the recheck reads the row, whatever changed it), then the slot
    frees. The dispatch is refused, not granted a lease its gateway could no
    longer complete, and nothing is held for it."""
    AccountFactory(name="full", identity=RoutingIdentityFactory(max_concurrency=1))
    key = ApiKeyFactory()
    holder = Gateway(ApiKeyFactory().plaintext)
    held = holder.dispatch().json()["lease_id"]
    _listening()
    results: dict = {}
    waiter = _waiting_on(key, results)
    # Past the recheck's period since the waiter last read its key (it read
    # it before it started waiting): the next wake reads it again.
    time.sleep(slots.KEY_RECHECK_SECONDS + 0.5)
    ApiKey.objects.filter(pk=key.pk).update(enabled=False)
    assert holder.complete(held, outcome="success").status_code == 200
    waiter.join(30)
    assert results["waiter"].status_code == 401, results["waiter"].content
    assert results["waiter"]["WWW-Authenticate"] == 'Bearer realm="kiropool"'  # as before the wait
    assert not Lease.objects.filter(api_key=key).exists()
    assert RoutingIdentity.objects.get().in_flight == 0


def test_an_operator_clearing_a_cooldown_wakes_waiting_dispatches():
    """One identity is full, the other cooling for 5 minutes: a dispatch
    waits. An operator clears the cooldown (the admin's action): the
    dispatch takes the identity at once, not at the end of its budget."""
    AccountFactory(name="full", identity=RoutingIdentityFactory(max_concurrency=1))
    cooling = RoutingIdentityFactory(cooldown_until=timezone.now() + timedelta(minutes=5))
    AccountFactory(name="cooling", identity=cooling)
    key = ApiKeyFactory()
    assert Gateway(key.plaintext).dispatch(exclude_accounts=["cooling"]).status_code == 200
    _listening()
    results: dict = {}
    waiter = _waiting_on(key, results)
    assert services.identity_cooldown_clear(identities=RoutingIdentity.objects.filter(pk=cooling.pk)) == 1
    cleared_at = time.monotonic()
    waiter.join(30)
    assert results["waiter"].status_code == 200
    assert results["waiter"].json()["account"]["name"] == "cooling"
    assert results["waiter_at"] - cleared_at < 1.0  # slack 1 s for a busy machine; the budget is 20 s
