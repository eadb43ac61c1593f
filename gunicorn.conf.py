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
threads = int(os.environ.get("KIROPOOL_THREADS", "16"))
# A dispatch may wait up to 300 s (max_wait_ms); leave room above it.
timeout = 330
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("KIROPOOL_ACCESS_LOG") or None
errorlog = "-"
