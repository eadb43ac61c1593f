"""A value computed at most once per interval in this process.

For the open endpoints whose answer costs a connection or an aggregate
(``/readyz`` opens a broker connection, ``/metrics`` reads the pool state): a
burst of requests, or a flood from anyone, costs one computation per interval
per process, not one per request. Per process on purpose: no shared cache to
depend on (a probe must not need Redis to say Redis is down), and with W
web workers the cost is still bounded by W per interval.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RecentValue(Generic[T]):
    """``compute()``'s result, reused for ``seconds`` after it was computed.

    Once a value exists, a caller that finds it being recomputed gets that
    value, at most one interval and a computation old, and does not wait:
    a computation may need what the caller holds. The lease floor's needs a
    pooled database connection, and a request asks for the floor holding
    one; waiting on the recomputation, a worker's few requests that held
    the connections waited for the one recomputing, which waited for a
    connection until the pool's timeout and answered 503 (``make bench``,
    bench/HISTORY.md, "The web server"). ``initial`` is a value to serve
    that way before the first computation has finished.

    Without ``initial``, callers that arrive while the first value is
    being computed wait for it instead of computing too, so a burst costs
    one computation even when the computation is slow (a broker that does
    not answer). An exception is not kept: the next caller computes again."""

    def __init__(
        self,
        compute: Callable[[], T],
        *,
        seconds: float,
        clock: Callable[[], float] = time.monotonic,
        initial: T | None = None,
    ):
        self._compute = compute
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        # Stamped long ago: served only while the first computation runs.
        self._initial: tuple[float, T] | None = None if initial is None else (-math.inf, initial)
        self._entry = self._initial

    def get(self) -> T:
        entry = self._entry
        if entry is not None and self._clock() - entry[0] < self._seconds:
            return entry[1]
        if not self._lock.acquire(blocking=entry is None):
            return entry[1]  # being recomputed: the previous value
        try:
            entry = self._entry  # computed by the caller we waited for?
            if entry is not None and self._clock() - entry[0] < self._seconds:
                return entry[1]
            value = self._compute()
            # Stamped when done: a slow computation still serves a full interval.
            self._entry = (self._clock(), value)
            return value
        finally:
            self._lock.release()

    def clear(self) -> None:
        with self._lock:
            self._entry = self._initial
