"""The operator API's tokens in the admin, without their secrets.

DRF registers its ``TokenAdmin``, which lists every token's key: any staff
user given the token permissions could read a superuser's key and act as
them over the operator API, or make one for them. Here only superusers
reach tokens (who can act as anyone already): the list shows whose tokens
exist and when they were made, not their keys, and a superuser may revoke
one (delete it); nobody makes one there. ``manage.py drf_create_token
<user>`` makes one and prints it once, to the person at the shell.
"""

from __future__ import annotations

from django.contrib import admin
from rest_framework.authtoken.admin import TokenAdmin
from rest_framework.authtoken.models import TokenProxy


class OperatorTokenAdmin(TokenAdmin):
    list_display = ("user", "created")
    fields = ("user", "created")
    readonly_fields = ("user", "created")

    def has_module_permission(self, request) -> bool:
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request, obj=None) -> bool:
        return self.has_module_permission(request)

    def has_add_permission(self, request) -> bool:
        return False  # a key made here would have to be shown here

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return self.has_module_permission(request)


def operator_tokens_register(site: admin.AdminSite) -> None:
    """Put :class:`OperatorTokenAdmin` in the place of DRF's on ``site``."""
    if site.is_registered(TokenProxy):
        site.unregister(TokenProxy)
    site.register(TokenProxy, OperatorTokenAdmin)
