"""Account credentials, encrypted at rest.

The database holds a Fernet token (AES-128-CBC + HMAC-SHA256, with a
timestamp) of the JSON object, never the JSON itself; an empty object is
stored as the empty string, so "has credentials" stays a plain query.

Keys come from ``KIROPOOL_FERNET_KEYS``: comma-separated Fernet keys, the
first encrypts and every one decrypts (``MultiFernet``), so a key is rotated
by putting the new one first, running ``manage.py rotate_credentials_key``,
and then dropping the old one. Without the variable a key is derived from
``SECRET_KEY``: only a process with ``DEBUG`` on starts that way
(kiropool/secrets_guard.py), and ``check --deploy`` warns about it.

Decrypted credentials are a :class:`SecretDict`: a real ``dict`` (equality,
``json.dumps``) whose ``repr``/``str`` never show the values, so a log line,
a traceback or a debugger that prints one shows nothing secret.
"""

from __future__ import annotations

import base64
import functools
import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import models

from core.errors import DependencyUnavailable

# Domain separation: the derived development key is useless for anything
# else SECRET_KEY signs, and vice versa.
DEVELOPMENT_KEY_INFO = b"kiropool account credentials v1"

UNDECRYPTABLE = (
    "stored credentials cannot be decrypted with any key in KIROPOOL_FERNET_KEYS "
    "(was the key that encrypted them removed, or SECRET_KEY changed while no key was set?)"
)


class CredentialsKeyError(ImproperlyConfigured, DependencyUnavailable):
    """Stored credentials cannot be decrypted with any configured key, or a
    configured key is not a Fernet key. Never carries the data itself."""

    public_message = "the account's credentials cannot be decrypted with the configured keys"


class SecretDict(dict):
    """Decrypted credentials: a dict that does not print its values."""

    def __repr__(self) -> str:
        return f"<credentials: {len(self)} field(s), redacted>"

    __str__ = __repr__


def development_key(secret_key: str) -> bytes:
    """A Fernet key derived from ``SECRET_KEY`` (HKDF-SHA256)."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DEVELOPMENT_KEY_INFO).derive(
        secret_key.encode()
    )
    return base64.urlsafe_b64encode(derived)


def configured_keys() -> list[str]:
    return [key.strip() for key in getattr(settings, "KIROPOOL_FERNET_KEYS", []) if key and key.strip()]


@functools.lru_cache(maxsize=8)
def _fernets(keys: tuple[str, ...], secret_key: str) -> tuple[Fernet, ...]:
    if not keys:
        return (Fernet(development_key(secret_key)),)
    fernets = []
    for position, key in enumerate(keys, start=1):
        try:
            fernets.append(Fernet(key))
        except ValueError as exc:
            # The position, not the value: the message may end up in a log.
            raise CredentialsKeyError(
                f"KIROPOOL_FERNET_KEYS entry {position} is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from exc
    return tuple(fernets)


def fernet(*, also_development_key: bool = False) -> MultiFernet:
    """The current ``MultiFernet`` (keys parsed once per settings value, so
    tests that override them get fresh ones); optionally also decrypting with
    the key derived from ``SECRET_KEY``."""
    keys = tuple(configured_keys())
    fernets = _fernets(keys, "" if keys else settings.SECRET_KEY)
    if also_development_key and keys:
        fernets = (*fernets, Fernet(development_key(settings.SECRET_KEY)))
    return MultiFernet(fernets)


def encrypt(value: dict) -> str:
    """The token stored for ``value`` ("" for an empty object)."""
    if not value:
        return ""
    payload = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    return fernet().encrypt(payload).decode("ascii")


def decrypt(token: str) -> SecretDict:
    if not token:
        return SecretDict()
    try:
        payload = fernet().decrypt(token.encode("ascii"))
    except (InvalidToken, UnicodeEncodeError) as exc:
        raise CredentialsKeyError(UNDECRYPTABLE) from exc
    return SecretDict(json.loads(payload))


def rotate(token: str, *, also_development_key: bool = False) -> str:
    """The same credentials re-encrypted under the first (newest) key;
    optionally also decrypting with the key derived from ``SECRET_KEY``."""
    if not token:
        return token
    try:
        return fernet(also_development_key=also_development_key).rotate(token.encode("ascii")).decode("ascii")
    except (InvalidToken, UnicodeEncodeError) as exc:
        raise CredentialsKeyError(UNDECRYPTABLE) from exc


def is_token(value: str) -> bool:
    """Whether ``value`` looks like a Fernet token (version byte 0x80)."""
    return value.startswith("gAAAAA")


class EncryptedJSONField(models.TextField):
    """A JSON object stored as a Fernet token in a text column.

    Reads give a :class:`SecretDict`. No form renders it (``formfield`` is
    None: forms take new credentials in a separate write-only field), and
    lookups other than ``exact``/``isnull`` are refused, since they could only
    ever compare ciphertext."""

    description = "JSON object, encrypted at rest"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("default", dict)
        kwargs.setdefault("blank", True)
        super().__init__(*args, **kwargs)

    def from_db_value(self, value, expression, connection):
        return decrypt(value or "")

    def to_python(self, value):
        if value is None or value == "":
            return SecretDict()
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            if is_token(value):  # dumpdata/loaddata carry the token
                return decrypt(value)
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValidationError("Credentials must be a JSON object.", code="invalid") from exc
            if isinstance(value, dict):
                return value
        raise ValidationError("Credentials must be a JSON object.", code="invalid")

    def validate(self, value, model_instance):
        if not isinstance(value, dict):
            raise ValidationError("Credentials must be a JSON object.", code="invalid")
        super().validate(value, model_instance)

    def get_prep_value(self, value):
        if value is None or value == "":
            return ""
        if not isinstance(value, dict):
            raise TypeError("credentials must be a JSON object (a dict)")
        return encrypt(value)

    def value_to_string(self, obj):
        # Serialization (dumpdata) writes the token, never the plaintext.
        return self.get_prep_value(self.value_from_object(obj))

    def formfield(self, **kwargs):
        return None

    def get_lookup(self, lookup_name):
        if lookup_name not in ("exact", "isnull"):
            return None
        return super().get_lookup(lookup_name)
