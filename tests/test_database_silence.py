"""A database host gone silent under open connections (packets dropped, no
refusal, no reset): a connection with kiropool's options gives it up after
the silence timeout (core/postgresql/silence.py), where one without is still
waiting. A server's answers meanwhile, and its return to service, are the
silent-host drill's (tests/drills)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from django.db import connection

from core.postgresql.silence import silence_options
from tests.silent_link import silent_link

SILENCE = 2  # seconds (the settings' default is 10)
# A busy machine's allowance beyond it: the kernel's probe timer and this
# process's threads waking. The kernel's own retransmissions would take 15
# minutes.
SLACK = 3


@pytest.fixture
def link(postgres_only, db):
    settings = connection.settings_dict
    host = settings["HOST"] or "127.0.0.1"
    if host.startswith("/"):
        pytest.skip("the test database is on a Unix socket")
    with silent_link((host, int(settings["PORT"] or 5432))) as link:
        yield link


@pytest.fixture
def backends(db):
    """Backend pids to end after the test: a query cut off by the silence
    runs on in PostgreSQL, and the test database cannot be dropped while it
    does."""
    pids: list[int] = []
    yield pids
    with connection.cursor() as cursor:
        for pid in pids:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def connect(link, backends, **options) -> psycopg.Connection:
    settings = connection.settings_dict
    conn = psycopg.connect(
        host=link.host,
        port=link.port,
        user=settings["USER"],
        password=settings["PASSWORD"] or None,
        dbname=settings["NAME"],
        connect_timeout=5,
        autocommit=True,
        **options,
    )
    backends.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    return conn


def seconds_to_fail(conn: psycopg.Connection, query: str) -> float:
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        conn.execute(query)
    return time.monotonic() - started


def test_a_query_sent_to_a_host_gone_silent_fails_after_the_silence_timeout(link, backends):
    conn = connect(link, backends, **silence_options(SILENCE))
    link.silence()
    elapsed = seconds_to_fail(conn, "SELECT 1")
    assert SILENCE - 0.5 <= elapsed < SILENCE + SLACK, elapsed


def test_a_query_waiting_for_its_answer_when_the_host_goes_silent_fails_too(link, backends):
    """Sent and acknowledged before the silence: nothing of it is left to
    retransmit, so only the keepalive probes find the host gone."""
    conn = connect(link, backends, **silence_options(SILENCE))
    threading.Timer(0.5, link.silence).start()
    elapsed = seconds_to_fail(conn, "SELECT pg_sleep(30)")
    assert 0.5 + SILENCE - 0.5 <= elapsed < 0.5 + SILENCE + SLACK, elapsed


def test_without_them_a_query_to_a_silent_host_waits_on_and_ends_when_it_answers(link, backends):
    """The control: the system's options wait past the bound above, and the
    same query gets its answer once the host is back."""
    conn = connect(link, backends)
    link.silence()
    answer: list[object] = []
    query = threading.Thread(target=lambda: answer.append(conn.execute("SELECT 1").fetchone()[0]), daemon=True)
    query.start()
    query.join(SILENCE + SLACK)
    assert query.is_alive() and not answer
    link.restore()
    # The kernel's next retransmission, due within about 6 s of doubling delays.
    query.join(30)
    assert answer == [1]
