"""The web server: ``python -m kiropool.serve`` (``make run``, ``make demo``,
the benchmark and the tests that need a real server all start it this way,
through ``core.webserver.WebServer``).

granian serves the WSGI app: its HTTP/1 server is Rust, so the interpreter
runs only Django's and kiropool's code. Under the benchmark's closed loop of
mixed gateway traffic it served 9.6 % more requests a second than gunicorn
with threaded workers on average (-1 to +19 % over five alternated pairs,
the same app on the same database), at 13 % less server CPU a request; the
framework floor's own app gained 30-40 % from it (bench/HISTORY.md, "The web
server"). Each worker runs the app on ``KIROPOOL_THREADS`` threads: a
dispatch that waits for a free slot holds a thread, not the worker, so the
completions that would free it are still served (``routing/waiting.py``);
requests past the threads queue in the worker's Rust side.

Configured from the environment, like the rest of kiropool:

- ``KIROPOOL_BIND`` (``host:port``, default ``127.0.0.1:8000``);
- ``WEB_CONCURRENCY``: worker processes (default 2);
- ``KIROPOOL_THREADS``: app threads per worker (default 32);
- ``KIROPOOL_ACCESS_LOG``: a file for one line per request (default none);
- ``PROMETHEUS_MULTIPROC_DIR``: where the workers keep their counters
  (default ``var/prometheus``), emptied at every start.

The app is loaded once, here, before the workers are forked (``import
kiropool.wsgi``: Django set up, the URLconf imported, the dispatcher's
statements compiled, all of it frozen out of the collector's reach by
``kiropool/warmup.py``); the workers share those memory pages rather than
each building its own. Loading opens no connection and starts no thread,
which a fork would not carry over (``tests/test_warmup.py``). A code change
needs a restart.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_BIND = "127.0.0.1:8000"
# A stop lets requests in flight finish for this long, then kills the workers.
GRACEFUL_STOP_SECONDS = 30
# One line per request, in the common log format's shape
# (``core.webserver.ACCESS_LINE`` reads the status from it).
ACCESS_FORMAT = '%(addr)s - - [%(time)s] "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).3f'
# Names of the variables that may hold a secret or a credential: Django's own
# pattern for settings it hides from error reports, plus service URLs
# (DATABASE_URL, REDIS_URL: a password rides in them).
SECRET_NAMES = re.compile(r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE|CREDENTIAL|_URL$|_DSN$", re.IGNORECASE)


def bind_parse(bind: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8000`` for IPv6) → address and port.

    A port is 1 to 65535: granian stopped on a larger one with an
    OverflowError's traceback, after the app was loaded, and took 0 for a
    port of the system's choosing, which nothing that reads
    ``KIROPOOL_BIND`` could find."""
    host, sep, port = bind.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise SystemExit(f"KIROPOOL_BIND must be host:port, not {bind!r}")
    if not 1 <= int(port) <= 65535:
        raise SystemExit(f"KIROPOOL_BIND must be host:port with a port of 1 to 65535, not {bind!r}")
    return host.strip("[]"), int(port)


def count_read(name: str, default: int) -> int:
    """A count from the environment (workers, threads): at least 1."""
    value = os.environ.get(name) or str(default)
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{name} must be a whole number of at least 1, not {value!r}")
    return int(value)


def prometheus_dir_prepare() -> str:
    """The workers' shared metrics folder, empty: counts of a previous run
    must not linger. Set before the app imports prometheus_client."""
    path = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(BASE_DIR / "var" / "prometheus"))
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
    return path


def environment_scrub(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Remove the secrets from the server's environment, once the app has read
    its settings from it; returns the names removed.

    granian copies the process environment into every request's WSGI
    environ, which Django shows as ``request.META``: an error report, a
    log line of META or a view that echoes it would carry ``SECRET_KEY``,
    the Fernet keys and the database's password. The workers read no
    setting after the app is loaded, so they lose nothing."""
    names = [name for name in environ if SECRET_NAMES.search(name)]
    for name in names:
        del environ[name]
    return names


def access_logging(path: str) -> dict:
    """granian's logging configuration with its access lines written to ``path``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "generic": {"format": "[%(levelname)s] %(message)s"},
            "access": {"format": "%(message)s"},
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.FileHandler", "formatter": "access", "filename": path},
        },
        "loggers": {
            "_granian": {"handlers": ["console"], "level": "INFO", "propagate": False},
            "granian.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")
    from kiropool.secrets_guard import secrets_require_or_exit

    # Refuse with one clear message before anything listens or loads. This
    # reads the settings, and with them .env: the variables below see it too.
    secrets_require_or_exit()
    from django.conf import settings

    address, port = bind_parse(os.environ.get("KIROPOOL_BIND") or DEFAULT_BIND)
    # The threads' default is the settings' own: the waiters' cap is sized
    # from it (kiropool/dispatcher_settings.py), so the two cannot drift.
    workers, threads = count_read("WEB_CONCURRENCY", 2), count_read("KIROPOOL_THREADS", settings.KIROPOOL_THREADS)
    prometheus_dir_prepare()

    import kiropool.wsgi  # noqa: F401 - the app, loaded once before the fork (see above)

    environment_scrub()
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces

    access_log = os.environ.get("KIROPOOL_ACCESS_LOG") or None
    Granian(
        "kiropool.wsgi:application",
        address=address,
        port=port,
        interface=Interfaces.WSGI,
        http=HTTPModes.http1,
        workers=workers,
        blocking_threads=threads,
        workers_kill_timeout=GRACEFUL_STOP_SECONDS,
        log_access=access_log is not None,
        log_access_format=ACCESS_FORMAT,
        log_dictconfig=access_logging(access_log) if access_log else None,
        working_dir=BASE_DIR,
    ).serve()


if __name__ == "__main__":
    main()
