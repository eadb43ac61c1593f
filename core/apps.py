from django.apps import AppConfig


class CoreConfig(AppConfig):
    """What every app shares and nothing of theirs: the one error shape, the
    schema helpers, strict serializer fields, the request guard, the probe
    cache, and the helper that starts the web app. It imports no app."""

    name = "core"
    verbose_name = "Core"

    def ready(self) -> None:
        from core import checks  # noqa: F401  registers the Server-Timing deploy check
