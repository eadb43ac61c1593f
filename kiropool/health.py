"""Operations endpoints: ``/healthz`` (the process answers), ``/readyz``
(the database and the Celery broker are reachable, checked at most once per
``READINESS_CACHE_SECONDS`` per process) and ``/metrics`` (Prometheus text
format).

Plain Django views, outside DRF: probes and scrapers carry no session or
token, and a probe must not depend on the machinery it is probing. They answer
JSON like every other endpoint, errors in the one error shape."""

from __future__ import annotations

import functools
import hmac
import logging
import os

import kombu
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt

from core.database import PING_TIMEOUT_SECONDS, database_ping
from core.errors import error_body
from core.recent import RecentValue
from routing import metrics

logger = logging.getLogger(__name__)


def get_only(view):
    """Django's ``require_GET``, refusing in the one error shape: its own
    405 is an empty HTML page.

    Exempt from CSRF: a view that answers GET only changes nothing, so there
    is nothing for the check to guard, and the check ran first: a POST, PUT
    or DELETE got Django's 403 HTML page instead of this 405."""

    @functools.wraps(view)
    def guarded(request, *args, **kwargs):
        if request.method != "GET":
            response = JsonResponse(error_body(405, f'Method "{request.method}" not allowed.'), status=405)
            response["Allow"] = "GET"
            return response
        return view(request, *args, **kwargs)

    return csrf_exempt(guarded)


@never_cache
@get_only
def healthz(request):
    return JsonResponse({"status": "ok"})


def _readiness() -> dict[str, str]:
    return {"database": _check(database_ping), "broker": _check(_broker_ping)}


# The answer is reused for a few seconds in this process (core/recent.py):
# probes come every few seconds anyway, and the endpoint is open, so a flood of
# anonymous requests must not become a flood of broker connections.
READINESS_CACHE_SECONDS = 5.0
readiness = RecentValue(_readiness, seconds=READINESS_CACHE_SECONDS)


@receiver(setting_changed)
def _readiness_forget(**kwargs) -> None:
    # An answer belongs to the broker and database it was computed against.
    readiness.clear()


@never_cache
@get_only
def readyz(request):
    checks = dict(readiness.get())
    down = [name for name, result in checks.items() if result != "ok"]
    if not down:
        return JsonResponse({"status": "ok", "checks": checks})
    body = error_body(503, f"not ready: {' and '.join(down)} unreachable")
    body["checks"] = checks
    return JsonResponse(body, status=503)


def _check(ping) -> str:
    try:
        ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        logger.warning("readiness check %s failed", ping.__name__, exc_info=True)
        # The class, not the message: the message may name hosts or users.
        return f"down ({type(exc).__name__})"
    return "ok"


def _broker_ping() -> None:
    url = settings.CELERY_BROKER_URL
    if url.startswith("filesystem://"):
        # kombu's filesystem transport is two folders; "reachable" means there
        # and writable by this process.
        options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
        for folder in {options.get("data_folder_in"), options.get("data_folder_out")}:
            if not folder or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
                raise FileNotFoundError("broker folder missing or not writable")
        return
    # The database ping's limit (core/database.py): a probe must answer well
    # within a load balancer's or kubelet's own timeout (commonly 1-5 s), even
    # when the broker's host swallows packets.
    timeout = PING_TIMEOUT_SECONDS
    with kombu.Connection(
        url, connect_timeout=timeout, transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout}
    ) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.1, interval_max=0.1)


@never_cache
@get_only
def metrics_view(request):
    """Prometheus exposition. Open unless ``KIROPOOL_METRICS_TOKEN`` is set,
    then it wants ``Authorization: Bearer <that token>``."""
    token = settings.KIROPOOL_METRICS_TOKEN
    if token:
        presented = request.headers.get("Authorization", "")
        if not hmac.compare_digest(presented.encode(), f"Bearer {token}".encode()):
            response = JsonResponse(error_body(401, "metrics need the configured bearer token"), status=401)
            response["WWW-Authenticate"] = 'Bearer realm="kiropool-metrics"'
            return response
    body, content_type = metrics.exposition()
    return HttpResponse(body, content_type=content_type)
