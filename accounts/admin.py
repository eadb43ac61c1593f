from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import BooleanField, ExpressionWrapper, Q
from django.utils import timezone
from django.utils.html import format_html

from accounts import services
from accounts.models import Account, AccountGroup, ApiKey, Proxy, RoutingIdentity


class CoolingFilter(admin.SimpleListFilter):
    title = "cooldown"
    parameter_name = "cooling"

    def lookups(self, request, model_admin):
        return [("yes", "cooling down"), ("no", "not cooling down")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "yes":
            return queryset.filter(cooldown_until__gt=now)
        if self.value() == "no":
            return queryset.exclude(cooldown_until__gt=now)
        return queryset


def _cooldown_column(obj) -> str:
    if obj.cooldown_until and obj.cooldown_until > timezone.now():
        left = int((obj.cooldown_until - timezone.now()).total_seconds())
        return f"{left} s ({obj.cooldown_reason or 'no reason'})"
    return "—"


@admin.register(RoutingIdentity)
class RoutingIdentityAdmin(admin.ModelAdmin):
    list_display = ["name", "max_concurrency", "min_start_interval_ms", "in_flight", "cooldown", "last_started_at"]
    list_filter = [CoolingFilter]
    search_fields = ["name"]
    readonly_fields = ["in_flight", "last_started_at", "created_at"]
    actions = ["clear_cooldown"]

    @admin.display(description="cooldown left")
    def cooldown(self, obj):
        return _cooldown_column(obj)

    @admin.action(description="Clear cooldown of selected identities")
    def clear_cooldown(self, request, queryset):
        count = services.identity_cooldown_clear(identities=queryset)
        self.message_user(request, f"Cleared the cooldown of {count} identities.", messages.SUCCESS)


@admin.register(Proxy)
class ProxyAdmin(admin.ModelAdmin):
    list_display = ["name", "url", "cooldown"]
    list_filter = [CoolingFilter]
    search_fields = ["name", "url"]
    actions = ["clear_cooldown"]

    @admin.display(description="cooldown left")
    def cooldown(self, obj):
        return _cooldown_column(obj)

    @admin.action(description="Clear cooldown of selected proxies")
    def clear_cooldown(self, request, queryset):
        count = services.proxy_cooldown_clear(proxies=queryset)
        self.message_user(request, f"Cleared the cooldown of {count} proxies.", messages.SUCCESS)


class AccountAdminForm(forms.ModelForm):
    """Credentials are write-only: the stored value is never put in the page."""

    new_credentials = forms.JSONField(
        required=False,
        label="Credentials",
        widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off"}),
        help_text="Write-only JSON object of upstream secrets. Leave empty to keep what is stored.",
    )

    class Meta:
        model = Account
        # Listed, not excluded, so a secret field added later stays out of the page.
        fields = [
            "name",
            "identity",
            "proxy",
            "pool",
            "enabled",
            "remaining_credits",
            "quota_exhausted",
            "quota_exhausted_reason",
            "region",
            "profile_arn",
        ]

    def clean_new_credentials(self):
        value = self.cleaned_data.get("new_credentials")
        if value in (None, "", {}):
            return None
        if not isinstance(value, dict):
            raise forms.ValidationError("Credentials must be a JSON object.")
        return value

    def save(self, commit=True):
        if self.cleaned_data.get("new_credentials") is not None:
            self.instance.credentials = self.cleaned_data["new_credentials"]
        return super().save(commit=commit)


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    form = AccountAdminForm
    list_display = [
        "name",
        "identity",
        "proxy",
        "pool",
        "enabled",
        "remaining_credits",
        "quota_exhausted",
        "region",
    ]
    list_filter = ["pool", "enabled", "quota_exhausted", "region", "proxy"]
    list_select_related = ["identity", "proxy"]
    search_fields = ["name", "identity__name", "profile_arn"]
    autocomplete_fields = ["identity"]
    readonly_fields = ["credentials_stored", "quota_exhausted_at", "binding_rows", "created_at"]
    actions = ["enable", "disable", "reset_quota"]

    def get_queryset(self, request):
        # The admin never decrypts credentials: it only needs to know whether
        # some are stored, which the (empty or not) ciphertext column tells.
        return (
            super()
            .get_queryset(request)
            .defer("credentials")
            .annotate(has_credentials=ExpressionWrapper(~Q(credentials={}), output_field=BooleanField()))
        )

    @admin.display(description="credentials stored", boolean=True)
    def credentials_stored(self, obj):
        return getattr(obj, "has_credentials", False)  # a new, unsaved account has none

    @admin.action(description="Enable selected accounts")
    def enable(self, request, queryset):
        self.message_user(request, f"Enabled {queryset.update(enabled=True)} accounts.", messages.SUCCESS)

    @admin.action(description="Disable selected accounts")
    def disable(self, request, queryset):
        self.message_user(request, f"Disabled {queryset.update(enabled=False)} accounts.", messages.SUCCESS)

    @admin.action(description="Reset quota of selected accounts")
    def reset_quota(self, request, queryset):
        count = services.account_quota_reset(accounts=queryset)
        self.message_user(request, f"Reset the quota of {count} accounts.", messages.SUCCESS)


@admin.register(AccountGroup)
class AccountGroupAdmin(admin.ModelAdmin):
    list_display = ["name", "account_count"]
    search_fields = ["name"]
    filter_horizontal = ["accounts"]

    @admin.display(description="accounts")
    def account_count(self, obj):
        return obj.accounts.count()


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "masked_key",
        "enabled",
        "route_strategy",
        "account_group",
        "fixed_account",
        "preferred_pool",
        "credentials_access",
        "last_used_at",
        "expires_at",
    ]
    list_filter = ["enabled", "route_strategy", "preferred_pool", "latency_routing_enabled", "credentials_access"]
    list_select_related = ["account_group", "fixed_account"]
    search_fields = ["name", "prefix"]
    autocomplete_fields = ["fixed_account"]
    readonly_fields = ["masked_key", "in_flight", "last_started_at", "last_used_at", "created_at"]
    actions = ["enable", "disable"]

    @admin.display(description="key")
    def masked_key(self, obj):
        return f"kp_{obj.prefix}_…" if obj.prefix else "—"

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        plaintext = obj.set_new_secret()
        super().save_model(request, obj, form, change)
        # The only time the plaintext is shown. The message waits in the
        # server-side session until the next page shows it (MESSAGE_STORAGE),
        # never in a cookie; nothing else keeps it.
        self.message_user(
            request,
            format_html(
                "Copy the key now, it will not be shown again: <code class='kiropool-new-key'>{}</code>", plaintext
            ),
            messages.WARNING,
        )

    @admin.action(description="Enable selected keys")
    def enable(self, request, queryset):
        self.message_user(request, f"Enabled {queryset.update(enabled=True)} keys.", messages.SUCCESS)

    @admin.action(description="Disable selected keys")
    def disable(self, request, queryset):
        self.message_user(request, f"Disabled {queryset.update(enabled=False)} keys.", messages.SUCCESS)
