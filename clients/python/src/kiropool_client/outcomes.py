"""How an upstream call ended, as the completion kiropool needs.

A gateway raises these from inside a lease when the upstream (Kiro) call
fails; the lease maps the exception to its outcome on exit:

=============================  ===================  ==========================================
raise                          outcome              kiropool then
=============================  ===================  ==========================================
``UpstreamRateLimited``        ``rate_limited``     cools the identity for ``retry_after`` s
``UpstreamQuotaExhausted``     ``quota_exhausted``  takes every alias of the identity out
``UpstreamRetryNext``          ``retry_next``       releases; the next attempt excludes it
``UpstreamFatal``              ``fatal``            releases; the request is given up
=============================  ===================  ==========================================

``httpx.HTTPStatusError`` from the upstream call maps by status (429 →
``rate_limited`` with its ``Retry-After``, 408/5xx → ``retry_next``, other 4xx
→ ``fatal``), an ``httpx.TransportError`` to ``retry_next``. Anything else (a
bug, ``KeyboardInterrupt``, a cancelled task) is ``fatal`` and ``abandoned``:
the gateway gave the request up, and nothing is blamed on the account (it
counts toward no ejection of its identity)."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
from collections.abc import Callable
from typing import ClassVar

import httpx

from kiropool_client.types import MAX_ERROR_MESSAGE, Completion, Outcome


class UpstreamError(Exception):
    """The upstream call failed in a way that is the account's business.
    Base class: maps to ``retry_next``."""

    outcome: ClassVar[Outcome] = "retry_next"

    def __init__(self, message: str = "", *, remaining_credits: float | None = None):
        super().__init__(message)
        self.remaining_credits = remaining_credits


class UpstreamRetryNext(UpstreamError):
    """Any other upstream failure worth trying on another account."""


class UpstreamRateLimited(UpstreamError):
    """The upstream answered 429. ``retry_after`` (seconds, from its
    ``Retry-After``) sets the cooldown; ``proxy_failure`` cools the proxy too."""

    outcome = "rate_limited"

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        proxy_failure: bool = False,
        remaining_credits: float | None = None,
    ):
        super().__init__(message, remaining_credits=remaining_credits)
        self.retry_after = retry_after
        self.proxy_failure = proxy_failure


class UpstreamQuotaExhausted(UpstreamError):
    outcome = "quota_exhausted"


class UpstreamFatal(UpstreamError):
    """The request cannot succeed anywhere (e.g. the prompt is invalid): stop."""

    outcome = "fatal"


# Returns None to fall back to the default mapping.
Classifier = Callable[[BaseException], "Completion | None"]


def retry_after_seconds(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """A ``Retry-After`` header (delta-seconds or HTTP-date) in seconds, or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def completion_from_exception(exc: BaseException, classify: Classifier | None = None) -> Completion:
    """The completion that reports ``exc`` (raised by the upstream call) to kiropool."""
    if classify is not None:
        custom = classify(exc)
        if custom is not None:
            return custom
    message = error_message(exc)
    if isinstance(exc, UpstreamRateLimited):
        return Completion(
            outcome="rate_limited",
            cooldown_seconds=cooldown_seconds(exc.retry_after),
            proxy_failure=exc.proxy_failure,
            remaining_credits=exc.remaining_credits,
            error_message=message,
        )
    if isinstance(exc, UpstreamError):
        return Completion(outcome=exc.outcome, remaining_credits=exc.remaining_credits, error_message=message)
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        if status == 429:
            retry_after = retry_after_seconds(exc.response.headers.get("retry-after"))
            return Completion(
                outcome="rate_limited", cooldown_seconds=cooldown_seconds(retry_after), error_message=message
            )
        outcome: Outcome = "retry_next" if status == 408 or status >= 500 else "fatal"
        return Completion(outcome=outcome, error_message=message)
    if isinstance(exc, httpx.TransportError):
        return Completion(outcome="retry_next", error_message=message)
    return Completion(outcome="fatal", error_message=message, abandoned=True)


def cooldown_seconds(retry_after: float | None) -> int | None:
    """Whole seconds, rounded up so the identity is not tried a moment too early."""
    return None if retry_after is None else math.ceil(retry_after)


def error_message(exc: BaseException) -> str:
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:MAX_ERROR_MESSAGE]
