from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db import IntegrityError
from django.db.models import BooleanField, ExpressionWrapper, Prefetch, Q, prefetch_related_objects
from django.db.models.constants import LOOKUP_SEP
from django.shortcuts import redirect
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import capfirst

from accounts import services
from accounts.models import Account, AccountGroup, ApiKey, Proxy, RoutingIdentity
from accounts.permissions import GRANT_CREDENTIALS_ACCESS, group_widening_refusal
from accounts.proxy_urls import proxy_url_masked, proxy_url_unmasked
from accounts.resources import PoolImportExportMixin
from routing.models import CooldownEvent, Lease


def accounts_by_name():
    """Accounts for a page that shows them by name (a choice, a member, a
    key's fixed account): their credentials are neither read nor decrypted,
    so one that no configured key decrypts does not break the page."""
    return Account.objects.defer("credentials")


class PoolModelForm(forms.ModelForm):
    def changed_columns(self) -> list[str]:
        """The model columns this form changed: all that saving it may write."""
        model = self._meta.model
        editable = {field.name for field in model._meta.concrete_fields if field.editable and not field.primary_key}
        return [name for name in self.changed_data if name in editable]


class PoolModelAdmin(admin.ModelAdmin):
    """Saving an edited row writes only the columns the operator changed
    (``save(update_fields=...)``), never the whole row: the dispatcher updates
    the same rows at the same time (``in_flight``, ``binding_rows``, last
    started, cooldowns, quota, credits), and a whole-row save would put back
    the values read when the form was posted. A new row is a plain insert."""

    form = PoolModelForm
    # Editable columns the dispatcher writes too. Their form fields carry the
    # value the page was rendered with, so "changed" means the operator
    # changed it, not that a gateway did since the page was opened.
    dispatcher_written_fields: tuple[str, ...] = ()

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if field is not None and db_field.name in self.dispatcher_written_fields:
            field.show_hidden_initial = True
        return field

    def save_model(self, request, obj, form, change):
        if change:
            obj.save(update_fields=form.changed_columns())  # an empty list writes nothing
        else:
            obj.save()

    def delete_view(self, request, object_id, extra_context=None):
        try:
            return super().delete_view(request, object_id, extra_context)
        except IntegrityError:
            # A dispatch started a lease on it meanwhile (the lease's foreign
            # key is checked at commit): nothing was deleted, as the operator
            # API's 409 says.
            self.message_user(
                request,
                f"A lease started on this {self.opts.verbose_name} while it was being deleted: nothing was deleted.",
                messages.ERROR,
            )
            return redirect(request.path)


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


class CooldownAdminMixin:
    """The admin of rows the dispatcher cools down (identities, proxies): the
    cooldown left as a column and a filter, an action that clears it
    through :meth:`cooldown_clear`, and an edit of it recorded in the
    history as those are (``services.cooldown_edit_save``)."""

    list_filter = [CoolingFilter]
    dispatcher_written_fields = ("cooldown_until", "cooldown_reason")
    actions = ["clear_cooldown"]

    def cooldown_clear(self, queryset) -> int:
        raise NotImplementedError

    def save_model(self, request, obj, form, change):
        # Only the changed columns, as PoolModelAdmin writes them, and a
        # cooldown set or cleared here goes into the history.
        services.cooldown_edit_save(row=obj, columns=form.changed_columns() if change else None)

    @admin.display(description="cooldown left")
    def cooldown(self, obj):
        if obj.cooldown_until and obj.cooldown_until > timezone.now():
            left = int((obj.cooldown_until - timezone.now()).total_seconds())
            return f"{left} s ({obj.cooldown_reason or 'no reason'})"
        return "—"

    @admin.action(description="Clear cooldown of selected %(verbose_name_plural)s", permissions=["change"])
    def clear_cooldown(self, request, queryset):
        count = self.cooldown_clear(queryset)
        self.message_user(
            request, f"Cleared the cooldown of {count} {self.opts.verbose_name_plural}.", messages.SUCCESS
        )


@admin.register(RoutingIdentity)
class RoutingIdentityAdmin(CooldownAdminMixin, PoolImportExportMixin, PoolModelAdmin):
    list_display = ["name", "max_concurrency", "min_start_interval_ms", "in_flight", "cooldown", "last_started_at"]
    search_fields = ["name"]
    readonly_fields = ["in_flight", "last_started_at", "created_at"]

    def cooldown_clear(self, queryset) -> int:
        return services.identity_cooldown_clear(identities=queryset)

    def get_deleted_objects(self, objs, request):
        # Its leases and cooldown events are its history and go with it, as
        # over the operator API (an open lease's key slot is given back:
        # routing/signals.py). No one may delete those rows by themselves,
        # so the admin's usual check refused every identity that had served
        # a lease, naming a permission nobody has.
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        history = {Lease._meta.verbose_name, CooldownEvent._meta.verbose_name}
        return deleted, counts, perms_needed - history, protected


