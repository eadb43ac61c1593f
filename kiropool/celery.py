"""The Celery application. Configuration comes from Django settings under the
``CELERY_`` namespace; tasks are discovered in each app's ``tasks`` module."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")

app = Celery("kiropool")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# At worker and beat start, not at import: the web app and the tests import
# this module too (to send tasks), and they have their own guard or none.
@signals.celeryd_init.connect
@signals.beat_init.connect
def _secrets_require(**kwargs) -> None:
    from kiropool.secrets_guard import secrets_require_or_exit

    # SystemExit, which Celery's signal dispatch does not swallow.
    secrets_require_or_exit()
