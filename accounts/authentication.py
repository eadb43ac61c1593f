"""Gateway authentication: ``Authorization: Bearer <key>`` or ``x-api-key``."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from accounts.models import ApiKey, hash_key, key_prefix

# last_used_at is for humans; writing it on every dispatch would add a write
# to the hot path, so it is refreshed at most this often.
LAST_USED_RESOLUTION = timedelta(seconds=60)

KEY_BY_PREFIX_SQL = f"SELECT * FROM {ApiKey._meta.db_table} WHERE prefix = %s"


@dataclass(frozen=True)
class GatewayPrincipal:
    """``request.user`` for a gateway: authenticated, never staff, so no
    operator endpoint or page accepts it."""

    api_key: ApiKey
    is_authenticated: bool = True
    is_staff: bool = False
    is_superuser: bool = False
    is_active: bool = True

    def __str__(self) -> str:
        return f"api key {self.api_key.name}"


def presented_key(request) -> str | None:
    header = authentication.get_authorization_header(request).decode("latin-1").strip()
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    value = request.META.get("HTTP_X_API_KEY", "").strip()
    return value or None


def api_key_authenticate(plaintext: str) -> ApiKey | None:
    """The usable key for this plaintext, or None. The prefix finds the row;
    the hash is compared in constant time."""
    prefix = key_prefix(plaintext)
    if prefix is None:
        return None
    # The key row alone, in plain SQL: this runs on every gateway request, and
    # compiling the ORM query took longer than running it.
    key = next(iter(ApiKey.objects.raw(KEY_BY_PREFIX_SQL, [prefix])), None)
    if key is None or not hmac.compare_digest(key.key_hash, hash_key(plaintext)):
        return None
    now = timezone.now()
    if not key.is_usable(now):
        return None
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        plaintext = presented_key(request)
        if plaintext is None:
            return None
        key = api_key_authenticate(plaintext)
        if key is None:
            raise exceptions.AuthenticationFailed("invalid, disabled or expired API key")
        return GatewayPrincipal(key), key

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (not 403) when no key is presented.
        return 'Bearer realm="kiropool"'


class HasApiKey(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, ApiKey)
