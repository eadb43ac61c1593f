"""kiropool settings.

Everything comes from the environment through one ``environ.Env`` (an optional
``.env`` file beside ``manage.py`` is read first, then the development secrets
`make run` keeps in ``var/local-secrets.env``). With no environment at all
the project runs on a SQLite file under ``var/`` and needs no Redis: Celery then
uses kombu's filesystem transport and Django the local-memory cache.
"""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from core.postgresql.outage import WatchedConnection
from core.postgresql.silence import silence_options
from core.rates import rates_require
from kiropool.secrets_guard import DEVELOPMENT_SECRET_KEY

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def _verbatim(name: str, default: str) -> str:
    """A secret exactly as set. django-environ reads a value that starts with
    "$" as the name of another variable and, with none by that name, gives
    the default: a metrics token that happened to start with "$" left
    /metrics open, and a strong SECRET_KEY (Django's get_random_secret_key
    draws from an alphabet with "$") became the public development key."""
    return env.ENVIRON.get(name, default)


# The SECRET_KEY and Fernet key `make run` generated once for this checkout
# (core/local_secrets.py); the environment and .env win over them. A test
# run never reads them (pytest sets PYTEST_VERSION, and the processes it starts
# inherit it), so the suite sees the same settings on a fresh clone as after
# `make run`.
LOCAL_SECRETS_FILE = Path(env.str("KIROPOOL_LOCAL_SECRETS_FILE", default=str(VAR_DIR / "local-secrets.env")))
if LOCAL_SECRETS_FILE.is_file() and not os.environ.get("PYTEST_VERSION"):
    environ.Env.read_env(LOCAL_SECRETS_FILE, overwrite=False)

# --- core -------------------------------------------------------------------

DEBUG = env.bool("DEBUG", default=False)
# The default is public: with DEBUG off no server, worker or data command
# starts on it (kiropool/secrets_guard.py). `make run` generates a local one.
SECRET_KEY = _verbatim("SECRET_KEY", DEVELOPMENT_SECRET_KEY)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# HTTPS behind a TLS-terminating proxy (README, "Deploying"). All off by
# default, so `make run` works over plain http on a laptop.
if env.bool("KIROPOOL_SECURE_PROXY_SSL_HEADER", default=False):
    # Only behind a proxy that sets (overwrites) X-Forwarded-Proto on every request.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("KIROPOOL_SECURE_SSL_REDIRECT", default=False)
# Probes and scrapers reach an app host directly, over plain http.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("KIROPOOL_SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("KIROPOOL_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("KIROPOOL_SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env.bool("KIROPOOL_SECURE_COOKIES", default=False)
SILENCED_SYSTEM_CHECKS = env.list("SILENCED_SYSTEM_CHECKS", default=[])

INSTALLED_APPS = [
    # django.contrib.admin, titled kiropool and linked to the dashboards (kiropool/admin_site.py)
    "kiropool.apps.KiropoolAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    # import/export buttons on the pool's admin pages (accounts/resources.py)
    "import_export",
    "core",
    "accounts",
    "routing",
]

# Logins and messages run for people only: gateways and probes, which carry
# no cookie and render no page, skip them (core/middleware.py,
# KIROPOOL_MACHINE_PATHS). Sessions, CSRF and framing stay on every path:
# unused they cost next to nothing, and `check --deploy` inspects Django's
# own classes for its cookie and header checks.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "core.middleware.RequestGuardMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "core.middleware.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "core.middleware.AuthenticationMiddleware",
    "core.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# A Server-Timing header on every response, splitting its time in the app
# (statements, CPU, waits): off unless asked for, as it tells every caller
# how long the server worked (core/server_timing.py; make bench uses it).
KIROPOOL_SERVER_TIMING = env.bool("KIROPOOL_SERVER_TIMING", default=False)
if KIROPOOL_SERVER_TIMING:
    MIDDLEWARE.insert(0, "core.server_timing.ServerTimingMiddleware")
