from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing"

    def ready(self) -> None:
        from django.conf import settings
        from django.db import connection

        from routing.backend import backend_configure

        backend_configure(vendor=connection.vendor, fast_statements=settings.KIROPOOL_FAST_STATEMENTS)
