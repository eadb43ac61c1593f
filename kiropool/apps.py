from django.contrib.admin.apps import AdminConfig


class KiropoolAdminConfig(AdminConfig):
    """``django.contrib.admin`` with kiropool's site as ``admin.site``."""

    default_site = "kiropool.admin_site.KiropoolAdminSite"

    def ready(self) -> None:
        super().ready()  # every app's admin module registered
        from kiropool.token_admin import operator_tokens_register

        operator_tokens_register(self.module.site)