# Paths of machine clients: the gateway API and the probes.
KIROPOOL_MACHINE_PATHS = ("/api/v1/dispatch", "/api/v1/leases/", "/healthz", "/readyz", "/metrics")

ROOT_URLCONF = "kiropool.urls"
WSGI_APPLICATION = "kiropool.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database ---------------------------------------------------------------

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'kiropool.sqlite3'}"),
}
# PostgreSQL, or SQLite on one host: any other database's URL kept its host
# and port but was run as PostgreSQL's, so every process started and every
# request then failed on a connection the PostgreSQL driver could not make.
if DATABASES["default"]["ENGINE"] not in (
    "django.db.backends.sqlite3",
    "django.db.backends.postgresql",
    "django.contrib.gis.db.backends.postgis",
):
    raise ImproperlyConfigured(
        "kiropool refuses to start: DATABASE_URL: kiropool runs on PostgreSQL (postgres://...) or, on one "
        f"host, SQLite (sqlite:///...), not {DATABASES['default']['ENGINE']}"
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE transactions take SQLite's write lock at BEGIN, so two writers
    # queue on the busy timeout instead of failing a lock upgrade half-way;
    # WAL lets the dashboards read while the dispatcher writes.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    # A pool of connections per process (psycopg_pool, through Django's
    # "pool" option): a server thread holds a connection only while it runs
    # queries, so a worker's threads share KIROPOOL_DB_POOL_SIZE connections
    # and the processes together stay under PostgreSQL's max_connections
    # however many threads serve (or wait). A thread that finds every
    # connection busy waits up to KIROPOOL_DB_POOL_TIMEOUT seconds, then the
    # request answers 503. KIROPOOL_DB_POOL_SIZE=0 turns the pool off for
    # persistent per-thread connections (CONN_MAX_AGE).
    #
    # Few, and all opened with the first query: one thread of a worker runs
    # Python at a time, so a few connections cover its database waits, and
    # more only add backends that compete for the same cores and queue on
    # the same hot rows inside PostgreSQL instead of cheaply in the pool.
    # Each new backend also costs tens of milliseconds before its caches and
    # plans are warm: opened one by one under a burst, 10 per worker stalled
    # a freshly started server for seconds (README, "Decisions").
    #
    # While the database cannot be reached, the backend (core/postgresql)
    # answers 503 at once instead of queueing for a connection the pool cannot
    # open, and the pool tries again within seconds of its return: a slot
    # stops retrying after KIROPOOL_DB_RECONNECT_SECONDS, and the next request
    # starts a new attempt. psycopg_pool's own default, retrying for 5
    # minutes with a doubling delay, left the pool failing after the database
    # was back for up to as long again as it had been away, two minutes at
    # most (the PostgreSQL-outage drill).
    DATABASES["default"]["ENGINE"] = "core.postgresql"
    KIROPOOL_DB_POOL_SIZE = max(0, env.int("KIROPOOL_DB_POOL_SIZE", default=3))
    if KIROPOOL_DB_POOL_SIZE:
        DATABASES["default"]["CONN_MAX_AGE"] = 0  # the pool keeps them (Django requires 0 with a pool)
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": KIROPOOL_DB_POOL_SIZE,
            "max_size": KIROPOOL_DB_POOL_SIZE,
            "timeout": env.float("KIROPOOL_DB_POOL_TIMEOUT", default=10.0),
            "reconnect_timeout": env.float("KIROPOOL_DB_RECONNECT_SECONDS", default=5.0),
            "connection_class": WatchedConnection,
        }
    else:
        DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    # A database host that does not answer at all (gone in a failover): a
    # connection attempt gives up after this many seconds, not the system's
    # TCP timeout of minutes. ?connect_timeout= in DATABASE_URL wins.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env.int("KIROPOOL_DB_CONNECT_TIMEOUT", default=5)
    )
    # A database host that goes silent under an open connection: a query on
    # it waited for the kernel's TCP timeout, about 15 minutes, holding its
    # server thread; TCP keepalives and tcp_user_timeout end the connection
    # after KIROPOOL_DB_SILENCE_TIMEOUT seconds without a word from the host
    # (core/postgresql/silence.py). 0 leaves the system's; options given in
    # DATABASE_URL win.
    KIROPOOL_DB_SILENCE_TIMEOUT = max(0, env.int("KIROPOOL_DB_SILENCE_TIMEOUT", default=10))
    for _name, _value in silence_options(KIROPOOL_DB_SILENCE_TIMEOUT).items():
        DATABASES["default"]["OPTIONS"].setdefault(_name, _value)
    # libpq's own variables that hold a secret or say where one is kept: libpq
    # reads them at each connection, but the web server removes every variable
    # so named from its environment before its workers connect
    # (kiropool/serve.py: granian copies the environment into every
    # request), so they are taken into the connection's options here, where
    # the workers keep them. A password in DATABASE_URL still wins.
    for _variable, _name in {"PGPASSWORD": "password", "PGPASSFILE": "passfile", "PGSSLKEY": "sslkey"}.items():
        if os.environ.get(_variable):
            DATABASES["default"]["OPTIONS"].setdefault(_name, os.environ[_variable])
    # A health check is a SELECT 1 before every request's first query: a
    # round trip for each dispatch and completion. Without it, the first
    # request a thread serves after the database restarted answers a 503
    # with Retry-After (core/errors.py) and the next one reconnects.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("CONN_HEALTH_CHECKS", default=False)
    # Server-side binding and prepared statements: psycopg prepares a
    # statement after it ran DATABASE_PREPARE_THRESHOLD times on a connection
    # (the dispatch read, the claim, the completion), so PostgreSQL plans it
    # once per connection, not per call. Set the threshold to 0 behind a
    # pooler that cannot keep prepared statements (pgbouncer < 1.21 in
    # transaction mode).
    _prepare_threshold = env.int("DATABASE_PREPARE_THRESHOLD", default=5)
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        server_side_binding=True, prepare_threshold=_prepare_threshold or None
    )
    # No JIT compilation: every statement here runs in milliseconds, and
    # compiling one costs a hundred. PostgreSQL compiles when a plan's
    # estimated cost passes jit_above_cost, and the generic plan of a prepared
    # dispatch read once estimated a third of all bindings expired: compiling
    # it took 110-160 ms on each execution, with 65,536 bindings. Options given in
    # DATABASE_URL come after, so ?options=-c%20jit%3Don still wins.
    #
    # Index lookups priced for memory, not for a spinning disk: the pool's
    # rows (accounts, identities, live leases and bindings) stay in
    # PostgreSQL's cache, where PostgreSQL's default random_page_cost of 4
    # overprices fetching a row by key. With it, a 50-account key's head read
    # scanned every account of the installation (3,162 in the bench, 1.8 ms)
    # rather than look its 50 up by key (0.2 ms).
    #
    # Generic plans, with prepared statements: a statement is planned once for
    # any values, not for each run's. The dispatcher's statements are written
    # for it (routing/selectors/compiled.py): the candidates read planned for
    # its values took 1.2-1.8 ms to plan and 0.4 ms to run on 10 accounts,
    # and the claims and the completion settled on their generic plans after
    # five custom ones anyway. As the connection's own setting it costs
    # nothing a statement; asked for around each read (a SET and a RESET in
    # the read's round trip) it cost new-session dispatches a tenth of their
    # median latency and a quarter of their p99 (bench/HISTORY.md). Work
    # that scans big tables by ranges of values asks for plans made for its
    # values (routing.pg.custom_plans: the latency refresh).
    _options = [
        "-c jit=off -c random_page_cost=1.1",
        "-c plan_cache_mode=force_generic_plan" if _prepare_threshold else "",
        DATABASES["default"]["OPTIONS"].get("options", ""),
    ]
    DATABASES["default"]["OPTIONS"]["options"] = " ".join(option for option in _options if option)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- cache and broker ---------------------------------------------------------

