"""Settings parse from the environment; with none at all, the embedded default."""

import json
import subprocess
import sys
from pathlib import Path

from tests.support import clean_env

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps({
    "engine": settings.DATABASES["default"]["ENGINE"],
    "broker": settings.CELERY_BROKER_URL,
    "cache": settings.CACHES["default"]["BACKEND"],
    "debug": settings.DEBUG,
    "ttl": settings.KIROPOOL_AFFINITY_TTL_SECONDS,
    "max_entries": settings.KIROPOOL_AFFINITY_MAX_ENTRIES,
    "lease_ttl": settings.KIROPOOL_LEASE_TTL_SECONDS,
    "hosts": settings.ALLOWED_HOSTS,
    "key_cache": settings.KIROPOOL_KEY_CACHE_SECONDS,
    "db_options": settings.DATABASES["default"].get("OPTIONS", {}).get("options"),
    "prepare_threshold": settings.DATABASES["default"].get("OPTIONS", {}).get("prepare_threshold"),
    "connect_timeout": settings.DATABASES["default"].get("OPTIONS", {}).get("connect_timeout"),
    "reconnect_timeout": settings.DATABASES["default"].get("OPTIONS", {}).get("pool", {}).get("reconnect_timeout"),
    "silence": {
        name: value
        for name, value in settings.DATABASES["default"].get("OPTIONS", {}).items()
        if name.startswith(("keepalives", "tcp_user_timeout"))
    },
    "middleware": settings.MIDDLEWARE,
}))
"""


def load(**environment) -> dict:
    env = clean_env(DJANGO_SETTINGS_MODULE="kiropool.settings", **environment)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_defaults_need_no_services():
    settings = load()
    assert settings["engine"] == "django.db.backends.sqlite3"
    assert settings["broker"] == "filesystem://"
    assert settings["cache"].endswith("LocMemCache")
    assert settings["debug"] is False
    assert (settings["ttl"], settings["max_entries"], settings["lease_ttl"]) == (6 * 3600, 4096, 900)


def test_services_from_environment():
    settings = load(
        DATABASE_URL="postgres://u@db:5432/kp",
        REDIS_URL="redis://cache:6379/0",
        ALLOWED_HOSTS="pool.example,127.0.0.1",
        KIROPOOL_AFFINITY_TTL_SECONDS="120",
        KIROPOOL_LEASE_TTL_SECONDS="60",
    )
    assert settings["engine"] == "core.postgresql"  # Django's, answering at once while the database is down
    assert settings["broker"] == "redis://cache:6379/0"
    assert settings["cache"].endswith("RedisCache")
    assert settings["hosts"] == ["pool.example", "127.0.0.1"]
    assert (settings["ttl"], settings["lease_ttl"]) == (120, 60)


def test_affinity_settings_are_clamped():
    low = load(KIROPOOL_AFFINITY_TTL_SECONDS="5", KIROPOOL_AFFINITY_MAX_ENTRIES="0")
    high = load(KIROPOOL_AFFINITY_TTL_SECONDS="999999", KIROPOOL_AFFINITY_MAX_ENTRIES="5000000")
    assert (low["ttl"], low["max_entries"]) == (60, 1)
    assert (high["ttl"], high["max_entries"]) == (24 * 3600, 1_000_000)


def test_the_key_cache_is_kept_only_where_other_processes_changes_reach_it():
    """On SQLite no process hears another's key changes: by default each
    request reads its key (tests/security/test_key_revocation.py), unless
    the operator asks for a cache."""
    assert load()["key_cache"] == 0
    assert load(KIROPOOL_KEY_CACHE_SECONDS="2")["key_cache"] == 2
    assert load(DATABASE_URL="postgres://u@db:5432/kp")["key_cache"] == 1
    assert load(DATABASE_URL="postgres://u@db:5432/kp", KIROPOOL_KEY_CACHE_SECONDS="0")["key_cache"] == 0


def test_postgresql_connections_plan_prepared_statements_once():
    """With prepared statements, every statement runs on its generic plan
    (the dispatcher's are written for it, routing/selectors/compiled.py);
    without them a generic plan would be planned on every run for nothing,
    and the setting is left alone. Options in DATABASE_URL come after, so
    an operator's own choice wins."""
    url = "postgres://u@db:5432/kp"
    prepared = load(DATABASE_URL=url)
    assert prepared["prepare_threshold"] == 5
    assert prepared["db_options"] == "-c jit=off -c random_page_cost=1.1 -c plan_cache_mode=force_generic_plan"
    unprepared = load(DATABASE_URL=url, DATABASE_PREPARE_THRESHOLD="0")
    assert unprepared["prepare_threshold"] is None
    assert unprepared["db_options"] == "-c jit=off -c random_page_cost=1.1"
    own = load(DATABASE_URL=f"{url}?options=-c%20plan_cache_mode%3Dauto")
    assert own["db_options"].endswith("-c plan_cache_mode=force_generic_plan -c plan_cache_mode=auto")


def test_postgresql_connection_attempts_give_up_in_seconds():
    """A database host that does not answer costs an attempt 5 s, not the
    system's TCP timeout, and a pool slot retries for 5 s before the next
    request starts a new attempt (tests/drills: the pool finds a database
    back within seconds). DATABASE_URL's own connect_timeout wins."""
    url = "postgres://u@db:5432/kp"
    default = load(DATABASE_URL=url)
    assert (default["connect_timeout"], default["reconnect_timeout"]) == (5, 5.0)
    own = load(DATABASE_URL=f"{url}?connect_timeout=2", KIROPOOL_DB_RECONNECT_SECONDS="20")
    assert (int(own["connect_timeout"]), own["reconnect_timeout"]) == (2, 20.0)


def test_a_connection_gives_up_a_silent_database_host():
    """TCP keepalives and tcp_user_timeout end a connection whose host has
    said nothing for 10 s (tests/test_database_silence.py), instead of the
    kernel's retransmissions of about 15 minutes; DATABASE_URL's own options
    win, and 0 leaves the system's."""
    url = "postgres://u@db:5432/kp"
    assert load(DATABASE_URL=url)["silence"] == {
        "tcp_user_timeout": 10_000,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 1,
        "keepalives_count": 5,
    }
    assert load(DATABASE_URL=url, KIROPOOL_DB_SILENCE_TIMEOUT="3")["silence"] == {
        "tcp_user_timeout": 3_000,
        "keepalives": 1,
        "keepalives_idle": 1,
        "keepalives_interval": 1,
        "keepalives_count": 2,
    }
    own = load(DATABASE_URL=f"{url}?tcp_user_timeout=30000&keepalives_idle=20")["silence"]
    assert (int(own["tcp_user_timeout"]), int(own["keepalives_idle"]), own["keepalives_count"]) == (30_000, 20, 5)
    assert load(DATABASE_URL=url, KIROPOOL_DB_SILENCE_TIMEOUT="0")["silence"] == {}
    assert load()["silence"] == {}  # SQLite: no TCP


def test_a_bad_rate_stops_a_process_at_startup():
    """Not the first request that needs it (an explain, a completion's
    capacity report): every process refuses to load, naming the setting."""
    for name in ("KIROPOOL_EXPLAIN_RATE", "KIROPOOL_CAPACITY_REPORT_RATE", "KIROPOOL_DISPATCH_RATE"):
        env = clean_env(DJANGO_SETTINGS_MODULE="kiropool.settings", **{name: "abc"})
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode != 0, name
        assert f"kiropool refuses to start: {name}: rate 'abc' is not" in out.stderr, out.stderr[-500:]


SECRETS_PROBE = """
import json
from django.conf import settings
print(json.dumps({
    "secret_key": settings.SECRET_KEY,
    "metrics_token": settings.KIROPOOL_METRICS_TOKEN,
    "admin_password": settings.KIROPOOL_ADMIN_PASSWORD,
}))
"""


def test_secrets_are_read_exactly_as_set():
    """A secret may start with "$" (Django's own get_random_secret_key draws
    from an alphabet that has it). django-environ reads such a value as the
    name of another variable and, with none by that name, gives the default:
    a metrics token left /metrics open, an admin password was replaced by a
    generated one, and a strong SECRET_KEY became the public development key."""
    secrets = {
        "SECRET_KEY": "$" + "k8Q2v9XzN4pL7wR1tY6uE3sD0fG5hJ8aB2cV9nM4xZ7qW1eR6tY3uI0o",
        "KIROPOOL_METRICS_TOKEN": "$crape-token",
        "KIROPOOL_ADMIN_PASSWORD": "$tr0ng-admin-password",
    }
    env = clean_env(DJANGO_SETTINGS_MODULE="kiropool.settings", **secrets)
    out = subprocess.run(
        [sys.executable, "-c", SECRETS_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    read = json.loads(out.stdout.strip().splitlines()[-1])
    assert read == {
        "secret_key": secrets["SECRET_KEY"],
        "metrics_token": secrets["KIROPOOL_METRICS_TOKEN"],
        "admin_password": secrets["KIROPOOL_ADMIN_PASSWORD"],
    }


def test_a_database_kiropool_cannot_run_on_stops_a_process_at_startup():
    """kiropool runs on PostgreSQL (SQLite on one host). Any other database URL
    was taken as PostgreSQL's (the engine replaced, the host and port kept):
    every process started, then every request failed on a connection the
    PostgreSQL driver could not make, reported as the database being down."""
    for url in ("mysql://kiropool@db:3306/kiropool", "oracle://kiropool@db:1521/kiropool"):
        env = clean_env(DJANGO_SETTINGS_MODULE="kiropool.settings", DATABASE_URL=url)
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode != 0, url
        assert "kiropool refuses to start: DATABASE_URL" in out.stderr, out.stderr[-500:]
    assert load(DATABASE_URL="postgresql://u@db:5432/kp")["engine"] == "core.postgresql"
    assert load(DATABASE_URL="sqlite:////tmp/kiropool-probe.sqlite3")["engine"] == "django.db.backends.sqlite3"


BODY_PROBE = """
import json, django
django.setup()
from django.http import HttpResponse
from django.test import RequestFactory
from core.middleware import RequestGuardMiddleware
guard = RequestGuardMiddleware(lambda request: HttpResponse(request.POST["name"]))
try:
    response = guard(RequestFactory().post("/admin/login/", {"name": "p" * 200}))
    print(json.dumps([response.status_code, response.content.decode()]))
except Exception as exc:
    print(json.dumps([type(exc).__name__]))
"""


def test_a_max_body_of_0_or_less_is_no_limit_on_any_body():
    """Like the other limits' 0 (KIROPOOL_KEY_MAX_CONCURRENCY,
    KIROPOOL_DB_SILENCE_TIMEOUT): off. Django's own limit on form bodies
    was set to the same number: 0 refused every form (the admin's login
    among them), and a negative limit made every request a 413."""

    def form_read(**environment) -> list:
        env = clean_env(DJANGO_SETTINGS_MODULE="kiropool.settings", **environment)
        out = subprocess.run(
            [sys.executable, "-c", BODY_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    form = [200, "p" * 200]
    assert form_read() == form
    assert form_read(KIROPOOL_MAX_BODY_BYTES="0") == form
    assert form_read(KIROPOOL_MAX_BODY_BYTES="-1") == form
    status, body = form_read(KIROPOOL_MAX_BODY_BYTES="100")
    assert status == 413 and "over the limit of 100 bytes" in body
