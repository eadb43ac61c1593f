"""The waiting phases of `make bench`: how soon a waiting dispatch gets a
released slot, and whether many waiters starve the server (issue 11 §3)."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

from bench.load.clients import DISPATCH, Client
from bench.load.stats import inversion_fraction, kendall_tau, latency_summary


class BenchError(RuntimeError):
    pass


def _complete(client: Client, lease_id: str) -> int:
    return client.post(f"/api/v1/leases/{lease_id}/complete", {"outcome": "success"})[0]


def _hold(client: Client) -> str:
    """Take the only slot of the key's identity; the lease id."""
    status, held, _ = client.post(DISPATCH, {"max_wait_ms": 0})
    if status != 200:
        raise BenchError(f"the holder could not dispatch: {status} {held}")
    return held["lease_id"]


def wake_measure(port: int, key: str, rounds: int) -> dict:
    """A holder takes the only slot; a waiter dispatches and blocks; the
    holder releases. Wake latency = waiter's answer − holder's release answer."""
    holder = Client(port, key)
    samples = []
    for _ in range(rounds):
        lease_id = _hold(holder)
        answered: dict = {}

        def wait_for_slot(answered=answered):
            status, body, _ = Client(port, key).post(DISPATCH, {"max_wait_ms": 10_000})
            answered["at"] = time.monotonic()
            answered["status"], answered["body"] = status, body

        waiter = threading.Thread(target=wait_for_slot)
        waiter.start()
        time.sleep(0.2)  # let the waiter find the slot taken and start waiting
        _complete(holder, lease_id)
        released_at = time.monotonic()
        waiter.join()
        if answered["status"] != 200:
            raise BenchError(f"wake: the waiter failed: {answered['status']} {answered['body']}")
        samples.append(max(0.0, answered["at"] - released_at) * 1000)
        _complete(holder, answered["body"]["lease_id"])
    return {"p50": round(statistics.median(samples), 2), "max": round(max(samples), 2), "rounds": rounds}


@dataclass
class Waiter:
    rank: int  # arrival order
    sent: float
    status: int | None = None  # 0: no answer (connection error or client timeout)
    answered: float | None = None
    retry_after: str | None = None


def bounded_waiting(port: int, key: str, *, waiters: int, max_wait_ms: int, gap: float, settle: float) -> dict:
    """One identity with one slot, held. ``waiters`` dispatches with a long
    ``max_wait_ms`` are sent ``gap`` seconds apart (their arrival order);
    after ``settle`` seconds a ``/healthz`` and the holder's completion are
    sent together and timed. Every waiter that gets a lease completes it at
    once, freeing the slot for the next; the 200s' order is compared with the
    arrival order."""
    # Past every waiter's own deadline: a server that has not answered by then
    # is starved, and waiting longer would only lengthen the run.
    answer_timeout = max_wait_ms / 1000 + 30
    holder_lease = _hold(Client(port, key))
    crowd = []

    def wait(waiter: Waiter) -> None:
        client = Client(port, key, timeout=answer_timeout)
        try:
            status, body, headers = client.post(DISPATCH, {"max_wait_ms": max_wait_ms})
            waiter.status, waiter.answered = status, time.monotonic()
            waiter.retry_after = headers.get("Retry-After")
            if status == 200:
                _complete(client, body["lease_id"])
        except OSError:
            if waiter.status is None:
                waiter.status, waiter.answered = 0, time.monotonic()
        finally:
            client.close()

    threads = []
    for rank in range(waiters):
        waiter = Waiter(rank=rank, sent=time.monotonic())
        crowd.append(waiter)
        threads.append(threading.Thread(target=wait, args=(waiter,), daemon=True))
        threads[-1].start()
        time.sleep(gap)
    time.sleep(settle)

    probes: dict[str, float | int] = {}

    def timed(name: str, call) -> None:
        started = time.monotonic()
        try:
            status = call(Client(port, key, timeout=answer_timeout))
        except OSError:
            status = 0
        probes[f"{name}_ms"] = round((time.monotonic() - started) * 1000, 1)
        probes[f"{name}_status"] = status

    released_at = time.monotonic()
    probe_threads = [
        threading.Thread(target=timed, args=("healthz", lambda c: c.request("GET", "/healthz")[0])),
        threading.Thread(target=timed, args=("completion", lambda c: _complete(c, holder_lease))),
    ]
    for thread in probe_threads:
        thread.start()
    deadline = time.monotonic() + answer_timeout + 10
    for thread in probe_threads + threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {
        "waiters": waiters,
        "max_wait_ms": max_wait_ms,
        **probes,
        **waiters_served(crowd, released_at),
    }


def waiters_served(crowd: list[Waiter], released_at: float) -> dict:
    """How the waiters were answered: counts by kind, the granted ones' order."""
    granted = sorted((w for w in crowd if w.status == 200), key=lambda w: w.answered)
    refused_at_once = [w for w in crowd if w.status == 429 and w.answered < released_at]
    refused_later = [w for w in crowd if w.status == 429 and w.answered >= released_at]
    other = [w for w in crowd if w.status not in (200, 429)]
    ranks = [w.rank for w in granted]
    fraction, tau = inversion_fraction(ranks), kendall_tau(ranks)
    return {
        "granted": len(granted),
        "refused_at_once": len(refused_at_once),
        "refused_later": len(refused_later),
        "refused_with_retry_after": sum(1 for w in refused_at_once + refused_later if w.retry_after),
        "other": {str(w.status): sum(1 for o in other if o.status == w.status) for w in other},
        "inversion_fraction": None if fraction is None else round(fraction, 4),
        "kendall_tau": None if tau is None else round(tau, 4),
        "all_granted_after_ms": (round((granted[-1].answered - released_at) * 1000, 1) if granted else None),
        "granted_wait": latency_summary([w.answered - w.sent for w in granted]),
    }
