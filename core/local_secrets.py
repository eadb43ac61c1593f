"""Development secrets for one checkout, so `make run` needs no environment.

``manage.py secrets_generate --local`` (run by `make run`, `make migrate` and
`make demo`) writes a fresh ``SECRET_KEY`` and Fernet key once into
``settings.LOCAL_SECRETS_FILE`` (``var/local-secrets.env``, git-ignored),
readable by its owner only, and never rewrites it: credentials stored under
that key must stay readable on the next run. Settings read the file when it
exists; real environment variables (and ``.env``) win over it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

NAMES = ("SECRET_KEY", "KIROPOOL_FERNET_KEYS")
MODE = 0o600

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", re.MULTILINE)


@dataclass(frozen=True)
class LocalSecrets:
    """What :func:`local_secrets_ensure` found or did.

    ``state``: ``created`` (written now), ``kept`` (the file was there),
    ``environment`` (the environment sets both variables: no file needed).
    ``missing``: variables neither the file nor the environment sets.
    ``mode_fixed``: the file was readable by others and was made 0600."""

    state: str
    missing: tuple[str, ...] = ()
    mode_fixed: bool = False


def secret_key_generate() -> str:
    # 50 random bytes: 67 url-safe characters, past Django's 50-character check.
    return secrets.token_urlsafe(50)


def fernet_key_generate() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def local_secrets_ensure(path: Path, *, environ: Mapping[str, str]) -> LocalSecrets:
    """Make sure this checkout has its development secrets in ``path``,
    generating them only if the file does not exist yet."""
    if path.exists():
        mode_fixed = _mode_tighten(path)
        present = set(_ASSIGNMENT.findall(path.read_text()))
        missing = tuple(name for name in NAMES if name not in present and not environ.get(name))
        return LocalSecrets("kept", missing, mode_fixed)
    if all(environ.get(name) for name in NAMES):
        return LocalSecrets("environment")
    return LocalSecrets("created") if _write_once(path, _contents()) else local_secrets_ensure(path, environ=environ)


def _contents() -> str:
    generated = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"# kiropool development secrets for this checkout, generated {generated} by `make run`.\n"
        "# Never use them in production: set SECRET_KEY and KIROPOOL_FERNET_KEYS there (README, Deploying).\n"
        "# Deleting this file makes the account credentials stored under this Fernet key unreadable.\n"
        f"SECRET_KEY={secret_key_generate()}\n"
        f"KIROPOOL_FERNET_KEYS={fernet_key_generate()}\n"
    )


def _write_once(path: Path, text: str) -> bool:
    """Write ``text`` to a new ``path``, mode 0600 from the first byte; False
    if the file appeared meanwhile (another `make run`), which then wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary file, linked into place only when complete: an
    # interrupted run leaves no half-written secrets, and the link fails
    # rather than replaces if the file exists.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".local-secrets-")
    try:
        os.fchmod(fd, MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return True


def _mode_tighten(path: Path) -> bool:
    if stat.S_IMODE(path.stat().st_mode) & 0o077 == 0:
        return False
    path.chmod(MODE)
    return True
