"""No production process runs on public secrets.

With ``DEBUG`` off, every entry point (``kiropool/wsgi.py`` and ``asgi.py``,
the web server's launcher ``kiropool/serve.py``, the Celery worker and beat in
``kiropool/celery.py``, ``manage.py``) asks :func:`secrets_problems` before it
serves anything, and refuses to start while ``SECRET_KEY`` is the built-in
development key or weak by Django's own measure, or while
``KIROPOOL_FERNET_KEYS`` is unset or malformed. The code is public, so
either default would let anyone holding a database dump decrypt every
account's credentials (the development Fernet key is derived from
``SECRET_KEY``) or forge sessions.

It is never called from settings or an ``AppConfig``: the test suite (which
runs with ``DEBUG`` off) and one-off scripts call ``django.setup()`` without
production secrets, and must keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from django.core.exceptions import ImproperlyConfigured

# The value settings fall back to; it is in the repository, so it is public.
DEVELOPMENT_SECRET_KEY = "django-insecure-kiropool-local-development-only"

SECRET_KEY_COMMAND = 'python -c "import secrets; print(secrets.token_urlsafe(50))"'
FERNET_KEY_COMMAND = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'

# manage.py commands that read and write no pool data, so they run whatever
# the secrets: help and version, `check` (it is how an operator finds out what
# is wrong), the secret generator itself, and the build steps that only read
# code (static files, the OpenAPI schema, new migrations). Anything else, a
# third-party command included, needs production secrets: a new command is
# refused until someone decides it is harmless.
HARMLESS_COMMANDS = frozenset(
    {"help", "version", "check", "secrets_generate", "collectstatic", "findstatic", "spectacular", "makemigrations"}
)


class UnsafeSecrets(ImproperlyConfigured):
    """DEBUG is off and a secret is missing or public. The message names the
    variables and how to generate values; it never contains a secret."""


def secrets_problems(*, debug: bool, secret_key: str, fernet_keys: Sequence[str]) -> list[str]:
    """What is wrong with these secrets for a process with this DEBUG, one
    line per variable (with the command that generates a value); empty when
    they may be used."""
    # Imported here: settings import this module for DEVELOPMENT_SECRET_KEY.
    from cryptography.fernet import Fernet
    from django.core.checks.security.base import (
        SECRET_KEY_INSECURE_PREFIX,
        SECRET_KEY_MIN_LENGTH,
        SECRET_KEY_MIN_UNIQUE_CHARACTERS,
    )

    if debug:
        return []
    problems = []
    if (
        secret_key == DEVELOPMENT_SECRET_KEY
        or secret_key.startswith(SECRET_KEY_INSECURE_PREFIX)
        or len(secret_key) < SECRET_KEY_MIN_LENGTH
        or len(set(secret_key)) < SECRET_KEY_MIN_UNIQUE_CHARACTERS
    ):
        problems.append(
            "SECRET_KEY is the built-in development key or too weak (it needs at least "
            f"{SECRET_KEY_MIN_LENGTH} characters, {SECRET_KEY_MIN_UNIQUE_CHARACTERS} distinct ones, and no "
            f"'{SECRET_KEY_INSECURE_PREFIX}' prefix). Set SECRET_KEY to the output of:\n"
            f"      {SECRET_KEY_COMMAND}"
        )
    keys = [key.strip() for key in fernet_keys if key and key.strip()]
    if not keys:
        problems.append(
            "KIROPOOL_FERNET_KEYS is not set, so account credentials would be encrypted with a key "
            "derived from SECRET_KEY. Set KIROPOOL_FERNET_KEYS to the output of:\n"
            f"      {FERNET_KEY_COMMAND}"
        )
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except ValueError:
            # The position, not the value: this message goes to logs.
            problems.append(
                f"KIROPOOL_FERNET_KEYS entry {position} is not a Fernet key (32 url-safe base64-encoded bytes). "
                f"Generate one with:\n      {FERNET_KEY_COMMAND}"
            )
    return problems


def secrets_refusal() -> str | None:
    """The refusal for the configured settings, or None when they may run."""
    from django.conf import settings

    problems = secrets_problems(
        debug=settings.DEBUG, secret_key=settings.SECRET_KEY, fernet_keys=settings.KIROPOOL_FERNET_KEYS
    )
    if not problems:
        return None
    lines = "\n".join(f"  - {problem}" for problem in problems)
    return (
        "kiropool refuses to start: DEBUG is off and the secrets are missing or public.\n"
        f"{lines}\n"
        "Set them in the environment of every process (README, Deploying); "
        "`python manage.py secrets_generate` prints a fresh pair.\n"
        f"On a development machine, `make run` generates local ones into {settings.LOCAL_SECRETS_FILE}."
    )


def secrets_require() -> None:
    """Raise :class:`UnsafeSecrets` unless the settings' secrets may be used
    (for code that a server imports: the WSGI and ASGI modules)."""
    refusal = secrets_refusal()
    if refusal:
        raise UnsafeSecrets(refusal)


def secrets_require_or_exit() -> None:
    """Exit with the refusal on stderr, without a traceback (for command
    lines: manage.py, the web server's launcher, Celery's worker and beat)."""
    refusal = secrets_refusal()
    if refusal:
        sys.stderr.write(refusal + "\n")
        sys.stderr.flush()
        raise SystemExit(1)


def manage_py_guard(argv: Sequence[str]) -> None:
    """manage.py's check, before Django runs the command: harmless commands
    pass, every other one needs the secrets."""
    subcommand = argv[1] if len(argv) > 1 else "help"
    if subcommand.startswith("-") or subcommand in HARMLESS_COMMANDS:  # --help, --version
        return
    _settings_options_apply(argv)
    secrets_require_or_exit()


def _settings_options_apply(argv: Sequence[str]) -> None:
    # The guard reads the settings before Django does, so it honours
    # --settings and --pythonpath exactly as ManagementUtility.execute would.
    from django.core.management.base import CommandError, CommandParser, handle_default_options

    parser = CommandParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--settings")
    parser.add_argument("--pythonpath")
    parser.add_argument("args", nargs="*")
    try:
        options, _ = parser.parse_known_args(list(argv[2:]))
    except CommandError:
        return
    handle_default_options(options)
