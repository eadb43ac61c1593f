"""System checks for kiropool's own security settings (``manage.py check``;
the deploy-only ones with ``--deploy``). Registered in ``AccountsConfig.ready``."""

from __future__ import annotations

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from accounts import fields
from accounts.throttling import parse_rate


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


@checks.register()
def rates_valid(app_configs, **kwargs) -> list[checks.CheckMessage]:
    errors = []
    for name in ("KIROPOOL_DISPATCH_RATE", "KIROPOOL_EXPLAIN_RATE", "KIROPOOL_CAPACITY_REPORT_RATE"):
        try:
            parse_rate(getattr(settings, name))
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(f"{name}: {exc}", id="kiropool.E002"))
    return errors
