"""What the kiropool server said no with, as exceptions.

Every answer of the server that is not a success becomes a
:class:`KiropoolError` carrying the server's error ``type`` and ``message``
(``{"error": {"type", "message"}}``, SPEC §5), one subclass per status. The
upstream call's own failures are a different family: see
:mod:`kiropool_client.outcomes`."""

from __future__ import annotations

from typing import Any


class KiropoolError(Exception):
    """An error answer of the kiropool server (or no answer at all)."""

    status_code: int | None = None

    def __init__(self, message: str, *, type: str, status_code: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.type = type
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f"{self.status_code} " if self.status_code is not None else ""
        return f"{status}{self.type}: {self.message}"


class InvalidRequest(KiropoolError):
    status_code = 400


class AuthenticationFailed(KiropoolError):
    status_code = 401


class PermissionDenied(KiropoolError):
    status_code = 403


class NotFound(KiropoolError):
    status_code = 404


class Conflict(KiropoolError):
    """409: e.g. the lease was already completed, or expired before its completion."""

    status_code = 409


class RateLimited(KiropoolError):
    """429: every candidate is cooling down, or a limit of the key is reached;
    ``retry_after`` says when to ask again (seconds)."""

    status_code = 429


class AllAccountsFailed(KiropoolError):
    """502: every account of the key is in ``exclude_accounts``: each one already failed this request."""

    status_code = 502


class ServiceUnavailable(KiropoolError):
    """503 (or another 5xx): no usable account is configured for the key (no
    ``retry_after``), or the server could not serve for a while (its database
    was away) and still could not after the client's retries."""

    status_code = 503


class ConnectionFailed(KiropoolError):
    """No answer from the server (connection refused, reset, timed out), after the retries that were safe."""

    def __init__(self, message: str):
        super().__init__(message, type="connection_error")


class FailoverExhausted(Exception):
    """``call_with_failover`` used all its attempts; ``errors`` holds each attempt's
    exception, ``tried`` the accounts that failed, and ``__cause__`` the last error."""

    def __init__(self, attempts: int, tried: list[str], errors: list[BaseException]):
        last = errors[-1] if errors else None
        super().__init__(f"{attempts} attempt(s) failed (accounts tried: {', '.join(tried) or 'none'}); last: {last!r}")
        self.attempts = attempts
        self.tried = tried
        self.errors = errors


_BY_STATUS: dict[int, type[KiropoolError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    502: AllAccountsFailed,
    503: ServiceUnavailable,
}


def error_from_response(status: int, body: Any, retry_after: float | None) -> KiropoolError:
    """The exception for one error answer. ``body`` is the parsed JSON, or None."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict) and isinstance(detail.get("type"), str) and isinstance(detail.get("message"), str):
        kind, message = detail["type"], detail["message"]
    else:
        kind, message = (
            ("api_error" if status >= 500 else "invalid_request_error"),
            f"HTTP {status} without an error body",
        )
    cls = _BY_STATUS.get(status, ServiceUnavailable if status >= 500 else InvalidRequest)
    return cls(message, type=kind, status_code=status, retry_after=retry_after)
