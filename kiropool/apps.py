from django.contrib.admin.apps import AdminConfig


class KiropoolAdminConfig(AdminConfig):
    """``django.contrib.admin`` with kiropool's site as ``admin.site``."""

    default_site = "kiropool.admin_site.KiropoolAdminSite"
