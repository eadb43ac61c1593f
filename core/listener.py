"""PostgreSQL notifications, heard in every process.

One listener thread per process holds a dedicated connection in ``LISTEN``
on every channel an app registered (:func:`handle`, from its
``AppConfig.ready``), and hands each batch of notifications to the
channel's handler:

- ``kiropool_release`` (``routing/wakeups.py``): a release may have freed a
  slot, so waiting dispatches look again;
- ``kiropool_keys`` (``accounts/authentication.py``): a key was saved or
  deleted, so every process's key cache forgets it.

A handler runs on the listener thread: it must be quick and must not touch
the database. After every connection, the first included, each handler is
called once with ``None``: a notification sent while nothing listened is
lost, so the handler must assume it missed some. It is called with ``None``
too as soon as the connection is found lost: until the listener is back,
what it would hear goes unheard (the key cache then keeps nothing it holds).

SQLite has no notifications: :func:`notify` sends nothing there, and
callers check the vendor before they start the listener.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.db import connection, connections

logger = logging.getLogger(__name__)

# Called with the payloads of a batch of notifications on its channel, or with
# None after a (re)connection: some may have been missed.
Handler = Callable[[list[str] | None], None]

# How the listener's connection shows in pg_stat_activity.
APPLICATION_NAME = "kiropool-listener"
# The listener re-checks its stop flag and its connection this often.
LISTEN_TIMEOUT_SECONDS = 1.0
RECONNECT_DELAY_SECONDS = 1.0

_handlers: dict[str, Handler] = {}
_lock = threading.Lock()
_thread: threading.Thread | None = None
_ready = threading.Event()
_stop = threading.Event()


def handle(channel: str, handler: Handler) -> None:
    """Hand ``channel``'s notifications to ``handler``. Register before the
    listener starts (the channels are listened to when it connects)."""
    if not channel.isidentifier():
        raise ValueError(f"a channel is a plain identifier, not {channel!r}")
    _handlers[channel] = handler


def unhandle(channel: str) -> None:
    """Stop handing ``channel``'s notifications to anyone (the listener stops
    listening to it when it next connects)."""
    _handlers.pop(channel, None)


def notify(channel: str, payload: str = "") -> None:
    """Send ``payload`` on ``channel``, delivered to every listener once this
    transaction commits (at once outside one). Nothing on SQLite."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])


def ensure() -> None:
    """Start this process's listener unless it runs (PostgreSQL only: the
    caller checks)."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    with _lock:
        if _thread is not None and _thread.is_alive():
            return
        params = _connection_params()
        _stop.clear()
        _thread = threading.Thread(target=_listen_forever, args=(params,), name="kiropool-listener", daemon=True)
        _thread.start()


def ready(timeout: float = 0.0) -> bool:
    """Whether the listener is connected, waiting up to ``timeout`` seconds."""
    return _ready.wait(timeout)


def stop(timeout: float = 5.0) -> None:
    """Stop this process's listener and close its connection (tests, shutdown)."""
    global _thread
    with _lock:
        thread, _thread = _thread, None
        _stop.set()
    if thread is not None:
        thread.join(timeout)
    _ready.clear()


def _connection_params() -> dict:
    """The web workers' connection parameters, as the database ping takes
    them (core/database.py): every option of the settings and of
    DATABASE_URL (TLS, the configured connect timeout, the silence options
    that find a host gone silent within KIROPOOL_DB_SILENCE_TIMEOUT instead
    of the kernel's 15 minutes), with the listener's own name and
    autocommit over them. A list of names to keep dropped every option it
    did not name, and a fixed connect timeout replaced the configured one."""
    params = connections["default"].get_connection_params()
    return {**params, "autocommit": True, "application_name": APPLICATION_NAME}


def _listen_forever(params: dict) -> None:
    import psycopg

    while not _stop.is_set():
        try:
            with psycopg.connect(**params) as conn:
                for channel in _handlers:
                    conn.execute(f"LISTEN {channel}")
                _deliver(None)  # whatever was sent while we were (re)connecting
                _ready.set()
                while not _stop.is_set():
                    # The first notification, and any that came in the same packet.
                    heard = list(conn.notifies(timeout=LISTEN_TIMEOUT_SECONDS, stop_after=1))
                    if heard:
                        _deliver(heard)
                    else:
                        conn.execute("SELECT 1")  # notices a dead connection
        except Exception:  # noqa: BLE001 - the listener must outlive any outage
            _ready.clear()
            if _stop.is_set():
                return
            _deliver(None)  # deaf from here until it connects again
            logger.warning("notification listener lost its connection; reconnecting", exc_info=True)
            _stop.wait(RECONNECT_DELAY_SECONDS)


def _deliver(heard: list | None) -> None:
    # A copy: a channel registered or dropped meanwhile must not end the loop.
    for channel, handler in list(_handlers.items()):
        payloads = None if heard is None else [notice.payload for notice in heard if notice.channel == channel]
        if heard is not None and not payloads:
            continue  # nothing on this channel in the batch
        try:
            handler(payloads)
        except Exception:  # noqa: BLE001 - one handler's failure must not stop the others or the listener
            logger.exception("handler of notification channel %s failed", channel)
