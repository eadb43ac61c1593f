"""`make run` on a fresh clone: development secrets generated once, private,
reused, never overwritten, git-ignored (core/local_secrets.py and
``manage.py secrets_generate --local``, which `make run` calls).

The command runs as `make run` runs it: a real process, with no environment
but a secrets file of the test's own (KIROPOOL_LOCAL_SECRETS_FILE), never the
checkout's var/local-secrets.env."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from core import local_secrets
from kiropool.secrets_guard import secrets_problems

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def secrets_file(tmp_path) -> Path:
    return tmp_path / "var" / "local-secrets.env"


def fresh_clone_env(secrets_file: Path, **environment: str) -> dict[str, str]:
    # Nothing but PATH: no SECRET_KEY, no KIROPOOL_FERNET_KEYS, no DEBUG, and
    # no PYTEST_VERSION either, so settings read the file as under `make run`.
    return {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "kiropool.settings",
        "DATABASE_URL": f"sqlite:///{secrets_file.parent.parent / 'db.sqlite3'}",
        "CELERY_BROKER_URL": "memory://",
        "KIROPOOL_LOCAL_SECRETS_FILE": str(secrets_file),
        **environment,
    }


def manage(env: dict[str, str], *args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def values(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def settings_seen(env: dict[str, str]) -> dict[str, str]:
    code = "from django.conf import settings as s; print(s.SECRET_KEY); print(','.join(s.KIROPOOL_FERNET_KEYS))"
    result = manage(env, "shell", "-c", code)
    assert result.returncode == 0, result.stderr
    secret_key, fernet_keys = result.stdout.strip().splitlines()[-2:]
    return {"SECRET_KEY": secret_key, "KIROPOOL_FERNET_KEYS": fernet_keys}


def test_first_run_generates_private_secrets_that_the_guard_accepts(secrets_file):
    env = fresh_clone_env(secrets_file)
    # A permissive umask must not leak them: the file is 0600 from its first byte.
    result = manage(env, "secrets_generate", "--local", umask=0)
    assert result.returncode == 0, result.stderr
    assert "Generated development secrets" in result.stdout

    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    generated = values(secrets_file)
    assert set(generated) == {"SECRET_KEY", "KIROPOOL_FERNET_KEYS"}
    secret_key, fernet_key = generated["SECRET_KEY"], generated["KIROPOOL_FERNET_KEYS"]
    assert secrets_problems(debug=False, secret_key=secret_key, fernet_keys=[fernet_key]) == []
    assert [p.name for p in secrets_file.parent.iterdir()] == ["local-secrets.env"]  # no temporary left behind

    # Every process of that checkout now uses them, so the data commands start.
    assert settings_seen(env) == generated
    migrated = manage(env, "migrate", "--noinput")
    assert migrated.returncode == 0, migrated.stderr


def test_later_runs_reuse_the_file_and_never_rewrite_it(secrets_file):
    env = fresh_clone_env(secrets_file)
    assert manage(env, "secrets_generate", "--local").returncode == 0
    before, inode = secrets_file.read_bytes(), secrets_file.stat().st_ino

    again = manage(env, "secrets_generate", "--local")
    assert again.returncode == 0, again.stderr
    assert "Using the development secrets" in again.stdout
    assert secrets_file.read_bytes() == before and secrets_file.stat().st_ino == inode
    assert settings_seen(env) == values(secrets_file)


def test_the_environment_wins_over_the_file(secrets_file):
    env = fresh_clone_env(secrets_file)
    assert manage(env, "secrets_generate", "--local").returncode == 0
    mine = local_secrets.secret_key_generate()
    seen = settings_seen({**env, "SECRET_KEY": mine})
    assert seen == {"SECRET_KEY": mine, "KIROPOOL_FERNET_KEYS": values(secrets_file)["KIROPOOL_FERNET_KEYS"]}


def test_no_file_when_the_environment_sets_both(secrets_file):
    both = {"SECRET_KEY": local_secrets.secret_key_generate(), "KIROPOOL_FERNET_KEYS": Fernet.generate_key().decode()}
    env = fresh_clone_env(secrets_file, **both)
    result = manage(env, "secrets_generate", "--local")
    assert result.returncode == 0, result.stderr
    assert "come from the environment" in result.stdout
    assert not secrets_file.exists()


def test_a_file_readable_by_others_is_made_private(secrets_file):
    env = fresh_clone_env(secrets_file)
    assert manage(env, "secrets_generate", "--local").returncode == 0
    before = secrets_file.read_bytes()
    secrets_file.chmod(0o644)
    result = manage(env, "secrets_generate", "--local")
    assert result.returncode == 0 and "now mode 0600" in result.stdout
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert secrets_file.read_bytes() == before


def test_an_incomplete_file_is_reported_not_replaced(secrets_file):
    secrets_file.parent.mkdir(parents=True)
    secrets_file.write_text(f"SECRET_KEY={local_secrets.secret_key_generate()}\n")
    secrets_file.chmod(0o600)
    before = secrets_file.read_bytes()
    result = manage(fresh_clone_env(secrets_file), "secrets_generate", "--local")
    assert result.returncode != 0
    assert "sets no KIROPOOL_FERNET_KEYS" in result.stderr
    assert secrets_file.read_bytes() == before


def test_two_runs_at_once_keep_the_first_file(secrets_file):
    first = local_secrets.local_secrets_ensure(secrets_file, environ={})
    written = secrets_file.read_bytes()
    second = local_secrets.local_secrets_ensure(secrets_file, environ={})
    assert (first.state, second.state) == ("created", "kept")
    assert secrets_file.read_bytes() == written
    # The loser of a race (the file appeared between its check and its write) keeps the winner's.
    assert local_secrets._write_once(secrets_file, "SECRET_KEY=other\n") is False
    assert secrets_file.read_bytes() == written


def test_the_default_location_is_git_ignored():
    from django.conf import settings

    if "KIROPOOL_LOCAL_SECRETS_FILE" not in os.environ:
        assert settings.LOCAL_SECRETS_FILE == ROOT / "var" / "local-secrets.env"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "var/local-secrets.env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0


@pytest.mark.parametrize("target", ["run", "demo", "migrate"])
def test_make_targets_that_touch_data_generate_the_secrets_first(target):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    planned = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "manage.py secrets_generate --local" in planned
    assert planned.index("manage.py secrets_generate --local") < planned.index("manage.py migrate")
