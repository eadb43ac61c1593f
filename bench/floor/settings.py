"""Settings of the floor: just what DRF and the ``Account`` table need.

Only ``CommonMiddleware``, persistent database connections, no sessions, no
authentication, no CSRF (nothing to protect: the server lives for one
benchmark run on 127.0.0.1). The database is kiropool's (``DATABASE_URL``), so
the floor's one query reads the same table on the same server."""

import environ

env = environ.Env()

DEBUG = False
# Signs nothing here (no sessions, no messages, no CSRF); Django only wants one.
SECRET_KEY = env.str("SECRET_KEY", default="bench-floor-signs-nothing")
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["rest_framework", "accounts"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "bench.floor.urls"
WSGI_APPLICATION = "bench.floor.wsgi.application"

DATABASES = {"default": env.db("DATABASE_URL")}
DATABASES["default"]["CONN_MAX_AGE"] = None  # persistent: one connection per worker for its whole life
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": None,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