class ProxyUrlAdminMixin:
    """The admin of rows holding a proxy URL (the column ``proxy_url_field``):
    shown with its password masked (``masked_url``, which sorts nothing), and
    never filtered by it: ``?url__startswith=http://user:a`` would tell the
    password one guessed character at a time (a 400 instead). Keep the column
    out of ``search_fields`` for the same reason."""

    proxy_url_field = "url"

    @admin.display(description="proxy URL")
    def masked_url(self, obj):
        return proxy_url_masked(getattr(obj, self.proxy_url_field)) or "—"

    def lookup_allowed(self, lookup, value, request=None):
        if lookup.split(LOOKUP_SEP)[0] == self.proxy_url_field:
            return False
        return super().lookup_allowed(lookup, value, request)


class MaskedUrlInput(forms.TextInput):
    """A proxy URL with its password masked, the stored one or one just typed
    (a form shown again after an error sends no password back)."""

    def format_value(self, value):
        return super().format_value(None if value is None else proxy_url_masked(str(value)))


class ProxyAdminForm(PoolModelForm):
    """The URL is shown masked; sent back as shown, it keeps the stored
    password (and is no change), as the operator API does."""

    class Meta:
        model = Proxy
        fields = ["name", "url", "cooldown_until", "cooldown_reason"]
        widgets = {"url": MaskedUrlInput(attrs={"class": "vTextField"})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None and "url" in self.fields:
            self.initial["url"] = proxy_url_masked(self.instance.url)

    def clean_url(self):
        stored = self.instance.url if self.instance.pk is not None else None
        return proxy_url_unmasked(self.cleaned_data["url"], stored=stored)

    def full_clean(self):
        super().full_clean()
        # The page comes back with a password just typed masked: say so, or
        # saving it again would keep the stored password instead.
        typed = str(self.data.get(self.add_prefix("url"), ""))
        if self._errors and "url" not in self._errors and proxy_url_masked(typed) != typed:
            self.add_error("url", "Not saved, and not shown again: type the password again.")


@admin.register(Proxy)
class ProxyAdmin(ProxyUrlAdminMixin, CooldownAdminMixin, PoolImportExportMixin, PoolModelAdmin):
    form = ProxyAdminForm
    list_display = ["name", "masked_url", "cooldown"]
    search_fields = ["name"]

    def get_fields(self, request, obj=None):
        # One who may only look sees the URL as a read-only value: masked.
        fields = [f for f in super().get_fields(request, obj) if f != "masked_url"]
        if obj is not None and not self.has_change_permission(request, obj):
            fields = ["masked_url" if f == "url" else f for f in fields]
        return fields

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and not self.has_change_permission(request, obj):
            fields.append("masked_url")
        return fields

    def cooldown_clear(self, queryset) -> int:
        return services.proxy_cooldown_clear(proxies=queryset)


class WriteOnlyTextarea(forms.Textarea):
    """A text area never filled in by the server, as ``PasswordInput`` is not:
    a form shown again after an error does not send back what was typed."""

    def format_value(self, value):
        return None


class AccountAdminForm(PoolModelForm):
    """Credentials are write-only: neither the stored value nor one just typed
    is ever put in the page. The quota state is shown, not edited: it changes
    through completions and the reset-quota action, which keep its history
    and its probe time, as over the operator API."""

    new_credentials = forms.JSONField(
        required=False,
        label="Credentials",
        widget=WriteOnlyTextarea(attrs={"rows": 4, "autocomplete": "off"}),
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
            "min_remaining_credits",
            "quota_resets_at",
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

    def full_clean(self):
        super().full_clean()
        # The page comes back with the field empty: say so, or saving it again
        # would silently keep the stored credentials instead of the new ones.
        typed = str(self.data.get(self.add_prefix("new_credentials"), "")).strip()
        if self._errors and typed and "new_credentials" not in self._errors:
            self.add_error("new_credentials", "Not saved, and not shown again: enter the credentials again.")

    def changed_columns(self) -> list[str]:
        new = ["credentials"] if self.cleaned_data.get("new_credentials") is not None else []
        return super().changed_columns() + new


@admin.register(Account)
class AccountAdmin(PoolImportExportMixin, PoolModelAdmin):
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
    readonly_fields = [
        "credentials_stored",
        "quota_exhausted",
        "quota_exhausted_at",
        "quota_exhausted_reason",
        "binding_rows",
        "created_at",
    ]
    dispatcher_written_fields = ("remaining_credits", "quota_resets_at")
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

    def save_model(self, request, obj, form, change):
        # Only the changed columns, as PoolModelAdmin writes them; a balance
        # set at or below the minimum gets its probe time.
        services.account_edit_save(account=obj, columns=form.changed_columns() if change else None)

    @admin.display(description="credentials stored", boolean=True)
    def credentials_stored(self, obj):
        return getattr(obj, "has_credentials", False)  # a new, unsaved account has none

    @admin.action(description="Enable selected accounts", permissions=["change"])
    def enable(self, request, queryset):
        count = services.account_enabled_set(accounts=queryset, enabled=True)
        self.message_user(request, f"Enabled {count} accounts.", messages.SUCCESS)

    @admin.action(description="Disable selected accounts", permissions=["change"])
    def disable(self, request, queryset):
        count = services.account_enabled_set(accounts=queryset, enabled=False)
        self.message_user(request, f"Disabled {count} accounts.", messages.SUCCESS)

    @admin.action(description="Reset quota of selected accounts", permissions=["change"])
    def reset_quota(self, request, queryset):
        count = services.account_quota_reset(accounts=queryset)
        self.message_user(request, f"Reset the quota of {count} accounts.", messages.SUCCESS)


class AccountGroupAdminForm(PoolModelForm):
    # Whether the operator may hand credentials out (set per request by the admin).
    may_grant_credentials = False

    def clean_accounts(self):
        accounts = self.cleaned_data["accounts"]
        if not self.may_grant_credentials and self.instance.pk is not None:
            refusal = group_widening_refusal(self.instance, accounts.values_list("pk", flat=True))
            if refusal:
                raise forms.ValidationError(capfirst(refusal) + ".")
        return accounts


@admin.register(AccountGroup)
class AccountGroupAdmin(PoolImportExportMixin, PoolModelAdmin):
    form = AccountGroupAdminForm
    list_display = ["name", "account_count"]
    search_fields = ["name"]
    filter_horizontal = ["accounts"]

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        form.may_grant_credentials = request.user.has_perm(GRANT_CREDENTIALS_ACCESS)
        return form

    def get_object(self, request, object_id, from_field=None):
        # The form starts from the members read here, by name: never decrypted.
        group = super().get_object(request, object_id, from_field)
        if group is not None:
            prefetch_related_objects([group], Prefetch("accounts", queryset=accounts_by_name()))
        return group

    def formfield_for_manytomany(self, db_field, request, **kwargs):
        if db_field.name == "accounts":
            kwargs["queryset"] = accounts_by_name()
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    @admin.display(description="accounts")
    def account_count(self, obj):
        return obj.accounts.count()


@admin.register(ApiKey)
class ApiKeyAdmin(PoolModelAdmin):
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

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("account_group", "fixed_account")
            .defer("fixed_account__credentials")
        )

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "fixed_account":
            kwargs["queryset"] = accounts_by_name()
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.display(description="key")
    def masked_key(self, obj):
        return f"kp_{obj.prefix}_…" if obj.prefix else "—"

    def get_readonly_fields(self, request, obj=None):
        # Without the grant, the box is shown as a value, not as a checkbox, and a
        # forged POST of it is ignored: the form has no such field.
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.has_perm(GRANT_CREDENTIALS_ACCESS):
            fields.append("credentials_access")
        return fields

    def has_change_permission(self, request, obj=None):
        # A key that hands out credentials is changed only by those who may grant
        # that: re-pointing it (group, fixed account, enabled, expiry) chooses
        # whose secrets it receives. Others see its page read-only.
        if obj is not None and obj.credentials_access and not request.user.has_perm(GRANT_CREDENTIALS_ACCESS):
            return False
        return super().has_change_permission(request, obj)

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

    @admin.action(description="Enable selected keys", permissions=["change"])
    def enable(self, request, queryset):
        if not request.user.has_perm(GRANT_CREDENTIALS_ACCESS):
            held = queryset.filter(enabled=False, credentials_access=True).count()
            if held:
                self.message_user(
                    request,
                    f"Left {held} keys with credentials access disabled: enabling them needs the permission "
                    f"to grant credentials access.",
                    messages.WARNING,
                )
            queryset = queryset.filter(credentials_access=False)
        count = services.api_key_enabled_set(keys=queryset, enabled=True)
        self.message_user(request, f"Enabled {count} keys.", messages.SUCCESS)

    @admin.action(description="Disable selected keys", permissions=["change"])
    def disable(self, request, queryset):
        count = services.api_key_enabled_set(keys=queryset, enabled=False)
        self.message_user(request, f"Disabled {count} keys.", messages.SUCCESS)
