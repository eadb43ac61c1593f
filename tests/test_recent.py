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


# How long the stand-in pool lets a computation wait for its one connection;
# with the caller waiting for the recomputation, the two waited this long.
POOL_TIMEOUT_SECONDS = 2.0


def test_a_caller_holding_what_the_recomputation_needs_gets_the_previous_value():
    """The lease floor's shape: its computation needs a pooled connection,
    and a request may ask for it holding one. Waiting for the recomputation,
    the two waited for each other until the pool gave up."""
    pool = threading.Semaphore(1)  # one pooled connection
    clock = Clock()
    computing = threading.Event()

    def compute():
        computing.set()
        if not pool.acquire(timeout=POOL_TIMEOUT_SECONDS):
            raise TimeoutError("couldn't get a connection")
        pool.release()
        return clock.now

    recent = RecentValue(compute, seconds=10, clock=clock)
    assert recent.get() == 1000.0
    clock.now += 11
    pool.acquire()  # this request ran a query: it holds the connection
    recomputed = []
    other = threading.Thread(target=lambda: recomputed.append(recent.get()))
    other.start()
    assert computing.wait(5)  # the other request recomputes, waiting for the connection

    assert recent.get() == 1000.0  # the previous value, without waiting
    pool.release()  # this request ends: its connection goes back
    other.join(POOL_TIMEOUT_SECONDS + 5)
    assert recomputed == [1011.0]
    assert recent.get() == 1011.0


def test_an_initial_value_is_served_while_the_first_computation_runs():
    gate = threading.Semaphore(0)
    started = threading.Semaphore(0)
    reads = []

    def compute():
        started.release()
        assert gate.acquire(timeout=5)
        reads.append(1)
        return f"read {len(reads)}"

    recent = RecentValue(compute, seconds=60, initial="floor")
    for expected in ("read 1", "read 2"):  # the first value, then the first after a clear()
        first = threading.Thread(target=recent.get)
        first.start()
        assert started.acquire(timeout=5)
        assert recent.get() == "floor"  # does not wait for the read
        gate.release()
        first.join(5)
        assert recent.get() == expected
        recent.clear()
