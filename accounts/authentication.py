"""Gateway authentication: ``Authorization: Bearer <key>`` or ``x-api-key``."""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from accounts.models import ApiKey, hash_key, key_prefix
from core import listener

# last_used_at is for humans; writing it on every dispatch would add a write
# to the hot path, so it is refreshed at most this often.
LAST_USED_RESOLUTION = timedelta(seconds=60)

KEY_BY_PREFIX_SQL = f"SELECT * FROM {ApiKey._meta.db_table} WHERE prefix = %s"

# The notification channel of a key changed or deleted: its payload is the
# key's prefix (on PostgreSQL a trigger sends it, accounts/migrations/0008,
# which names the channel as it was then; every process's cache forgets).
KEY_CHANNEL = "kiropool_keys"


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


class KeyCache:
    """Key rows by prefix, kept for ``KIROPOOL_KEY_CACHE_SECONDS`` in this
    process: a gateway request then costs no key query, which was a third of
    a dispatch's work. The key's counters are never read from here: its slot
    and pacing are taken by the claim statements, which read the row as it
    is. What the cache could serve stale is the key's configuration
    (enabled, expiry, limits, preferences); a save or delete through the ORM
    (admin, operator API, services) ends that at once:

    - in the process that made it, at once (``accounts/signals.py``);
    - in every other process, on PostgreSQL, as soon as the change commits,
      whether made through the ORM or not (a queryset ``update``, SQL): a
      trigger sends the key's prefix on :data:`KEY_CHANNEL` (migration
      ``accounts/0008``; not for the columns the gateway path writes), and
      each process's listener (``core/listener.py``) forgets it. So a
      process keeps keys only while its listener is connected (the first
      key it reads starts it): it forgets every key when the listener finds
      its connection lost, and again when it connects again.

    On SQLite no process hears another's changes: there the lifetime
    defaults to 0 (``kiropool/settings.py``) and nothing is kept; one an
    operator sets bounds how long another process's change, or one made
    without the ORM, goes unseen.

    A forget also stops a row read before it from being cached after it:
    :meth:`put` takes the generation :meth:`generation` gave before the read.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        self._lock = threading.Lock()
        self._forgets = 0  # the generation: every forget moves it

    def get(self, prefix: str) -> ApiKey | None:
        entry = self._entries.get(prefix)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def generation(self) -> int:
        """Take before reading a key row; pass to :meth:`put`."""
        return self._forgets

    def put(self, key: ApiKey, *, read_at: int) -> None:
        """Keep ``key``, read after :meth:`generation` gave ``read_at``,
        unless something was forgotten since: the row may be older than that."""
        ttl = settings.KIROPOOL_KEY_CACHE_SECONDS
        if ttl <= 0:
            return
        if connection.vendor == "postgresql" and not listener.ready():
            listener.ensure()  # kept once another process's save can reach this cache
            return
        with self._lock:
            if self._forgets == read_at:
                self._entries[key.prefix] = (time.monotonic() + ttl, key)

    def forget(self, prefix: str) -> None:
        with self._lock:
            self._forgets += 1
            self._entries.pop(prefix, None)

    def forget_through_commit(self, prefix: str) -> None:
        """Forget the key now, and again once the change being made commits:
        a request in between may have cached the old row."""
        self.forget(prefix)
        transaction.on_commit(lambda: self.forget(prefix))

    def clear(self) -> None:
        with self._lock:
            self._forgets += 1
            self._entries.clear()

    def heard(self, prefixes: list[str] | None) -> None:
        """The listener's handler of :data:`KEY_CHANNEL`: forget the keys
        saved elsewhere, or every key after a (re)connection, when some
        notice may have been missed."""
        if prefixes is None:
            self.clear()
            return
        for prefix in prefixes:
            self.forget(prefix)


key_cache = KeyCache()


def api_key_authenticate(plaintext: str) -> ApiKey | None:
    """The usable key for this plaintext, or None. The prefix finds the row
    (cached a moment, see :class:`KeyCache`); the hash is compared in
    constant time on every request."""
    prefix = key_prefix(plaintext)
    if prefix is None:
        return None
    key = key_cache.get(prefix)
    if key is None:
        read_at = key_cache.generation()
        # The key row alone, in plain SQL: compiling the ORM query took
        # longer than running it.
        key = next(iter(ApiKey.objects.raw(KEY_BY_PREFIX_SQL, [prefix])), None)
        if key is None:
            return None  # unknown prefixes are not cached: a key created a moment ago works at once
        key_cache.put(key, read_at=read_at)
    if not hmac.compare_digest(key.key_hash, hash_key(plaintext)):
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
