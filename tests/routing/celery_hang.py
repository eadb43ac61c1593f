"""The project's Celery app plus one task that hangs: the app a real worker
loads in test_tasks.py's time-limit test (``celery -A tests.routing.celery_hang``).
Never imported by the project."""

import time

from celery.exceptions import SoftTimeLimitExceeded

from kiropool.celery import app

__all__ = ["app"]


@app.task(name="tests.hang", soft_time_limit=1, time_limit=3)
def hang(marker: str, ignore_soft_limit: bool) -> None:
    """Sleeps far past its limits; with ``ignore_soft_limit`` it swallows the
    soft limit and goes on hanging, as a task stuck in C code would."""
    with open(marker, "a") as log:
        log.write("started\n")
    try:
        time.sleep(60)
    except SoftTimeLimitExceeded:
        with open(marker, "a") as log:
            log.write("soft limit\n")
        if not ignore_soft_limit:
            raise
        time.sleep(60)
