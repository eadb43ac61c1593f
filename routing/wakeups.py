"""Waking waiting dispatches when a lease is released, in any process.

A dispatch that found only locally throttled candidates waits for a slot. It
must be woken promptly by a release anywhere, not by sleeping in coarse steps:

- PostgreSQL: a release sends ``NOTIFY kiropool_release`` inside its
  transaction (delivered on commit). One listener thread per process holds a
  dedicated connection in ``LISTEN`` and bumps a generation counter that the
  waiting threads block on.
- SQLite (one host): releases in this process bump the counter directly, and
  waiters also re-check every ``POLL_SECONDS`` for releases by other processes.

A waiter takes a token *before* reading the pool and waits for the generation
to move past it, so a release that lands between the read and the wait is
never missed.
"""

from __future__ import annotations

import logging
import threading
import time

from django.db import connection, connections, transaction

from routing.backend import backend

logger = logging.getLogger(__name__)

CHANNEL = "kiropool_release"
# Upper bound on one blocking wait when no cross-process notification exists
# (SQLite) or the listener is reconnecting: short enough to keep the wake-up
# latency low, long enough not to busy-loop the database.
POLL_SECONDS = 0.05
# The listener re-checks its stop flag and connection this often.
LISTEN_TIMEOUT_SECONDS = 1.0
RECONNECT_DELAY_SECONDS = 1.0


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
_listener_lock = threading.Lock()
_listener: threading.Thread | None = None
_listener_ready = threading.Event()
_listener_stop = threading.Event()


def token() -> int:
    """Take before reading the pool; pass to :func:`wait`."""
    if backend.postgres:
        _ensure_listener()
    return _generation.token()


def current() -> int:
    """The generation now, without starting the listener."""
    return _generation.token()


def wait(token_: int, timeout: float) -> bool:
    """Block until a release after ``token_`` or ``timeout`` seconds pass.
    Returns whether a release was seen (a poll tick counts as a maybe)."""
    if timeout <= 0:
        return _generation.token() != token_
    if backend.postgres and _listener_ready.is_set():
        return _generation.wait_past(token_, timeout)
    return _generation.wait_past(token_, min(timeout, POLL_SECONDS)) or True


def release_notify() -> None:
    """Wake waiting dispatches in every process once this transaction
    commits: something may have freed a slot (a release, a hold given up,
    an operator's edit of the pool)."""
    if backend.postgres:
        with connection.cursor() as cursor:
            cursor.execute(f"NOTIFY {CHANNEL}")
    transaction.on_commit(released_locally)


def listening(timeout: float = 0.0) -> bool:
    """Whether this process's listener is connected, waiting up to
    ``timeout`` seconds for it (PostgreSQL; starts it if need be)."""
    if not backend.postgres:
        return False
    _ensure_listener()
    return _listener_ready.wait(timeout)


def released_locally() -> None:
    """Called on commit of a release in this process."""
    _generation.bump()


def _ensure_listener() -> None:
    global _listener
    if _listener is not None and _listener.is_alive():
        return
    with _listener_lock:
        if _listener is not None and _listener.is_alive():
            return
        params = _listen_params()
        _listener_stop.clear()
        _listener = threading.Thread(
            target=_listen_forever, args=(params,), name="kiropool-release-listener", daemon=True
        )
        _listener.start()


def _listen_params() -> dict:
    params = connections["default"].get_connection_params()
    keep = {"dbname", "user", "password", "host", "port", "sslmode", "options", "sslrootcert", "sslcert", "sslkey"}
    return {k: v for k, v in params.items() if k in keep and v not in (None, "")}


def listener_stop(timeout: float = 5.0) -> None:
    """Stop this process's listener and close its connection (tests, shutdown)."""
    global _listener
    with _listener_lock:
        thread, _listener = _listener, None
        _listener_stop.set()
    if thread is not None:
        thread.join(timeout)
    _listener_ready.clear()


def _listen_forever(params: dict) -> None:
    import psycopg

    while not _listener_stop.is_set():
        try:
            with psycopg.connect(autocommit=True, connect_timeout=5, **params) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                _listener_ready.set()
                # Anything released while we were (re)connecting: wake everyone once.
                _generation.bump()
                while not _listener_stop.is_set():
                    notified = False
                    for _ in conn.notifies(timeout=LISTEN_TIMEOUT_SECONDS):
                        notified = True
                        # Drain what already arrived, then wake waiters once.
                        break
                    if notified:
                        _generation.bump()
                    else:
                        conn.execute("SELECT 1")  # notices a dead connection
        except Exception:  # noqa: BLE001 - the listener must outlive any outage
            _listener_ready.clear()
            if _listener_stop.is_set():
                return
            logger.warning("release listener lost its connection; waiters poll until it is back", exc_info=True)
            time.sleep(RECONNECT_DELAY_SECONDS)
