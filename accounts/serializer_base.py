"""What every operator serializer of the pool shares: JSON taken strictly as
the schema says (no coercion, no trimming), the model's own rules checked
like the admin checks them, references by name, and updates that write only
the columns they change."""

from __future__ import annotations

from copy import copy

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.relations import MANY_RELATION_KWARGS

from core.errors import RULE_ERROR
from core.serializer_fields import (
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictManyRelatedField,
)

NAME_MAX_LENGTH = 200


class StrictModelSerializer(serializers.ModelSerializer):
    """Model fields become the strict fields of core.serializer_fields.
    Strings are kept as sent: DRF would trim them, so a string the schema
    refuses as too long could pass once trimmed, and a blank one could fail
    though the schema allows it."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.IntegerField: StrictIntegerField,
        models.BigIntegerField: StrictIntegerField,
        models.SmallIntegerField: StrictIntegerField,
        models.PositiveIntegerField: StrictIntegerField,
        models.PositiveBigIntegerField: StrictIntegerField,
        models.PositiveSmallIntegerField: StrictIntegerField,
        models.BooleanField: StrictBooleanField,
        models.FloatField: StrictFloatField,
    }

    def build_standard_field(self, field_name, model_field):
        field_class, kwargs = super().build_standard_field(field_name, model_field)
        if issubclass(field_class, serializers.CharField):
            kwargs["trim_whitespace"] = False
        return field_class, kwargs


class ModelCleanMixin:
    """Run the model's ``full_clean`` (field validators, ``clean()`` and check
    constraints) on the instance as it would be saved, like a ModelForm does.
    Fields the serializer does not write are left out, and uniqueness is left
    to DRF's own validators. The fields have already passed their own (schema)
    checks, so what the model still refuses is a rule across fields or
    against stored state: ``RULE_ERROR`` (422)."""

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
        # A deferred column the request does not write (stored credentials)
        # stays unread, as the update leaves it: loading it would decrypt it,
        # and fail for a row no configured key decrypts.
        exclude += [name for name in instance.get_deferred_fields() if name not in attrs and name not in exclude]
        try:
            instance.full_clean(exclude=exclude, validate_unique=False)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(
                {
                    field: [serializers.ErrorDetail(message, code=RULE_ERROR) for message in messages]
                    for field, messages in exc.message_dict.items()
                }
            ) from exc
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
        self.columns_save(instance, columns)
        for name, value in many:
            getattr(instance, name).set(value)
        return instance

    def columns_save(self, instance, columns: list[str]) -> None:
        """Write the changed ``columns`` (a serializer whose model has a
        service for its edits calls it here)."""
        instance.save(update_fields=columns)  # an empty list writes nothing


def _column_value(instance, field):
    return getattr(instance, field.attname)


def _column_value_of(field, value):
    return value.pk if field.is_relation and value is not None else value


@extend_schema_field({"type": "string", "minLength": 1, "maxLength": NAME_MAX_LENGTH})
class NameRelatedField(serializers.SlugRelatedField):
    """A reference to another pool object by its unique name: a non-empty
    string. A name no object has is ``does_not_exist``, a rule the schema
    cannot express (422), not a malformed request."""

    default_error_messages = {
        "invalid": "must be a name (a non-empty string).",
        "does_not_exist": "no {model} is named {value}.",
    }

    def __init__(self, **kwargs):
        super().__init__(slug_field="name", **kwargs)

    @classmethod
    def many_init(cls, *args, **kwargs):
        # DRF's own, with a list field that takes only a JSON array.
        many = {key: value for key, value in kwargs.items() if key in MANY_RELATION_KWARGS}
        return StrictManyRelatedField(child_relation=cls(*args, **kwargs), **many)

    def run_validation(self, data=serializers.empty):
        if data == "":  # DRF would read it as null
            self.fail("invalid")
        return super().run_validation(data)

    def to_internal_value(self, data):
        if not isinstance(data, str) or not data or len(data) > NAME_MAX_LENGTH or "\x00" in data:
            self.fail("invalid")
        try:
            return self.get_queryset().get(name=data)
        except self.get_queryset().model.DoesNotExist:
            self.fail("does_not_exist", model=self.get_queryset().model._meta.verbose_name, value=repr(data))
