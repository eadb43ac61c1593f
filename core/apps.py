from django.apps import AppConfig


class CoreConfig(AppConfig):
    """What every app shares and nothing of theirs: the one error shape, the
    schema helpers, strict serializer fields, the request guard, the probe
    cache, and the helper that starts the web app. It imports no app."""

    name = "core"
    verbose_name = "Core"
