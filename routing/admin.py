from __future__ import annotations

from django.contrib import admin, messages
from django.utils import timezone

from accounts.admin import ProxyUrlAdminMixin
from accounts.models import Account
from routing import sessions
from routing.models import CooldownEvent, LatencySample, LatencySnapshot, Lease, SessionBinding


class ReadOnlyAdmin(admin.ModelAdmin):
    """History and machine-written state: operators look, they do not edit."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class AccountListFilter(admin.RelatedFieldListFilter):
    """Accounts to filter by, by name: Django's filter loads every account
    whole, decrypting each one's credentials (and failing on a row no
    configured key decrypts) to show its name."""

    def field_choices(self, field, request, model_admin):
        return list(Account.objects.order_by("name").values_list("pk", "name"))


class AccountShownByNameAdmin(ReadOnlyAdmin):
    """Rows listed with their account (its name): the account's credentials
    are neither read nor decrypted."""

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("account").defer("account__credentials")


class LiveFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "live"

    def lookups(self, request, model_admin):
        return [("yes", "live"), ("no", "expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "yes":
            return queryset.filter(expires_at__gt=now)
        if self.value() == "no":
            return queryset.filter(expires_at__lte=now)
        return queryset


@admin.register(SessionBinding)
class SessionBindingAdmin(AccountShownByNameAdmin):
    list_display = ["session_id", "api_key", "account", "updated_at", "expires_at"]
    list_filter = [LiveFilter, "api_key", "account__identity"]
    list_select_related = ["api_key", "account"]
    search_fields = ["session_id", "account__name", "api_key__name"]
    actions = ["unbind"]

    @admin.action(description="Unbind selected sessions", permissions=["delete"])
    def unbind(self, request, queryset):
        count = sessions.session_unbind(bindings=queryset)
        self.message_user(request, f"Unbound {count} sessions.", messages.SUCCESS)

    # The admin's own delete page and "delete selected" unbind too.
    def delete_model(self, request, obj):
        sessions.session_unbind(bindings=SessionBinding.objects.filter(pk=obj.pk))

    def delete_queryset(self, request, queryset):
        sessions.session_unbind(bindings=queryset)


class ProxyUrlShownMaskedAdmin(ProxyUrlAdminMixin, ReadOnlyAdmin):
    """Rows that record the proxy URL a request went through: its page shows
    it with the password masked, in place of the column."""

    proxy_url_field = "proxy_url"
    exclude = ["proxy_url"]
    readonly_fields = ["masked_url"]


@admin.register(Lease)
class LeaseAdmin(ProxyUrlShownMaskedAdmin):
    list_display = ["id", "account_name", "api_key", "session_id", "started_at", "completed_at", "outcome"]
    list_filter = ["outcome", "identity"]
    list_select_related = ["api_key"]
    search_fields = ["account_name", "session_id", "id"]
    date_hierarchy = "started_at"

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(LatencySample)
class LatencySampleAdmin(ProxyUrlShownMaskedAdmin, AccountShownByNameAdmin):
    list_display = ["account", "masked_url", "first_token_ms", "recorded_at"]
    list_filter = [("account", AccountListFilter)]
    list_select_related = ["account"]
    date_hierarchy = "recorded_at"


@admin.register(LatencySnapshot)
class LatencySnapshotAdmin(ReadOnlyAdmin):
    list_display = ["generated_at", "global_avg_ms", "sample_count", "window_seconds", "bands_whole_at"]


@admin.register(CooldownEvent)
class CooldownEventAdmin(AccountShownByNameAdmin):
    list_display = ["created_at", "kind", "identity", "proxy", "account", "until", "reason"]
    list_filter = ["kind"]
    list_select_related = ["identity", "proxy", "account"]
