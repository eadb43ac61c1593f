"""A ``Server-Timing`` header (W3C Server Timing) on every response, when
``KIROPOOL_SERVER_TIMING`` is on: where the request's time went inside the
app, so a client that timed the request itself can split its latency.

Four metrics, in milliseconds, that add up to ``app``:

- ``app``: the wall time from this middleware's call to its return (it
  runs first, so it covers the other middleware and the view);
- ``db``: the wall time of the request's statements on the default
  database (Django's execute wrapper), their count as its ``desc``;
- ``cpu``: the thread's CPU time outside those statements
  (``time.thread_time``), Django's and kiropool's Python;
- ``wait``: the rest, neither in a statement nor on a CPU: waiting for the
  interpreter lock, for a CPU, for a pooled connection, or asleep (a
  dispatch that waited for a slot).

Off by default: the header tells every caller how long the server worked,
which is nobody's business outside a benchmark or a debugging session, and
the wrapper costs a few microseconds a statement. With it off the middleware
is not installed (``kiropool/settings.py``); with it on, ``check --deploy``
warns (``core/checks.py``). ``KIROPOOL_SERVER_TIMING=1 make
bench`` splits the open loop's slowest dispatches with it (README,
"Benchmark"; ``bench.load.stats.server_timing_parse`` reads it).
"""

from __future__ import annotations

import time

from django.db import connection


class _Statements:
    """An execute wrapper adding up its statements' wall and CPU time."""

    __slots__ = ("count", "wall", "cpu")

    def __init__(self) -> None:
        self.count, self.wall, self.cpu = 0, 0.0, 0.0

    def __call__(self, execute, sql, params, many, context):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return execute(sql, params, many, context)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.thread_time() - cpu
            self.count += 1


class ServerTimingMiddleware:
    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        statements = _Statements()
        wall, cpu = time.perf_counter(), time.thread_time()
        with connection.execute_wrapper(statements):
            response = self.get_response(request)
        app = time.perf_counter() - wall
        python = time.thread_time() - cpu - statements.cpu
        wait = max(0.0, app - statements.wall - python)
        response["Server-Timing"] = server_timing_header(
            app=app, db=statements.wall, statements=statements.count, cpu=python, wait=wait
        )
        return response


def server_timing_header(*, app: float, db: float, statements: int, cpu: float, wait: float) -> str:
    """The header's value; the times in seconds."""
    return (
        f'app;dur={app * 1000:.2f}, db;dur={db * 1000:.2f};desc="{statements} statements", '
        f"cpu;dur={cpu * 1000:.2f}, wait;dur={wait * 1000:.2f}"
    )
