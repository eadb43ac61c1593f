"""gunicorn settings, read from the working directory by `make run`,
`make bench` and the production command.

Threaded workers: a dispatch that waits for a free slot holds a thread, not
the whole worker, so the completions that would free it are still served.
With plain sync workers, 16 waiting clients on 4 workers deadlock until
their waits run out."""

import os

bind = os.environ.get("KIROPOOL_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Threads per worker: waiting dispatches may hold up to KIROPOOL_MAX_WAITERS
# of them (kiropool/dispatcher_settings.py), the rest serve everything else.
threads = int(os.environ.get("KIROPOOL_THREADS", "32"))
# A dispatch may wait up to 300 s (max_wait_ms); leave room above it.
timeout = 330
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("KIROPOOL_ACCESS_LOG") or None
errorlog = "-"
# The app is loaded once, in the master, and every worker is forked from it
# (kiropool/wsgi.py: Django set up, the URLconf imported, the dispatcher's
# statements compiled, all of it frozen out of the collector's reach by
# kiropool/warmup.py). The workers then share those memory pages rather than
# each building its own: in alternated closed-loop runs the workers spent
# 1.57 x the floor's CPU a request with it and 1.68 x without
# (bench/HISTORY.md). Loading opens no connection and starts no thread,
# which a fork would not carry over (a test checks). A code change needs a
# restart: on a HUP the master keeps the code it loaded.
preload_app = True

# Prometheus multiprocess mode (routing/metrics.py): every worker keeps its
# counters in files here and a scrape of any worker sums them all. Set before
# the app imports prometheus_client (in the master, which loads it); emptied
# when the master starts, so counts of a previous run do not linger.
_prometheus_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "var", "prometheus")
)


def _secrets_require() -> None:
    """The master refuses at once, with one clear message, as it reads this
    file: before it loads the app, which would refuse too (kiropool/wsgi.py),
    with a traceback."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")
    from kiropool.secrets_guard import secrets_require_or_exit

    secrets_require_or_exit()


_secrets_require()
# Before the app is loaded: prometheus_client writes its files there from then on.
os.makedirs(_prometheus_dir, exist_ok=True)


def on_starting(server):
    # Once per start, not on a HUP (which reads this file again while the
    # workers still count).
    for name in os.listdir(_prometheus_dir):
        if name.endswith(".db"):
            os.remove(os.path.join(_prometheus_dir, name))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _prometheus_dir)
