"""Waking waiting dispatches when a lease is released, in any process.

A dispatch that found only locally throttled candidates waits for a slot. It
must be woken promptly by a release anywhere, not by sleeping in coarse steps:

- PostgreSQL: a release notifies ``kiropool_release`` inside its
  transaction (delivered on commit). The process's listener
  (``core/listener.py``) hears it and bumps a generation counter that the
  waiting threads block on.
- SQLite (one host): releases in this process bump the counter directly, and
  waiters also re-check every ``POLL_SECONDS`` for releases by other processes.

A waiter takes a token *before* reading the pool and waits for the generation
to move past it, so a release that lands between the read and the wait is
never missed.
"""

from __future__ import annotations

import threading

from django.db import transaction

from core import listener
from routing.backend import backend

CHANNEL = "kiropool_release"
# Upper bound on one blocking wait when no cross-process notification exists
# (SQLite) or the listener is reconnecting: short enough to keep the wake-up
# latency low, long enough not to busy-loop the database.
POLL_SECONDS = 0.05


class _Generation:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._value = 0

    def token(self) -> int:
        with self._cond:
            return self._value

    def bump(self) -> None:
        with self._cond:
            self._value += 1
            self._cond.notify_all()

    def wait_past(self, token: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._value != token, timeout=max(0.0, timeout))


_generation = _Generation()


def heard(payloads: list[str] | None) -> None:
    """The listener's handler of :data:`CHANNEL` (registered by
    ``routing/apps.py``): a release anywhere, or a (re)connection after
    which one may have been missed; either way waiters look again."""
    _generation.bump()


def token() -> int:
    """Take before reading the pool; pass to :func:`wait`."""
    if backend.postgres:
        listener.ensure()
    return _generation.token()


def current() -> int:
    """The generation now, without starting the listener."""
    return _generation.token()


def wait(token_: int, timeout: float) -> bool:
    """Block until a release after ``token_`` or ``timeout`` seconds pass.
    Returns whether a release was seen (a poll tick counts as a maybe)."""
    if timeout <= 0:
        return _generation.token() != token_
    if backend.postgres and listener.ready():
        return _generation.wait_past(token_, timeout)
    return _generation.wait_past(token_, min(timeout, POLL_SECONDS)) or True


def release_notify() -> None:
    """Wake waiting dispatches in every process once this transaction
    commits: something may have freed a slot (a release, a hold given up,
    an operator's edit of the pool)."""
    listener.notify(CHANNEL)
    transaction.on_commit(released_locally)


def listening(timeout: float = 0.0) -> bool:
    """Whether this process's listener is connected, waiting up to
    ``timeout`` seconds for it (PostgreSQL; starts it if need be)."""
    if not backend.postgres:
        return False
    listener.ensure()
    return listener.ready(timeout)


def released_locally() -> None:
    """Called on commit of a release in this process."""
    _generation.bump()
