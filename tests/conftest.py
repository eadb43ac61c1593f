import pytest
from django.db import connection


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
    from routing.selectors import latency_snapshot_cache_clear

    latency_snapshot_cache_clear()
    yield
    latency_snapshot_cache_clear()


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
def process_secrets(settings):
    """This process uses the secrets of the servers and workers it starts
    (tests/support.PROCESS_SECRETS), so credentials it writes they can read."""
    from tests.support import PROCESS_SECRETS

    settings.SECRET_KEY = PROCESS_SECRETS["SECRET_KEY"]
    settings.KIROPOOL_FERNET_KEYS = [PROCESS_SECRETS["KIROPOOL_FERNET_KEYS"]]


@pytest.fixture
def operator_api(django_user_model):
    """A DRF client authenticated as a staff user by token (the operator API's way in)."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    user = django_user_model.objects.create_user(username="ops", password="pw", is_staff=True)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    client.user = user
    return client


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    # The release listener holds its own connection to the test database,
    # which would keep pytest-django from dropping it at the end.
    yield
    from routing.wakeups import listener_stop

    listener_stop()
