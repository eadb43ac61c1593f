"""`manage.py check --deploy` is clean under the production settings the
README's "Deploying" section documents, and those settings behave."""

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.support import clean_env

ROOT = Path(__file__).resolve().parents[2]

# What README "Deploying" tells an operator to set (values are examples).
PRODUCTION = {
    "SECRET_KEY": "k8Q2v9XzN4pL7wR1tY6uE3sD0fG5hJ8aB2cV9nM4xZ7qW1eR6tY3uI0oP5aS8dF2",
    "DEBUG": "false",
    "ALLOWED_HOSTS": "pool.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://pool.example.com",
    "DATABASE_URL": "postgres://kiropool@db.internal:5432/kiropool",
    "REDIS_URL": "redis://cache.internal:6379/0",
    "KIROPOOL_FERNET_KEYS": Fernet.generate_key().decode(),
    "KIROPOOL_SECURE_PROXY_SSL_HEADER": "true",
    "KIROPOOL_SECURE_SSL_REDIRECT": "true",
    "KIROPOOL_SECURE_HSTS_SECONDS": "31536000",
    "KIROPOOL_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "KIROPOOL_SECURE_HSTS_PRELOAD": "true",
    "KIROPOOL_SECURE_COOKIES": "true",
}


def check_deploy(**environment) -> subprocess.CompletedProcess:
    # A clean environment: nothing of the developer's or CI's own settings leaks in.
    env = clean_env(**environment)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_under_the_documented_production_settings():
    result = check_deploy(**PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_flags_the_development_defaults():
    result = check_deploy()
    assert result.returncode != 0
    for check_id in ("security.W004", "security.W008", "security.W009", "security.W012", "security.W016"):
        assert check_id in result.stderr, check_id
    assert "kiropool.W001" in result.stderr  # no KIROPOOL_FERNET_KEYS


def test_check_deploy_flags_the_server_timing_header():
    result = check_deploy(**PRODUCTION, KIROPOOL_SERVER_TIMING="true")
    assert result.returncode != 0
    assert "kiropool.W002" in result.stderr


@pytest.fixture
def behind_tls_proxy(settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 31536000


@pytest.mark.django_db
@pytest.mark.usefixtures("behind_tls_proxy")
def test_behind_the_proxy_plain_http_redirects_but_probes_answer(client):
    redirected = client.get("/admin/")
    assert redirected.status_code == 301 and redirected.url.startswith("https://")
    assert client.get("/healthz").status_code == 200  # probes reach app hosts over plain http
    served = client.get("/admin/login/", HTTP_X_FORWARDED_PROTO="https")
    assert served.status_code == 200
    assert served["Strict-Transport-Security"].startswith("max-age=31536000")
