import os

from django.core.wsgi import get_wsgi_application

from kiropool.secrets_guard import secrets_require

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")

# Any WSGI server, kiropool/serve.py or not: no production web app on public secrets.
secrets_require()
application = get_wsgi_application()

from kiropool.warmup import worker_start  # noqa: E402 - needs the apps loaded

worker_start()