REDIS_URL = env.str("REDIS_URL", default="")

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # A cache that is down or unreachable must cost a request milliseconds,
            # not a hang: the rate limiter then lets requests through.
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _CELERY_QUEUE_DIR = VAR_DIR / "celery" / "queue"
    _CELERY_QUEUE_DIR.mkdir(parents=True, exist_ok=True)
    # kombu's filesystem transport: producers and consumers share one folder,
    # so `make run` needs no broker server.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_CELERY_QUEUE_DIR),
        "data_folder_out": str(_CELERY_QUEUE_DIR),
        # kombu's default is ./control, relative to wherever a worker starts.
        "control_folder": str(VAR_DIR / "celery" / "control"),
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# The one schedule (SPEC §4). Every entry expires before its next run, so a
# worker that was down does not face a backlog of identical runs when it is back.
CELERY_BEAT_SCHEDULE = {
    "latency-snapshot-refresh": {
        "task": "routing.tasks.latency_snapshot_refresh",
        "schedule": 60.0,
        "options": {"expires": 50},
    },
    "binding-purge": {"task": "routing.tasks.binding_purge", "schedule": 60.0, "options": {"expires": 50}},
    "lease-reap": {"task": "routing.tasks.lease_reap", "schedule": 60.0, "options": {"expires": 50}},
    "latency-sample-prune": {
        "task": "routing.tasks.latency_sample_prune",
        "schedule": 3600.0,
        "options": {"expires": 3000},
    },
    "history-prune": {"task": "routing.tasks.history_prune", "schedule": 3600.0, "options": {"expires": 3000}},
    "quota-resets-apply": {"task": "routing.tasks.quota_resets_apply", "schedule": 60.0, "options": {"expires": 50}},
    "counters-reconcile": {
        "task": "routing.tasks.counters_reconcile",
        "schedule": 300.0,
        "options": {"expires": 250},
    },
}
# A hung task (a lock it waits on, a dead connection) must not hold a worker
# slot for ever: two of them would stop all maintenance. At the soft limit the
# task gets SoftTimeLimitExceeded, so its open batch rolls back; at the hard
# limit its pool process is killed and replaced, and the message is acked, not
# redelivered. The minute tasks are stopped before their next run is due; the
# hourly prunes (batches, resumed by the next run) and any other task get the
# defaults. Enforced by the prefork pool, the worker's default.
CELERY_TASK_SOFT_TIME_LIMIT = 300
CELERY_TASK_TIME_LIMIT = 330
_MINUTE_TASK_LIMITS = {"soft_time_limit": 40, "time_limit": 50}
CELERY_TASK_ANNOTATIONS = {
    "routing.tasks.latency_snapshot_refresh": _MINUTE_TASK_LIMITS,
    "routing.tasks.binding_purge": _MINUTE_TASK_LIMITS,
    "routing.tasks.lease_reap": _MINUTE_TASK_LIMITS,
    "routing.tasks.quota_resets_apply": _MINUTE_TASK_LIMITS,
    # every 5 minutes; a lock it cannot get within 200 ms is skipped, not waited on
    "routing.tasks.counters_reconcile": {"soft_time_limit": 200, "time_limit": 240},
}

