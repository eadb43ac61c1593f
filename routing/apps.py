from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing"

    def ready(self) -> None:
        """Decide once what the database can do (routing/backend.py),
        connect the receivers of routing/signals.py, and have the process's
        listener wake waiting dispatches on a release (core/listener.py)."""
        from django.conf import settings
        from django.db import connection

        from core import listener
        from routing import (
            pg,
            signals,  # noqa: F401  an operator's edit wakes waiters and writes missing bands
            wakeups,
        )
        from routing.backend import backend

        backend.postgres = connection.vendor == "postgresql"
        backend.pooled = bool(connection.settings_dict.get("OPTIONS", {}).get("pool"))
        backend.statements = pg.Statements() if backend.postgres and settings.KIROPOOL_FAST_STATEMENTS else None
        if backend.postgres:
            pg.statement_cache_widen()
            listener.handle(wakeups.CHANNEL, wakeups.heard)
