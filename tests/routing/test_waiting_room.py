"""The waiting room's order among one key's attempts and waiters
(routing/waiting.py), in one process and without a database: threads woken
by one release wake in no set order, and the oldest must still look first."""

from __future__ import annotations

import threading
import time

from routing import wakeups
from routing.waiting import WaitingRoom
from tests.support import until


def _record(order: list[str], name: str, visit, token: int, late=None) -> None:
    visit.wait(token, 5.0)
    if late is not None:
        late()  # this thread is slow to get going after the wake-up
    with visit.turn():
        order.append(name)


def _asking_or_through(room: WaitingRoom, visit, order: list[str]):
    """Until ``visit`` asks for its turn and waits for it, or has had it
    (``order`` has an entry): what a test waits for, rather than sleeping
    and hoping a thread on a busy machine got that far."""

    def asked() -> bool:
        return bool(order) or (visit.seq is not None and visit.seq in room._queues.get(visit.key_id, ()))

    return lambda: until(asked, 5, what="it never asked for its turn")


def test_an_older_waiter_woken_late_still_goes_first():
    room = WaitingRoom()
    token = wakeups.current()
    wakeups.released_locally()  # the release both are waiting for has happened
    order: list[str] = []
    older, younger = room.visit(key_id=1), room.visit(key_id=1)
    # The older one is slow: it asks for its turn only once the younger one
    # asked (and waits), or went ahead (which the order shows).
    late = _asking_or_through(room, younger, order)
    first = threading.Thread(target=_record, args=(order, "older", older, token, late))
    first.start()
    until(lambda: older.seq is not None)
    second = threading.Thread(target=_record, args=(order, "younger", younger, token))
    second.start()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert order == ["older", "younger"]


def test_an_older_waiter_not_yet_due_does_not_hold_up_a_younger_one():
    room = WaitingRoom()
    sleeping, woken = room.visit(key_id=1), room.visit(key_id=1)
    stale = wakeups.current()
    wakeups.released_locally()
    sleeping.wait(wakeups.current(), 0)  # older, asleep until a release that has not come
    order: list[str] = []
    thread = threading.Thread(target=_record, args=(order, "woken", woken, stale))
    thread.start()
    thread.join(5)
    assert order == ["woken"]


def test_another_keys_waiters_are_not_in_the_queue():
    room = WaitingRoom()
    token = wakeups.current()
    wakeups.released_locally()
    room.visit(key_id=1).wait(token, 0)  # due, and never takes its turn
    order: list[str] = []
    thread = threading.Thread(target=_record, args=(order, "other key", room.visit(key_id=2), token))
    thread.start()
    thread.join(5)
    assert order == ["other key"]


def _attempt(order: list[str], name: str, visit, hold: float) -> None:
    with visit.turn():
        order.append(f"{name} in")
        time.sleep(hold)
        order.append(f"{name} out")


def test_attempts_of_one_key_take_turns_in_a_process():
    # Concurrent attempts would read the same head of the order and fight
    # over the same identity rows; in turns, each reads the head after the
    # last has said which identity it claims on.
    room = WaitingRoom()
    order: list[str] = []
    threads = [
        threading.Thread(target=_attempt, args=(order, name, room.visit(key_id=1), 0.05)) for name in ("a", "b", "c")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(order) == 6
    assert all(order[i].endswith(" in") and order[i + 1] == order[i].replace(" in", " out") for i in range(0, 6, 2))


def _hold(order: list[str], visit, release: threading.Event) -> None:
    with visit.turn():
        order.append("holder in")
        release.wait(5)
        order.append("holder out")


def test_another_keys_attempt_does_not_wait_for_the_turn():
    room = WaitingRoom()
    order: list[str] = []
    release = threading.Event()
    holder = threading.Thread(target=_hold, args=(order, room.visit(key_id=1), release))
    holder.start()
    until(lambda: order)
    _attempt(order, "key 2", room.visit(key_id=2), 0.0)
    release.set()
    holder.join(5)
    assert order == ["holder in", "key 2 in", "key 2 out", "holder out"]


def test_a_waiter_asking_for_a_turn_goes_before_a_new_attempt():
    room = WaitingRoom()
    order: list[str] = []
    token = wakeups.current()
    wakeups.released_locally()
    release = threading.Event()
    holder = threading.Thread(target=_hold, args=(order, room.visit(key_id=1), release))
    holder.start()
    until(lambda: order)
    waited = threading.Thread(target=_record, args=(order, "waiter", room.visit(key_id=1), token))
    waited.start()
    until(lambda: room._queues.get(1))  # the waiter has asked for its turn
    new = threading.Thread(target=_attempt, args=(order, "new", room.visit(key_id=1), 0.0))
    new.start()
    release.set()
    for thread in (holder, waited, new):
        thread.join(5)
    assert order == ["holder in", "holder out", "waiter", "new in", "new out"]


def test_an_attempt_claims_on_an_identity_no_other_attempt_of_the_key_is_claiming_on():
    room = WaitingRoom()
    with room.visit(key_id=1).claims() as first:
        assert first.take(7)
        assert first.take(7)  # it holds it already
        with room.visit(key_id=1).claims() as second:
            assert not second.take(7)  # skips it: the first attempt is claiming there
            assert second.take(8)
            assert second.skipped == {7}
        with room.visit(key_id=2).claims() as other_key:
            assert other_key.take(7)  # another key's claims are its own
        assert first.take(9)  # holds one at a time: 7 is given back
        with room.visit(key_id=1).claims() as third:
            assert third.take(7)
            assert not third.take(9)
    with room.visit(key_id=1).claims() as later:
        assert later.take(9)  # given back when the first attempt ended
    assert room._claiming == {}


def test_an_attempt_that_skipped_an_identity_waits_until_that_claim_is_through():
    room = WaitingRoom()
    order: list[str] = []
    release = threading.Event()

    def claim() -> None:
        with room.visit(key_id=1).claims() as claims:
            claims.take(7)
            order.append("claiming")
            release.wait(5)
            order.append("through")

    holder = threading.Thread(target=claim)
    holder.start()
    until(lambda: order)
    waiter = threading.Thread(target=lambda: (room.visit(key_id=1).claims_wait({7}), order.append("read again")))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # still waiting: the claim is not through
    room.visit(key_id=1).claims_wait({8})  # returns at once: nobody claims there
    release.set()
    holder.join(5)
    waiter.join(5)
    assert order == ["claiming", "through", "read again"]


def test_a_waiter_woken_while_an_older_one_is_still_in_its_attempt_lets_it_go_first():
    """The older waiter read the pool, found no slot, and is still in the
    rest of its attempt when a release comes; the younger one, asleep, is
    woken by it. The older one will look again at once: it goes first."""
    room = WaitingRoom()
    older, younger = room.visit(key_id=1), room.visit(key_id=1)
    token = wakeups.current()
    older.wait(token, 0.0)  # both admitted, the older first
    younger.wait(token, 0.0)
    with older.turn(token):
        pass  # the older one's read: no slot
    order: list[str] = []
    wakeups.released_locally()  # a slot frees while the older one finishes its attempt
    woken = threading.Thread(target=_record, args=(order, "younger", younger, token))
    woken.start()
    _asking_or_through(room, younger, order)()  # the younger one is awake and asking for its turn
    assert order == []
    _record(order, "older", older, token)  # the older one's attempt ends in a wait: due at once
    woken.join(5)
    assert order == ["older", "younger"]
