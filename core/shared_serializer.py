"""One serializer instance per process for the hot gateway endpoints.

DRF deep-copies a serializer's declared fields for every new instance, and on
the dispatch and completion paths that copy cost more than the validation
itself. A :class:`SharedSerializer` builds its serializer once, its fields
bound once, then validates with ``run_validation`` and renders with
``to_representation``: neither keeps anything on the instance, so the
server's threads share it. The serializer class stays the one definition of
the fields, their validation and the schema (drf-spectacular reads the class).
"""

from __future__ import annotations

import threading
from typing import Any

from rest_framework import serializers


class SharedSerializer:
    def __init__(self, serializer_class: type[serializers.Serializer]) -> None:
        self.serializer_class = serializer_class
        self._instance: serializers.Serializer | None = None
        self._lock = threading.Lock()

    def _built(self) -> serializers.Serializer:
        if self._instance is None:
            with self._lock:
                if self._instance is None:
                    instance = self.serializer_class()
                    _bind(instance)
                    self._instance = instance
        return self._instance

    def validate(self, data: Any) -> dict:
        """The validated data, or ``ValidationError`` with the same detail
        ``is_valid(raise_exception=True)`` raises."""
        return self._built().run_validation(data)

    def render(self, obj: Any) -> dict:
        return self._built().to_representation(obj)


def _bind(serializer: serializers.Serializer) -> None:
    """Build every (nested) field list now, before threads share them."""
    for field in serializer.fields.values():
        if isinstance(field, serializers.Serializer):
            _bind(field)
        elif isinstance(field, serializers.ListSerializer | serializers.ListField) and isinstance(
            field.child, serializers.Serializer
        ):
            _bind(field.child)
