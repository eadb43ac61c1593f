"""Serializers of the operator API (SPEC §5): the pool, read and written by
name. Reads carry the live figures the selectors annotate; writes validate
like the admin does (field rules, then the model's own clean and check
constraints), so a bad write is a 400, never a database error."""

from __future__ import annotations

import math
from copy import copy
from datetime import datetime

from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone
from rest_framework import serializers

from accounts.models import Account, AccountGroup, ApiKey, Proxy, RoutingIdentity, validate_model_preferences


def cooldown_remaining_s(until: datetime | None) -> int:
    """Whole seconds of cooldown left, rounded up; 0 when not cooling down."""
    if until is None:
        return 0
    return max(0, math.ceil((until - timezone.now()).total_seconds()))


class ModelCleanMixin:
    """Run the model's ``full_clean`` (field validators, ``clean()`` and check
    constraints) on the instance as it would be saved, like a ModelForm does.
    Fields the serializer does not write are left out, and uniqueness is left
    to DRF's own validators."""

    def validate(self, attrs):
        attrs = super().validate(attrs)
        model = self.Meta.model
        instance = copy(self.instance) if self.instance is not None else model()
        concrete = {field.name for field in model._meta.concrete_fields}
        for name, value in attrs.items():
            if name in concrete:
                setattr(instance, name, value)
        writable = {field.source for field in self.fields.values() if not field.read_only and field.source in concrete}
        exclude = [name for name in concrete if name not in writable]
        try:
            instance.full_clean(exclude=exclude, validate_unique=False)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(serializers.as_serializer_error(exc)) from exc
        return attrs


class ChangedFieldsUpdateMixin:
    """An update writes only the columns the request changed, with
    ``save(update_fields=...)``: never the whole row. The rows carry state the
    dispatcher writes concurrently (``in_flight``, ``binding_rows``, last
    started, cooldowns, quota, credits), and a whole-row save would put back
    the values read at the start of the request. Creates are plain inserts."""

    def update(self, instance, validated_data):
        serializers.raise_errors_on_nested_writes("update", self, validated_data)
        deferred = instance.get_deferred_fields()
        columns, many = [], []
        for name, value in validated_data.items():
            field = instance._meta.get_field(name)
            if field.many_to_many:
                many.append((name, value))
                continue
            # A deferred column (credentials) is written as given: comparing would load and decrypt it.
            if name in deferred or _column_value(instance, field) != _column_value_of(field, value):
                setattr(instance, name, value)
                columns.append(name)
        instance.save(update_fields=columns)  # an empty list writes nothing
        for name, value in many:
            getattr(instance, name).set(value)
        return instance


def _column_value(instance, field):
    return getattr(instance, field.attname)


def _column_value_of(field, value):
    return value.pk if field.is_relation and value is not None else value


class NameRelatedField(serializers.SlugRelatedField):
    """A reference to another pool object by its unique name."""

    def __init__(self, **kwargs):
        super().__init__(slug_field="name", **kwargs)


class RoutingIdentitySerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, serializers.ModelSerializer):
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


class ProxySerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, serializers.ModelSerializer):
    cooldown_remaining_s = serializers.SerializerMethodField()

    class Meta:
        model = Proxy
        fields = ["name", "url", "cooldown_until", "cooldown_reason", "cooldown_remaining_s", "created_at"]
        read_only_fields = ["created_at"]

    def get_cooldown_remaining_s(self, proxy) -> int:
        return cooldown_remaining_s(proxy.cooldown_until)


class AccountSerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, serializers.ModelSerializer):
    identity = NameRelatedField(queryset=RoutingIdentity.objects.all(), help_text="Routing identity, by name.")
    proxy = NameRelatedField(
        queryset=Proxy.objects.all(), allow_null=True, required=False, help_text="Egress proxy, by name."
    )
    credentials = serializers.JSONField(
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
            "quota_exhausted",
            "quota_exhausted_at",
            "quota_exhausted_reason",
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

    def validate_credentials(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be a JSON object")
        return value

    def validate_remaining_credits(self, value):
        if value is not None and not math.isfinite(value):
            raise serializers.ValidationError("must be a finite number")
        return value


class AccountGroupSerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, serializers.ModelSerializer):
    accounts = NameRelatedField(
        queryset=Account.objects.defer("credentials"), many=True, required=False, help_text="Account names."
    )

    class Meta:
        model = AccountGroup
        fields = ["name", "accounts", "created_at"]
        read_only_fields = ["created_at"]


class ApiKeySerializer(ChangedFieldsUpdateMixin, ModelCleanMixin, serializers.ModelSerializer):
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
    model_preferences = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField(max_length=200)),
        required=False,
        help_text="Model name → account names tried first for that model.",
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
        try:  # the model's bounds first, so an oversized mapping costs no query
            validate_model_preferences(value)  # the module's function, not this method
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc
        named = {name for names in value.values() for name in names}
        known = set(Account.objects.filter(name__in=named).values_list("name", flat=True))
        unknown = sorted(named - known)
        if unknown:
            raise serializers.ValidationError(f"unknown accounts: {', '.join(unknown)}")
        return value


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The plaintext key. Shown this once, never again.")

    class Meta(ApiKeySerializer.Meta):
        fields = ["key", *ApiKeySerializer.Meta.fields]
