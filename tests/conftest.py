import socket

import pytest
from django.db import connection

from tests.support import REFUSED_DATABASE_URL


@pytest.fixture(autouse=True)
def _plain_static_storage(settings):
    # Tests render templates without running collectstatic first.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    # PBKDF2 takes most of a second per login on a CI machine; no test here is
    # about password hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def postgres_only():
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: set DATABASE_URL=postgres://...")


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_user(username="operator", password="pw", is_staff=True, is_superuser=True)
    client.force_login(user)
    client.user = user
    return client


@pytest.fixture(autouse=True)
def _fresh_snapshot_cache():
    # The snapshot is cached per process; every test starts from the database.
    from routing.selectors.latency import latency_snapshot_cache_clear

    latency_snapshot_cache_clear()
    yield
    latency_snapshot_cache_clear()


def pool_permissions():
    """Every model permission of the pool and the decision's state (the
    accounts and routing apps), the grant of credentials access included."""
    from django.contrib.auth.models import Permission

    return Permission.objects.filter(content_type__app_label__in=["accounts", "routing"])


@pytest.fixture(autouse=True)
def _key_rows_read_each_time(settings):
    # Tests change keys with queryset updates, which the per-process key cache
    # does not see; it is tested with its own lifetime in tests/accounts/test_key_cache.py
    # (and runs as deployed in every test against a real server).
    from accounts.authentication import key_cache

    settings.KIROPOOL_KEY_CACHE_SECONDS = 0
    key_cache.clear()
    yield
    key_cache.clear()


@pytest.fixture(autouse=True)
def _fresh_pool_sizes():
    # The dispatcher trusts a pool's size for a minute per process; ids are
    # reused between tests, so every test counts afresh.
    from routing.selectors.key_accounts import pool_sizes_clear

    pool_sizes_clear()
    yield
    pool_sizes_clear()


@pytest.fixture(autouse=True)
def _fresh_probe_caches():
    # /readyz and /metrics reuse their answer for a few seconds per process;
    # every test starts from the database and broker as they are now.
    from kiropool.health import readiness
    from routing.metrics import pool_state

    readiness.clear()
    pool_state.clear()
    yield
    readiness.clear()
    pool_state.clear()


@pytest.fixture
def database_pings(monkeypatch):
    """Every bounded database ping /readyz and /metrics make
    (core/database.py), counted; each is still the real ``SELECT 1``."""
    from kiropool import health
    from routing import metrics

    pings = []
    real = health.database_ping

    def counted():
        pings.append(1)
        real()

    for module in (health, metrics):
        monkeypatch.setattr(module, "database_ping", counted)
    return pings


@pytest.fixture(autouse=True)
def _fresh_lease_floor():
    # Each process reads the reap mark at most every few seconds; every test's
    # database starts without one.
    from routing.selectors.reaped import lease_floor_forget

    lease_floor_forget()
    yield
    lease_floor_forget()


@pytest.fixture
def process_secrets(settings):
    """This process uses the secrets of the servers and workers it starts
    (tests/support.PROCESS_SECRETS), so credentials it writes they can read."""
    from tests.support import PROCESS_SECRETS

    settings.SECRET_KEY = PROCESS_SECRETS["SECRET_KEY"]
    settings.KIROPOOL_FERNET_KEYS = [PROCESS_SECRETS["KIROPOOL_FERNET_KEYS"]]


@pytest.fixture
def operator_token_client(django_user_model):
    """``operator_token_client(username, permissions=())``: a DRF client
    authenticated by token as a staff user holding exactly these permissions."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    def make(username: str, permissions=()):
        user = django_user_model.objects.create_user(username=username, password="pw", is_staff=True)
        user.user_permissions.set(permissions)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
        client.user = user
        return client

    return make


@pytest.fixture
def operator_api(django_user_model):
    """A DRF client authenticated by token (the operator API's way in) as a
    staff user who is not a superuser but belongs to a group holding every
    permission of the pool: the permission checks run on every call."""
    from django.contrib.auth.models import Group
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    operators = Group.objects.create(name="pool operators")
    operators.permissions.set(pool_permissions())
    user = django_user_model.objects.create_user(username="ops", password="pw", is_staff=True)
    user.groups.add(operators)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    client.user = user
    return client


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    # The notification listener holds its own connection to the test
    # database, which would keep pytest-django from dropping it at the end.
    yield
    from core import listener

    listener.stop()


def pytest_generate_tests(metafunc):
    # The parity suite: a test that asks for ``statements`` runs once with the
    # ORM services alone ("orm") and, on PostgreSQL, twice more with the
    # one-statement speedups of routing/pg.py on: as a key starts ("fast":
    # the sticky statement first), and as a key of mostly new sessions runs
    # ("fast-lookup": the binding looked up first, routing/leases.StickyOdds).
    if "statements" in metafunc.fixturenames:
        variants = ["orm", "fast", "fast-lookup"] if connection.vendor == "postgresql" else ["orm"]
        metafunc.parametrize("statements", variants, indirect=True)


@pytest.fixture
def statements(request, monkeypatch):
    from routing import leases, pg
    from routing.backend import backend

    saved = backend.statements
    backend.statements = pg.Statements() if request.param.startswith("fast") else None
    lookup_first = request.param == "fast-lookup"
    odds = leases.StickyOdds(lookup_first_below=float("inf") if lookup_first else 0.0)
    monkeypatch.setattr(leases, "sticky_odds", odds)
    yield request.param
    backend.statements = saved


@pytest.fixture
def silent_database_url():
    """A database host that takes the TCP connection and never answers (a
    listening socket nobody accepts from)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        yield f"postgres://nobody@127.0.0.1:{silent.getsockname()[1]}/nothing"


@pytest.fixture(params=["refused", "silent"])
def unreachable_database_url(request):
    if request.param == "refused":
        return REFUSED_DATABASE_URL
    return request.getfixturevalue("silent_database_url")