# --- auth, i18n, static -----------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "admin:login"
# Messages wait in the server-side session, never in a cookie: the one message
# that shows a new API key's plaintext would otherwise travel in a cookie that
# is signed, not encrypted, so anyone holding the cookie could read the key.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise serves the admin's and the docs' static files from the app
# itself, compressed and cache-busted, so no CDN and no extra web server.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": env.str("STATICFILES_STORAGE", default="whitenoise.storage.CompressedManifestStaticFilesStorage")
    },
}

# --- API --------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    # orjson: the gateway endpoints answer on every upstream call.
    "DEFAULT_RENDERER_CLASSES": ["drf_orjson_renderer.renderers.ORJSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["drf_orjson_renderer.parsers.ORJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "core.negotiation.ContentNegotiation",
    "EXCEPTION_HANDLER": "core.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "kiropool",
    "DESCRIPTION": "Account-pool dispatcher for LLM gateways.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # /api/schema/ and /api/docs/ are open and the same for everyone (SERVE_PUBLIC): they read no
    # credentials, so a bad token sent along is ignored, as on the probes (it was a 403; the API answers 401).
    "SERVE_AUTHENTICATION": [],
    # Request bodies get their own components (AccountRequest, PatchedAccountRequest):
    # without read-only fields, and with minLength 1 on strings that may not be blank.
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "core.schema.request_strings_refuse_nul",
    ],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Accounts and keys share the pool choices: one enum in the schema.
    "ENUM_NAME_OVERRIDES": {"PoolEnum": "accounts.models.Pool", "ErrorTypeEnum": "core.schema.ERROR_TYPE_CHOICES"},
}

