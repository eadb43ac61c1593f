"""Serializers of the operator API (SPEC §5): the pool, read and written by
name. Reads carry the live figures the selectors annotate. Writes take JSON
strictly as the schema says (a malformed one is a 400), then validate like
the admin does (the model's own clean and check constraints; a rule the
schema cannot express is a 422, a taken name a 409), never a database error.
The shared machinery is in accounts/serializer_base.py."""

from __future__ import annotations

import math
from datetime import datetime

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import MaxLengthValidator
from django.utils import timezone
from rest_framework import serializers

from accounts import services
from accounts.models import (
    MAX_PREFERENCE_ACCOUNTS,
    MAX_PREFERENCE_MODELS,
    MAX_PREFERENCE_NAME_LENGTH,
    Account,
    AccountGroup,
    ApiKey,
    Proxy,
    RoutingIdentity,
    validate_model_preferences,
)
from accounts.proxy_urls import PASSWORD_MASK, proxy_url_masked, proxy_url_unmasked
from accounts.serializer_base import (
    ChangedFieldsUpdateMixin,
    ModelCleanMixin,
    NameRelatedField,
    StrictModelSerializer,
)
from core.errors import RULE_ERROR
from core.serializer_fields import StrictCharField, StrictDictField, StrictListField


def cooldown_remaining_s(until: datetime | None) -> int:
    """Whole seconds of cooldown left, rounded up; 0 when not cooling down."""
    if until is None:
        return 0
    return max(0, math.ceil((until - timezone.now()).total_seconds()))


class CooldownEditMixin:
    """Identities and proxies: a cooldown set, changed or cleared by an edit
    is recorded in the history, as the clear-cooldown action records its
    clearing (``services.cooldown_edit_save``)."""

    def create(self, validated_data):
        row = self.Meta.model(**validated_data)
        services.cooldown_edit_save(row=row, columns=None)
        return row

    def columns_save(self, instance, columns: list[str]) -> None:
        services.cooldown_edit_save(row=instance, columns=columns)


class RoutingIdentitySerializer(CooldownEditMixin, ChangedFieldsUpdateMixin, ModelCleanMixin, StrictModelSerializer):
    """A routing identity: one upstream Kiro user, whose accounts share its
    concurrency, pacing, cooldown and load."""

    in_flight = serializers.IntegerField(
        source="live_leases", read_only=True, help_text="Leases in flight (uncompleted, within their TTL)."
    )
    live_sessions = serializers.IntegerField(read_only=True, help_text="Live bound sessions of all its accounts.")
    cooldown_remaining_s = serializers.SerializerMethodField()

    class Meta:
        model = RoutingIdentity
        fields = [
            "name",
            "max_concurrency",
            "min_start_interval_ms",
            "cooldown_until",
            "cooldown_reason",
            "cooldown_remaining_s",
            "in_flight",
            "live_sessions",
            "last_started_at",
            "created_at",
        ]
        read_only_fields = ["last_started_at", "created_at"]

    def get_cooldown_remaining_s(self, identity) -> int:
        return cooldown_remaining_s(identity.cooldown_until)


class ProxySerializer(CooldownEditMixin, ChangedFieldsUpdateMixin, ModelCleanMixin, StrictModelSerializer):
    """An egress proxy that account traffic goes through. Its URL is read with
    the password masked; written back masked and otherwise unchanged, it keeps
    the stored password."""

    cooldown_remaining_s = serializers.SerializerMethodField()

    class Meta:
        model = Proxy
        fields = ["name", "url", "cooldown_until", "cooldown_reason", "cooldown_remaining_s", "created_at"]
        read_only_fields = ["created_at"]
        extra_kwargs = {
            "url": {
                "help_text": (
                    f"Read with its password masked (`http://user:{PASSWORD_MASK}@host:port`). Written whole; "
                    f"sent back as read, it keeps the stored password (a masked password with any other "
                    f"change is refused)."
                )
            }
        }

    def get_cooldown_remaining_s(self, proxy) -> int:
        return cooldown_remaining_s(proxy.cooldown_until)

    def validate_url(self, value: str) -> str:
        return proxy_url_unmasked(value, stored=self.instance.url if self.instance is not None else None)

    def to_representation(self, proxy):
        data = super().to_representation(proxy)
        data["url"] = proxy_url_masked(data["url"])
        return data


class AccountSerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, StrictModelSerializer):
    """An account: a credential for a routing identity, with the live figures
    of its identity. Credentials are write-only."""

    identity = NameRelatedField(queryset=RoutingIdentity.objects.all(), help_text="Routing identity, by name.")
    proxy = NameRelatedField(
        queryset=Proxy.objects.all(), allow_null=True, required=False, help_text="Egress proxy, by name."
    )
    credentials = StrictDictField(
        write_only=True,
        required=False,
        help_text="JSON object of upstream secrets. Write-only: never returned; omit it to keep what is stored.",
    )
    has_credentials = serializers.SerializerMethodField()
    live_sessions = serializers.IntegerField(read_only=True, help_text="Live session bindings on this account.")
    in_flight = serializers.IntegerField(
        source="live_leases", read_only=True, help_text="Leases in flight on its routing identity."
    )
    max_concurrency = serializers.IntegerField(
        source="identity.max_concurrency", read_only=True, help_text="Its routing identity's limit."
    )
    cooldown_remaining_s = serializers.SerializerMethodField(help_text="Its routing identity's cooldown left.")
    proxy_cooldown_remaining_s = serializers.SerializerMethodField()

    class Meta:
        model = Account
        fields = [
            "name",
            "identity",
            "proxy",
            "pool",
            "enabled",
            "remaining_credits",
            "min_remaining_credits",
            "quota_exhausted",
            "quota_exhausted_at",
            "quota_exhausted_reason",
            "quota_resets_at",
            "region",
            "profile_arn",
            "credentials",
            "has_credentials",
            "live_sessions",
            "in_flight",
            "max_concurrency",
            "cooldown_remaining_s",
            "proxy_cooldown_remaining_s",
            "created_at",
        ]
        # Quota state changes through the services (completions, reset-quota),
        # which also keep its history.
        read_only_fields = ["quota_exhausted", "quota_exhausted_at", "quota_exhausted_reason", "created_at"]

    def get_has_credentials(self, account) -> bool:
        # Annotated by the selector, which never loads the secrets themselves.
        return bool(account.has_credentials)

    def get_cooldown_remaining_s(self, account) -> int:
        return cooldown_remaining_s(account.identity.cooldown_until)

    def get_proxy_cooldown_remaining_s(self, account) -> int:
        return cooldown_remaining_s(account.proxy.cooldown_until if account.proxy else None)

    def validate_remaining_credits(self, value):
        if value is not None and not math.isfinite(value):
            raise serializers.ValidationError("must be a finite number")
        return value

    # A balance set at or below the minimum gets its probe time
    # (services.account_edit_save), as a reported one does.
    def create(self, validated_data):
        account = Account(**validated_data)
        services.account_edit_save(account=account, columns=None)
        return account

    def columns_save(self, instance, columns: list[str]) -> None:
        services.account_edit_save(account=instance, columns=columns)


class AccountGroupSerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, StrictModelSerializer):
    """A named set of accounts an API key can be limited to."""

    accounts = NameRelatedField(
        queryset=Account.objects.defer("credentials"), many=True, required=False, help_text="Account names."
    )

    class Meta:
        model = AccountGroup
        fields = ["name", "accounts", "created_at"]
        read_only_fields = ["created_at"]


class ApiKeySerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, StrictModelSerializer):
    """An API key a gateway authenticates with; the plaintext is never shown
    after creation."""

    account_group = NameRelatedField(
        queryset=AccountGroup.objects.all(),
        allow_null=True,
        required=False,
        help_text="Limit `auto` routing to this group (by name); null routes over the whole pool.",
    )
    fixed_account = NameRelatedField(
        queryset=Account.objects.defer("credentials"),
        allow_null=True,
        required=False,
        help_text="The one account of a `fixed` key (by name).",
    )
    model_preferences = StrictDictField(
        child=StrictListField(
            child=StrictCharField(max_length=MAX_PREFERENCE_NAME_LENGTH, trim_whitespace=False),
            max_length=MAX_PREFERENCE_ACCOUNTS,
        ),
        validators=[
            MaxLengthValidator(
                MAX_PREFERENCE_MODELS, message=f"At most {MAX_PREFERENCE_MODELS} models may have preferences."
            )
        ],
        required=False,
        help_text=(
            "Model name → names of existing accounts tried first for that model. Model names are 1 to "
            f"{MAX_PREFERENCE_NAME_LENGTH} characters (a longer or empty one could never match a request)."
        ),
    )
    masked_key = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "masked_key",
            "enabled",
            "account_group",
            "route_strategy",
            "fixed_account",
            "preferred_pool",
            "latency_routing_enabled",
            "max_concurrency",
            "min_start_interval_ms",
            "model_preferences",
            "credentials_access",
            "sticky_patience_ms",
            "expires_at",
            "in_flight",
            "last_started_at",
            "last_used_at",
            "created_at",
        ]
        read_only_fields = ["in_flight", "last_started_at", "last_used_at", "created_at"]

    def get_masked_key(self, key) -> str:
        return f"kp_{key.prefix}_…"

    def validate_model_preferences(self, value):
        # The field checked the shape and its bounds, so an oversized mapping
        # costs no query. What the model still refuses (a model name of the
        # wrong length: OpenAPI 3.0 cannot constrain object keys) is a rule.
        try:
            validate_model_preferences(value)  # the module's function, not this method
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages, code=RULE_ERROR) from exc
        named = {name for names in value.values() for name in names}
        known = set(Account.objects.filter(name__in=named).values_list("name", flat=True))
        unknown = sorted(named - known)
        if unknown:
            raise serializers.ValidationError(f"unknown accounts: {', '.join(unknown)}", code="does_not_exist")
        return value


class ApiKeyCreatedSerializer(ApiKeySerializer):
    """A new API key, with its plaintext: shown this once."""

    key = serializers.CharField(read_only=True, help_text="The plaintext key. Shown this once, never again.")

    class Meta(ApiKeySerializer.Meta):
        fields = ["key", *ApiKeySerializer.Meta.fields]
