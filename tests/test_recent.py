"""core/recent.py: a value computed at most once per interval per process."""

import threading
import time

import pytest

from core.recent import RecentValue


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_value_is_reused_within_the_interval_and_recomputed_after():
    clock, calls = Clock(), []
    recent = RecentValue(lambda: calls.append(clock.now) or len(calls), seconds=5, clock=clock)
    assert [recent.get() for _ in range(10)] == [1] * 10
    clock.now += 4.9
    assert recent.get() == 1
    clock.now += 0.2
    assert recent.get() == 2
    recent.clear()
    assert recent.get() == 3
    assert len(calls) == 3


def test_a_failure_is_not_kept():
    attempts = []

    def compute():
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("down")
        return "ok"

    recent = RecentValue(compute, seconds=60)
    with pytest.raises(ConnectionError):
        recent.get()
    assert recent.get() == "ok" and recent.get() == "ok"
    assert len(attempts) == 2


def test_a_concurrent_burst_computes_once_even_when_the_computation_is_slow():
    calls = []

    def slow():
        calls.append(threading.get_ident())
        time.sleep(0.3)  # a broker that takes its time
        return "answer"

    recent = RecentValue(slow, seconds=60)
    start = threading.Barrier(16)
    answers = []

    def caller():
        start.wait()
        answers.append(recent.get())

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == ["answer"] * 16
    assert len(calls) == 1
