"""System checks for kiropool's own security settings (``manage.py check``;
the deploy-only ones with ``--deploy``). Registered in ``AccountsConfig.ready``."""

from __future__ import annotations

from django.core import checks

from accounts import fields


@checks.register(checks.Tags.security)
def fernet_keys_valid(app_configs, **kwargs) -> list[checks.CheckMessage]:
    """A malformed key would make every credentials read or write fail: say so at startup."""
    try:
        fields.fernet()
    except fields.CredentialsKeyError as exc:
        return [
            checks.Error(
                str(exc),
                hint='Generate keys with: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"',
                id="kiropool.E001",
            )
        ]
    return []


@checks.register(checks.Tags.security, deploy=True)
def fernet_keys_set(app_configs, **kwargs) -> list[checks.CheckMessage]:
    if fields.configured_keys():
        return []
    return [
        checks.Warning(
            "KIROPOOL_FERNET_KEYS is not set: account credentials are encrypted with a key derived from "
            "SECRET_KEY, so rotating SECRET_KEY would make them unreadable and one leaked secret exposes both.",
            hint="Set KIROPOOL_FERNET_KEYS to one or more Fernet keys (see README, Deploying).",
            id="kiropool.W001",
        )
    ]
