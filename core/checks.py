"""System checks for the settings core reads (``manage.py check --deploy``).
Registered in ``CoreConfig.ready``."""

from __future__ import annotations

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.security, deploy=True)
def server_timing_off(app_configs, **kwargs) -> list[checks.CheckMessage]:
    """The Server-Timing header is for benchmarks and debugging
    (``core/server_timing.py``): a deployment serving it tells every caller,
    a gateway's key holder or a stranger, how long each request's statements
    took."""
    if not settings.KIROPOOL_SERVER_TIMING:
        return []
    return [
        checks.Warning(
            "KIROPOOL_SERVER_TIMING is on: every response tells its caller how long the server and its "
            "database worked on it.",
            hint="Turn it off outside benchmarks and debugging (unset KIROPOOL_SERVER_TIMING).",
            id="kiropool.W002",
        )
    ]
