"""Per-API-key rate limits of the gateway endpoints, counted in the cache.

A fixed window per key: the first request of a window creates a counter with
``add`` and every request bumps it with ``incr``, both atomic in Redis, so all
processes and hosts share one count per key. (A fixed window can let twice the
rate through across a window boundary; as a guard against a runaway or hostile
gateway that is plenty, and it costs two cache round trips, no locks.)

Rates come from settings (``KIROPOOL_DISPATCH_RATE``, ``KIROPOOL_EXPLAIN_RATE``)
as ``"<count>/<period>"`` with a period of s, min, h or d (DRF's notation);
empty turns the limit off. Over the limit: 429 ``rate_limit_error`` with
``Retry-After`` (DRF's ``Throttled``, rendered by the one exception handler).

The cache failing must not take dispatch down with it: when it cannot be
reached the request is let through and a warning logged (once a minute).
"""

from __future__ import annotations

import logging
import math
import time

from django.conf import settings
from django.core.cache import caches
from rest_framework.throttling import BaseThrottle

from accounts.models import ApiKey
from core.rates import parse_rate

logger = logging.getLogger(__name__)

WARN_EVERY_SECONDS = 60.0
_last_warning = 0.0


class ApiKeyRateThrottle(BaseThrottle):
    """Subclasses name the setting holding their rate and a cache scope."""

    setting = ""
    scope = ""

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request, view) -> bool:
        if not isinstance(request.auth, ApiKey):
            return True
        self._wait = key_rate_take(request.auth, scope=self.scope, rate=getattr(settings, self.setting))
        return self._wait is None

    def wait(self) -> float | None:
        return self._wait


def key_rate_take(key: ApiKey, *, scope: str, rate: str) -> float | None:
    """Count one event of ``scope`` for ``key`` against ``rate``: None when
    it is within the rate (or no rate is set, or the cache is down), else
    the seconds until the window ends."""
    parsed = parse_rate(rate)
    if parsed is None:
        return None
    limit, seconds = parsed
    now = time.time()
    window = int(now // seconds)
    # The id and the random lookup prefix: a key deleted and its id reused
    # (SQLite) starts from zero rather than inheriting a count.
    used = _count(f"kiropool:rate:{scope}:{key.pk}:{key.prefix}:{window}", seconds)
    if used is None or used <= limit:
        return None
    return max(1.0, math.ceil((window + 1) * seconds - now))


def _count(key: str, seconds: int) -> int | None:
    cache = caches["default"]
    try:
        cache.add(key, 0, timeout=seconds + 1)
        try:
            return cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=seconds + 1)
            return 1
    except Exception:  # noqa: BLE001 - fail open: a cache outage must not stop dispatch
        _warn_cache_down()
        return None


def _warn_cache_down() -> None:
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= WARN_EVERY_SECONDS:
        _last_warning = now
        logger.warning("rate limiting is off: the cache is unreachable", exc_info=True)


class DispatchRateThrottle(ApiKeyRateThrottle):
    setting = "KIROPOOL_DISPATCH_RATE"
    scope = "dispatch"


class ExplainRateThrottle(ApiKeyRateThrottle):
    setting = "KIROPOOL_EXPLAIN_RATE"
    scope = "explain"
