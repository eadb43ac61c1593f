"""The Celery application. Configuration comes from Django settings under the
``CELERY_`` namespace; tasks are discovered in each app's ``tasks`` module."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")

app = Celery("kiropool")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
