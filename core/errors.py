"""The one error shape: ``{"error": {"type": ..., "message": ...}}``.

Views and services raise the typed exceptions below (or DRF's own); the
exception handler, installed for every API in settings, renders them all the
same way. Nothing raised for bad input ever becomes a 500."""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# Validation error codes that say more than "the request is malformed". A
# request the schema allows may still be refused by the pool's state or by a
# rule the schema cannot express; those answers must not be 400, which says
# "you broke the schema" (and is what a schema fuzzer checks). "unique": the
# name is taken (409). "does_not_exist": it names an object there is none of;
# RULE_ERROR: a rule across fields or against the stored object (422).
CONFLICT_CODES = frozenset({"unique"})
RULE_ERROR = "rule"
RULE_CODES = frozenset({"does_not_exist", RULE_ERROR})


class ApiError(exceptions.APIException):
    """Base of the domain errors; ``status_code`` picks the type."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "invalid request"


class InvalidRequest(ApiError):
    status_code = status.HTTP_400_BAD_REQUEST


class NotFound(ApiError):
    status_code = status.HTTP_404_NOT_FOUND
    default_detail = "not found"


class Conflict(ApiError):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "conflict"


class KeyRefused(ApiError, exceptions.AuthenticationFailed):
    """The dispatch's key was disabled, deleted or expired while it waited.
    An authentication failure to DRF too, so the 401 names its scheme
    (``WWW-Authenticate``) like the one before the wait."""

    status_code = status.HTTP_401_UNAUTHORIZED
    default_detail = "invalid, disabled or expired API key"


class RuleViolation(ApiError):
    """Well-formed, but against a rule the schema cannot express (422)."""

    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "the request breaks a rule of the pool"


class RateLimited(ApiError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_detail = "rate limited"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, int(retry_after))


class AllAccountsFailed(ApiError):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = "all eligible accounts failed for this request"


class NoUsableAccount(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "no usable account is configured"


class ServiceUnavailable(ApiError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "service temporarily unavailable"


def error_type(status_code: int) -> str:
    if status_code >= 500:
        return "api_error"
    return ERROR_TYPES.get(status_code, "invalid_request_error")


def error_body(status_code: int, message: str) -> dict:
    return {"error": {"type": error_type(status_code), "message": message}}


def _message(detail) -> str:
    """Flatten DRF's nested validation detail into one readable sentence."""
    if isinstance(detail, dict):
        parts = []
        for field, value in detail.items():
            text = _message(value)
            parts.append(text if field == "non_field_errors" else f"{field}: {text}")
        return "; ".join(parts)
    if isinstance(detail, list):
        return "; ".join(_message(item) for item in detail)
    return str(detail)


class DependencyUnavailable(Exception):
    """Raised by a service when something it depends on cannot serve (the
    handler answers 503 with ``public_message``; the exception's own text is
    logged, never sent)."""

    public_message = "a dependency of this service is unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    default_detail = "the database is unavailable; retry shortly"


def exception_handler(exc, context):
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, (OperationalError, InterfaceError)):
        # The database went away (restart, failover, network): a clean 503 the
        # gateway can retry, not a 500. Django drops the broken connection at
        # the end of the request and the next one reconnects.
        logger.warning("database unavailable during %s", _view_name(context), exc_info=True)
        exc = DatabaseUnavailable()
    elif isinstance(exc, IntegrityError):
        # A write broke a database constraint on the hot path (a counter
        # below zero, a race the services did not foresee). Its transaction
        # rolled back, so nothing is half done: the gateway may retry.
        logger.error("integrity error during %s", _view_name(context), exc_info=True)
        exc = DatabaseUnavailable("a conflicting write was refused by the database; retry shortly")
    elif isinstance(exc, exceptions.ValidationError):
        exc = _validation_error_refined(exc)
    elif isinstance(exc, DependencyUnavailable):
        logger.error("%s: %s", exc.public_message, exc)
        exc = ServiceUnavailable(exc.public_message)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    response.data = error_body(response.status_code, _message(exc.detail))
    if isinstance(exc, RateLimited):
        response["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, DatabaseUnavailable):
        response["Retry-After"] = "1"
    return response


def _error_codes(codes) -> set[str]:
    if isinstance(codes, dict):
        return set().union(*(_error_codes(value) for value in codes.values()))
    if isinstance(codes, list):
        return set().union(*(_error_codes(value) for value in codes))
    return {codes}


def _validation_error_refined(exc: exceptions.ValidationError) -> exceptions.APIException:
    """409 when only uniqueness (and rules) refused the request, 422 when only
    rules did; any other error keeps it a 400."""
    codes = _error_codes(exc.get_codes())
    if not codes or not codes <= CONFLICT_CODES | RULE_CODES:
        return exc
    refined = Conflict if codes & CONFLICT_CODES else RuleViolation
    return refined(_message(exc.detail))


def _view_name(context) -> str:
    view = (context or {}).get("view")
    return type(view).__name__ if view is not None else "a request"
