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

# Prometheus multiprocess mode (routing/metrics.py): every worker keeps its
# counters in files here and a scrape of any worker sums them all. Set before a
# worker imports prometheus_client; emptied when the master starts, so counts of
# a previous run do not linger.
_prometheus_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "var", "prometheus")
)


def on_starting(server):
    # The master refuses at once, with one clear message, rather than every
    # worker failing to boot in kiropool/wsgi.py with a traceback.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")
    from kiropool.secrets_guard import secrets_require_or_exit

    secrets_require_or_exit()
    os.makedirs(_prometheus_dir, exist_ok=True)
    for name in os.listdir(_prometheus_dir):
        if name.endswith(".db"):
            os.remove(os.path.join(_prometheus_dir, name))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _prometheus_dir)
