from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Pool"

    def ready(self) -> None:
        from accounts import (
            checks,  # noqa: F401  registers the credentials-key checks
            signals,  # noqa: F401  the key cache forgets saved keys
        )
        from accounts.authentication import KEY_CHANNEL, key_cache
        from core import listener

        # Keys saved in other processes are forgotten here too (PostgreSQL;
        # on SQLite nothing is sent or listened to).
        listener.handle(KEY_CHANNEL, key_cache.heard)
