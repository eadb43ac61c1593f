"""With DEBUG off, no entry point starts on public or missing secrets
(kiropool/secrets_guard.py); harmless commands still run.

Each entry point runs as a real process in a clean environment (nothing of the
developer's or CI's settings, no local secrets file), on a throwaway SQLite
database, so a refusal that failed would show as a process that started."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from core.webserver import free_port
from kiropool.secrets_guard import (
    DEVELOPMENT_SECRET_KEY,
    FERNET_KEY_COMMAND,
    SECRET_KEY_COMMAND,
    secrets_problems,
)
from tests.support import PROCESS_SECRETS, clean_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GOOD_KEY = PROCESS_SECRETS["SECRET_KEY"]
FERNET_KEY = Fernet.generate_key().decode()


@pytest.mark.parametrize(
    ("secret_key", "fernet_keys", "complaints"),
    [
        (DEVELOPMENT_SECRET_KEY, [], {"SECRET_KEY", "KIROPOOL_FERNET_KEYS"}),
        (DEVELOPMENT_SECRET_KEY, [FERNET_KEY], {"SECRET_KEY"}),
        ("django-insecure-" + GOOD_KEY, [FERNET_KEY], {"SECRET_KEY"}),
        (GOOD_KEY[:49], [FERNET_KEY], {"SECRET_KEY"}),  # Django's minimum is 50
        ("abcd" * 20, [FERNET_KEY], {"SECRET_KEY"}),  # 4 distinct characters; 5 needed
        ("", [FERNET_KEY], {"SECRET_KEY"}),
        (GOOD_KEY, [], {"KIROPOOL_FERNET_KEYS"}),
        (GOOD_KEY, ["", " "], {"KIROPOOL_FERNET_KEYS"}),
        (GOOD_KEY, [FERNET_KEY, "not-a-fernet-key"], {"KIROPOOL_FERNET_KEYS entry 2"}),
        (GOOD_KEY[:50], [FERNET_KEY], set()),
        (GOOD_KEY, [FERNET_KEY, Fernet.generate_key().decode()], set()),
    ],
)
def test_secrets_are_judged_with_debug_off(secret_key, fernet_keys, complaints):
    problems = secrets_problems(debug=False, secret_key=secret_key, fernet_keys=fernet_keys)
    assert {problem.split(" is ")[0] for problem in problems} == complaints
    for problem in problems:
        # Each says what to set and the exact command that makes a value...
        assert SECRET_KEY_COMMAND in problem or FERNET_KEY_COMMAND in problem
        # ...and never echoes a configured value back into a log.
        assert "not-a-fernet-key" not in problem and GOOD_KEY not in problem


def test_debug_on_allows_the_development_defaults():
    assert secrets_problems(debug=True, secret_key=DEVELOPMENT_SECRET_KEY, fernet_keys=[]) == []


# --- every entry point, as a real process ------------------------------------------


@pytest.fixture
def database(tmp_path) -> Path:
    return tmp_path / "guarded.sqlite3"


def entry_env(database: Path, **environment: str) -> dict[str, str]:
    return clean_env(
        DJANGO_SETTINGS_MODULE="kiropool.settings",
        DATABASE_URL=f"sqlite:///{database}",
        CELERY_BROKER_URL="memory://",
        **environment,
    )


def run(command: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    # Its own process group: a server that wrongly started is stopped whole,
    # workers included, and the test fails instead of hanging.
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command)} was still running after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def assert_refused(result: subprocess.CompletedProcess, *, names=("SECRET_KEY", "KIROPOOL_FERNET_KEYS")) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "kiropool refuses to start" in output, output
    for name in names:
        assert f"Set {name} to the output of" in output, output
    assert SECRET_KEY_COMMAND in output or "SECRET_KEY" not in names
    assert FERNET_KEY_COMMAND in output or "KIROPOOL_FERNET_KEYS" not in names


def tables(database: Path) -> list[str]:
    if not database.exists():
        return []
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def test_the_wsgi_module_refuses_under_any_server(database):
    assert_refused(run([sys.executable, "-c", "import kiropool.wsgi"], entry_env(database)))
    assert_refused(run([sys.executable, "-c", "import kiropool.asgi"], entry_env(database)))


def test_the_wsgi_module_loads_with_secrets_or_with_debug_on(database):
    assert run([sys.executable, "-c", "import kiropool.wsgi"], entry_env(database, **PROCESS_SECRETS)).returncode == 0
    assert run([sys.executable, "-c", "import kiropool.wsgi"], entry_env(database, DEBUG="true")).returncode == 0


def test_only_the_missing_secret_is_named(database):
    result = run([sys.executable, "-c", "import kiropool.wsgi"], entry_env(database, SECRET_KEY=GOOD_KEY))
    assert_refused(result, names=("KIROPOOL_FERNET_KEYS",))
    assert "Set SECRET_KEY" not in result.stderr


def test_the_web_server_refuses_before_it_listens(database):
    port = free_port()
    env = entry_env(database, KIROPOOL_BIND=f"127.0.0.1:{port}", PROMETHEUS_MULTIPROC_DIR=str(database.parent))
    result = run([sys.executable, "-m", "kiropool.serve"], env)
    assert_refused(result)
    output = result.stdout + result.stderr
    assert "Listening at" not in output and "Spawning worker" not in output, output
    # ... and before loading the app, whose own refusal comes with a traceback.
    assert "Traceback" not in output, output


def test_another_server_without_the_launcher_still_refuses(database):
    # Another deployment's command line (granian or gunicorn on the WSGI module): the module's own guard.
    env = entry_env(database, PROMETHEUS_MULTIPROC_DIR=str(database.parent))
    port = str(free_port())
    granian = [str(BIN / "granian"), "--interface", "wsgi", "--port", port, "kiropool.wsgi:application"]
    assert_refused(run(granian, env))
    assert_refused(
        run([str(BIN / "gunicorn"), "-c", "/dev/null", "-b", f"127.0.0.1:{port}", "kiropool.wsgi:application"], env)
    )


@pytest.mark.parametrize("program", ["worker", "beat"])
def test_celery_worker_and_beat_refuse(database, program):
    env = entry_env(database)
    beat_schedule = ["--schedule", str(database.parent / "beat-schedule")] if program == "beat" else []
    result = run([str(BIN / "celery"), "-A", "kiropool", program, "--loglevel=INFO", *beat_schedule], env)
    assert_refused(result)
    assert "ready." not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["migrate", "--noinput"],
        ["ensure_admin"],
        ["dumpdata", "accounts"],
        ["shell", "-c", "print('ran')"],
        ["rotate_credentials_key"],
    ],
)
def test_manage_py_data_commands_refuse(database, command):
    result = run([sys.executable, "manage.py", *command], entry_env(database))
    assert_refused(result)
    assert "ran" not in result.stdout
    assert tables(database) == []  # nothing was created, let alone read


def test_manage_py_data_commands_run_with_secrets(database):
    result = run([sys.executable, "manage.py", "migrate", "--noinput"], entry_env(database, **PROCESS_SECRETS))
    assert result.returncode == 0, result.stderr
    assert "accounts_account" in tables(database)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["--version"],
        ["help"],
        ["help", "migrate"],
        ["check"],
        ["secrets_generate"],
        ["spectacular", "--validate", "--file", "/dev/null"],
    ],
)
def test_harmless_commands_run_without_secrets(database, command):
    result = run([sys.executable, "manage.py", *command], entry_env(database))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refuses" not in result.stdout + result.stderr
    assert tables(database) == []


def test_the_generator_prints_values_the_guard_accepts(database):
    result = run([sys.executable, "manage.py", "secrets_generate"], entry_env(database))
    values = dict(line.split("=", 1) for line in result.stdout.split())
    assert set(values) == {"SECRET_KEY", "KIROPOOL_FERNET_KEYS"}
    assert (
        secrets_problems(debug=False, secret_key=values["SECRET_KEY"], fernet_keys=[values["KIROPOOL_FERNET_KEYS"]])
        == []
    )
    migrated = run([sys.executable, "manage.py", "migrate", "--noinput"], entry_env(database, **values))
    assert migrated.returncode == 0, migrated.stderr
