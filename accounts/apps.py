from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Pool"

    def ready(self) -> None:
        from django.db import connection

        from accounts import (
            checks,  # noqa: F401  registers the credentials-key and rate checks
            signals,  # noqa: F401  the key cache forgets saved keys
        )
        from accounts.authentication import KEY_CHANNEL, key_cache
        from core import listener

        if connection.vendor == "postgresql":
            # Keys saved in other processes are forgotten here too.
            listener.handle(KEY_CHANNEL, key_cache.heard)