# --- the dispatcher -----------------------------------------------------------

# The pool's rules, what one key may take, dispatches that wait, how
# dispatches run: kiropool/dispatcher_settings.py, imported here, after .env
# and the local secrets were read (above).
from kiropool.dispatcher_settings import *  # noqa: E402, F403

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3" and "KIROPOOL_KEY_CACHE_SECONDS" not in os.environ:
    # On SQLite no process hears another's key changes (LISTEN/NOTIFY is
    # PostgreSQL's), so unless told otherwise each gateway request reads its
    # key row: a key disabled or deleted in any process is refused at once.
    KIROPOOL_KEY_CACHE_SECONDS = 0.0

# --- running it ---------------------------------------------------------------

# /metrics is open, as Prometheus scrapers usually carry no login; set this to
# require `Authorization: Bearer <token>` (Prometheus: `authorization: {credentials: ...}`).
KIROPOOL_METRICS_TOKEN = _verbatim("KIROPOOL_METRICS_TOKEN", "")
# The login `make run` creates when none exists (manage.py ensure_admin).
KIROPOOL_ADMIN_USER = env.str("KIROPOOL_ADMIN_USER", default="admin")
KIROPOOL_ADMIN_PASSWORD = _verbatim("KIROPOOL_ADMIN_PASSWORD", "")

# --- hardening ------------------------------------------------------------------

# Fernet keys for account credentials at rest (accounts/fields.py): the first
# encrypts, all decrypt. Unset, a key is derived from SECRET_KEY: only with
# DEBUG on, since no production process starts without them
# (kiropool/secrets_guard.py). `manage.py secrets_generate` prints one.
KIROPOOL_FERNET_KEYS = env.list("KIROPOOL_FERNET_KEYS", default=[])

# Largest request body accepted (413 above it, core/middleware.py). A
# dispatch with 256 excluded names of 200 characters is about 52 KiB. 0 (or
# less) for no limit, like the other limits' 0: Django's own limit on forms
# is then off too (None; its 0 refused every form body, the admin's login
# among them, and a negative limit made every request a 413).
KIROPOOL_MAX_BODY_BYTES = max(0, env.int("KIROPOOL_MAX_BODY_BYTES", default=256 * 1024))
DATA_UPLOAD_MAX_MEMORY_SIZE = KIROPOOL_MAX_BODY_BYTES or None

# Per-key request rates through the cache (accounts/throttling.py), as
# "<count>/<s|min|h|d>"; empty turns the limit off. Dispatch is already bounded
# by the concurrency limits, so its rate limit is off unless asked for.
KIROPOOL_DISPATCH_RATE = env.str("KIROPOOL_DISPATCH_RATE", default="")
KIROPOOL_EXPLAIN_RATE = env.str("KIROPOOL_EXPLAIN_RATE", default="60/min")
# A bad rate stops every process here, not the first request that needs it.
rates_require(
    {
        "KIROPOOL_DISPATCH_RATE": KIROPOOL_DISPATCH_RATE,
        "KIROPOOL_EXPLAIN_RATE": KIROPOOL_EXPLAIN_RATE,
        "KIROPOOL_CAPACITY_REPORT_RATE": KIROPOOL_CAPACITY_REPORT_RATE,  # noqa: F405 - dispatcher_settings
    }
)

# --- logging ----------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
