"""A value computed at most once per interval in this process.

For the open endpoints whose answer costs a connection or an aggregate
(``/readyz`` opens a broker connection, ``/metrics`` reads the pool state): a
burst of requests, or a flood from anyone, costs one computation per interval
per process, not one per request. Per process on purpose: no shared cache to
depend on (a probe must not need Redis to say Redis is down), and with W
web workers the cost is still bounded by W per interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RecentValue(Generic[T]):
    """``compute()``'s result, reused for ``seconds`` after it was computed.

    Callers that arrive while it is being recomputed wait for that result
    instead of computing too, so a burst costs one computation even when the
    computation is slow (a broker that does not answer). An exception is not
    kept: the next caller computes again."""

    def __init__(self, compute: Callable[[], T], *, seconds: float, clock: Callable[[], float] = time.monotonic):
        self._compute = compute
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entry: tuple[float, T] | None = None

    def get(self) -> T:
        entry = self._entry
        if entry is not None and self._clock() - entry[0] < self._seconds:
            return entry[1]
        with self._lock:
            entry = self._entry  # computed by the caller we waited for?
            if entry is not None and self._clock() - entry[0] < self._seconds:
                return entry[1]
            value = self._compute()
            # Stamped when done: a slow computation still serves a full interval.
            self._entry = (self._clock(), value)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entry = None
