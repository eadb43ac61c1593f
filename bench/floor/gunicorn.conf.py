"""gunicorn settings of the floor (issue 14): sync workers, one request at a
time per process and a new connection per request, as many processes as the
kiropool server it is compared with (WEB_CONCURRENCY). Everything else is
gunicorn's default. core.webserver.WebServer gives the bind."""

import os

workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "sync"
threads = 1  # above 1 gunicorn would switch to gthread
errorlog = "-"
