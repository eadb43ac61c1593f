from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Pool"

    def ready(self) -> None:
        from accounts import (
            checks,  # noqa: F401  registers the credentials-key and rate checks
            signals,  # noqa: F401  the key cache forgets saved keys
        )
