"""The process's notification listener (core/listener.py) on PostgreSQL: a
notification sent by another connection reaches its channel's handler, each
handler gets only its own channel's payloads, a failing handler stops
neither the others nor the listener, and after a (re)connection every
handler hears that it may have missed some."""

from __future__ import annotations

import threading

import psycopg
import pytest
from django.db import connections

from core import listener
from core.postgresql.silence import silence_options
from tests.silent_link import silent_link
from tests.support import test_database_url, until

pytestmark = [pytest.mark.django_db(transaction=True)]

CHANNEL, OTHER = "kiropool_test_a", "kiropool_test_b"


class Heard:
    def __init__(self, *, fails: bool = False) -> None:
        self.calls: list[list[str] | None] = []
        self.fails = fails
        self._lock = threading.Lock()

    def __call__(self, payloads: list[str] | None) -> None:
        with self._lock:
            self.calls.append(payloads)
        if self.fails:
            raise RuntimeError("a handler that fails")

    def payloads(self) -> list[str]:
        with self._lock:
            return [p for call in self.calls if call is not None for p in call]


@pytest.fixture
def handlers(postgres_only):
    """Two test channels, listened to by a listener started after they were
    registered; afterwards the listener restarts without them."""
    heard = {CHANNEL: Heard(fails=True), OTHER: Heard()}
    listener.stop()
    for channel, handler in heard.items():
        listener.handle(channel, handler)
    listener.ensure()
    assert listener.ready(10), "the listener never connected"
    yield heard
    listener.stop()
    for channel in heard:
        listener.unhandle(channel)


def _send(channel: str, payload: str) -> None:
    """As another process would: its own connection, committed at once."""
    with psycopg.connect(test_database_url(), autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", [channel, payload])


def test_every_handler_hears_after_connecting_that_it_may_have_missed_notices(handlers):
    assert all(handler.calls and handler.calls[0] is None for handler in handlers.values())


def test_a_notice_from_another_connection_reaches_its_channels_handler_only(handlers):
    _send(OTHER, "one")
    until(lambda: handlers[OTHER].payloads() == ["one"], 10, what="the notice was never heard")
    assert handlers[CHANNEL].payloads() == []


def test_a_failing_handler_stops_neither_the_others_nor_the_listener(handlers):
    _send(CHANNEL, "first")  # its handler raises
    until(lambda: handlers[CHANNEL].payloads() == ["first"], 10, what="the notice was never heard")
    _send(OTHER, "after")
    until(lambda: handlers[OTHER].payloads() == ["after"], 10, what="the listener stopped after a failing handler")
    assert listener.ready()


def _terminate_listener() -> None:
    with psycopg.connect(test_database_url(), autocommit=True) as conn:
        ended = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            [listener.APPLICATION_NAME],
        ).fetchall()
    assert ended == [(True,)]


def test_after_losing_its_connection_the_listener_reconnects_and_says_notices_may_be_lost(handlers):
    _terminate_listener()
    # Told once the connection is found lost, then again once back (after
    # RECONNECT_DELAY_SECONDS); slack for a busy machine.
    until(lambda: handlers[OTHER].calls.count(None) == 3, 15, what="the listener never reconnected")
    until(listener.ready, 10, what="the listener never said it was back")
    _send(OTHER, "again")
    until(lambda: handlers[OTHER].payloads() == ["again"], 10, what="the listener reconnected deaf")


def test_on_losing_its_connection_every_handler_hears_at_once_that_notices_may_be_lost(handlers, monkeypatch):
    """Told before the listener is back (here not for a minute): the key
    cache forgets what it holds, since a change of a key made now would go
    unheard."""
    monkeypatch.setattr(listener, "RECONNECT_DELAY_SECONDS", 60.0)
    _terminate_listener()
    # Found lost within a listen timeout or two; slack for a busy machine.
    until(lambda: handlers[OTHER].calls.count(None) == 2, 15, what="the loss was never told")
    assert not listener.ready()


def test_the_listener_connects_with_the_web_workers_parameters(postgres_only, monkeypatch):
    """Every option of the settings and of DATABASE_URL reaches the
    listener's connection: the configured connect timeout (it was 5 s,
    fixed), the options for a silent host, and those a list of names to
    keep dropped (here target_session_attrs); its own name and autocommit
    over them. Read back from the connection the listener opened."""
    options = connections["default"].settings_dict["OPTIONS"]
    assert options.get("tcp_user_timeout")  # the settings set them (kiropool/settings.py)
    monkeypatch.setitem(options, "connect_timeout", 7)
    monkeypatch.setitem(options, "target_session_attrs", "read-write")
    monkeypatch.setitem(options, "application_name", "from-the-url")
    opened = []
    connect = psycopg.connect

    def recorded(*args, **kwargs):
        conn = connect(*args, **kwargs)
        if threading.current_thread().name == "kiropool-listener":  # not a connection of Django's
            opened.append((conn.info.get_parameters(), conn.autocommit))
        return conn

    monkeypatch.setattr(psycopg, "connect", recorded)
    listener.stop()
    try:
        listener.ensure()
        assert listener.ready(10), "the listener never connected"
    finally:
        listener.stop()
    [(parameters, autocommit)] = opened
    assert parameters["connect_timeout"] == "7"
    assert parameters["target_session_attrs"] == "read-write"
    for name in silence_options(1):
        assert parameters[name] == str(options[name]), name
    assert parameters["application_name"] == listener.APPLICATION_NAME
    assert autocommit


SILENCE = 2  # seconds (the settings' default is 10)


def test_a_listener_whose_database_host_goes_silent_says_so_within_the_silence_timeout(postgres_only, monkeypatch):
    """Its SELECT 1 after each quiet listen finds the host gone: without the
    options, not for the kernel's 15 minutes, deaf all that while (checked:
    still unaware after 30 s)."""
    settings = connections["default"].settings_dict
    heard = Heard()
    listener.stop()
    listener.handle(OTHER, heard)
    try:
        with silent_link((settings["HOST"] or "127.0.0.1", int(settings["PORT"] or 5432))) as link:
            params = {**listener._connection_params(), "host": link.host, "port": link.port}
            monkeypatch.setattr(listener, "_connection_params", lambda: {**params, **silence_options(SILENCE)})
            monkeypatch.setattr(listener, "RECONNECT_DELAY_SECONDS", 60.0)
            listener.ensure()
            assert listener.ready(10), "the listener never connected"
            link.silence()
            # A listen timeout, then the silence; 4 s of slack for a busy machine.
            until(
                lambda: heard.calls.count(None) == 2,
                listener.LISTEN_TIMEOUT_SECONDS + SILENCE + 4,
                what="the listener never found its host gone",
            )
            assert not listener.ready()
    finally:
        listener.stop()
        listener.unhandle(OTHER)


def test_a_channel_name_is_a_plain_identifier():
    with pytest.raises(ValueError):
        listener.handle("kiropool; DROP TABLE x", lambda payloads: None)
