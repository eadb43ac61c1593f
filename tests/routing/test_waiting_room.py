"""The waiting room's order among one key's waiters (routing/waiting.py), in
one process and without a database: threads woken by one release wake in no
set order, and the oldest must still look first."""

from __future__ import annotations

import threading
import time

from routing import wakeups
from routing.waiting import WaitingRoom


def _record(order: list[str], name: str, visit, token: int, late: float) -> None:
    visit.wait(token, 5.0)
    time.sleep(late)  # this thread is slow to get going after the wake-up
    with visit.turn():
        order.append(name)


def test_an_older_waiter_woken_late_still_goes_first():
    room = WaitingRoom()
    token = wakeups.current()
    wakeups.released_locally()  # the release both are waiting for has happened
    order: list[str] = []
    older, younger = room.visit(key_id=1), room.visit(key_id=1)
    first = threading.Thread(target=_record, args=(order, "older", older, token, 0.3))
    first.start()
    while older.seq is None:
        time.sleep(0.001)
    second = threading.Thread(target=_record, args=(order, "younger", younger, token, 0.0))
    second.start()
    first.join(5)
    second.join(5)
    assert order == ["older", "younger"]


def test_an_older_waiter_not_yet_due_does_not_hold_up_a_younger_one():
    room = WaitingRoom()
    sleeping, woken = room.visit(key_id=1), room.visit(key_id=1)
    stale = wakeups.current()
    wakeups.released_locally()
    sleeping.wait(wakeups.current(), 0)  # older, asleep until a release that has not come
    order: list[str] = []
    thread = threading.Thread(target=_record, args=(order, "woken", woken, stale, 0.0))
    thread.start()
    thread.join(5)
    assert order == ["woken"]


def test_another_keys_waiters_are_not_in_the_queue():
    room = WaitingRoom()
    token = wakeups.current()
    wakeups.released_locally()
    room.visit(key_id=1).wait(token, 0)  # due, and never takes its turn
    order: list[str] = []
    thread = threading.Thread(target=_record, args=(order, "other key", room.visit(key_id=2), token, 0.0))
    thread.start()
    thread.join(5)
    assert order == ["other key"]
