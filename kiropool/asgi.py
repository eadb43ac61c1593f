import os

from django.core.asgi import get_asgi_application

from kiropool.secrets_guard import secrets_require

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")

secrets_require()
application = get_asgi_application()

from kiropool.warmup import worker_start  # noqa: E402 - needs the apps loaded

worker_start()
