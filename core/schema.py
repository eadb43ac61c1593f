"""OpenAPI pieces shared by every API: the one error shape as a serializer,
ready-made error responses for ``@extend_schema``, and the description of the
gateway's API-key authentication.

Usage::

    @extend_schema(request=In, responses={200: Out, **error_responses(400, 401, 429)})
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from core.errors import error_type

ERROR_DESCRIPTIONS = {
    400: "The request is invalid (`invalid_request_error`).",
    401: "No or bad credentials (`authentication_error`).",
    403: "Authenticated, but not allowed (`permission_error`).",
    404: "No such object (`not_found_error`).",
    409: "The request conflicts with the current state, e.g. the name is taken (`conflict_error`).",
    422: (
        "Well-formed, but against a rule the schema cannot express: it names an object that does not exist, "
        "or breaks a rule across fields (`invalid_request_error`)."
    ),
    429: "Rate limited; see `Retry-After` (`rate_limit_error`).",
    502: "Every eligible account failed for this request (`api_error`).",
    503: "No usable account, or the service is not ready (`api_error`).",
}


# Named ErrorTypeEnum in the schema (SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"]).
ERROR_TYPE_CHOICES = sorted({error_type(code) for code in ERROR_DESCRIPTIONS})


class ErrorDetailSerializer(serializers.Serializer):
    type = serializers.ChoiceField(
        choices=ERROR_TYPE_CHOICES,
        help_text="Machine-readable error class; one per HTTP status family.",
    )
    message = serializers.CharField(help_text="What went wrong, for a human.")


class ErrorSerializer(serializers.Serializer):
    """``{"error": {"type": ..., "message": ...}}``: every error of every API."""

    error = ErrorDetailSerializer()


def error_responses(*status_codes: int) -> dict[int, OpenApiResponse]:
    """``{status: OpenApiResponse(ErrorSerializer)}`` for ``@extend_schema(responses=...)``."""
    return {
        code: OpenApiResponse(response=ErrorSerializer, description=ERROR_DESCRIPTIONS[code]) for code in status_codes
    }


def operator_error_responses(*status_codes: int) -> dict[int, OpenApiResponse]:
    """``error_responses`` plus the 401 and 403 every staff-only endpoint can answer."""
    return error_responses(*sorted({401, 403, *status_codes}))


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """The gateway key, sent either as a bearer token or in ``x-api-key``."""

    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = ["GatewayBearer", "GatewayApiKey"]

    def get_security_requirement(self, auto_schema):
        # Either header will do: alternatives, not a pair.
        return [{"GatewayBearer": []}, {"GatewayApiKey": []}]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer kp_...`"},
            {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "`x-api-key: kp_...`"},
        ]


# What a JSON Schema pattern says of "no NUL character" (ECMA 262 and Python alike).
NO_NUL_PATTERN = "^[^\\u0000]*$"


def request_strings_refuse_nul(result, generator, request, public):
    """drf-spectacular postprocessing hook: every string the API takes (request
    bodies, query and path parameters) refuses NUL, since PostgreSQL text
    cannot hold one; say so in the schema as a ``pattern``, where the string
    has no pattern, format or enum of its own. Responses are left alone: an
    error message may quote what the client sent."""
    components = result.get("components", {}).get("schemas", {})
    visited: set[str] = set()

    def visit(schema) -> None:
        if isinstance(schema, list):
            for item in schema:
                visit(item)
            return
        if not isinstance(schema, dict):
            return
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in visited:
                visited.add(name)
                visit(components.get(name))
            return
        if schema.get("type") == "string" and not {"pattern", "format", "enum"} & schema.keys():
            schema["pattern"] = NO_NUL_PATTERN
        for nested in schema.get("properties", {}).values():
            visit(nested)
        for key in ("items", "additionalProperties", "oneOf", "anyOf", "allOf"):
            visit(schema.get(key))

    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                visit(parameter.get("schema"))
            for media in operation.get("requestBody", {}).get("content", {}).values():
                visit(media.get("schema"))
    return result
