"""The pure parts of the client: upstream exceptions to completions, the
Retry-After header, and decoding answers into the typed results. No server."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import pytest
from kiropool_client import (
    Completion,
    Dispatched,
    UpstreamFatal,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRetryNext,
    completion_from_exception,
)
from kiropool_client.errors import AllAccountsFailed, InvalidRequest, ServiceUnavailable, error_from_response
from kiropool_client.outcomes import retry_after_seconds
from kiropool_client.types import DecodeError, decode


def http_error(status: int, **headers: str) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://upstream.invalid/generate")
    return httpx.HTTPStatusError(str(status), request=request, response=httpx.Response(status, headers=headers))


@pytest.mark.parametrize(
    ("exc", "outcome", "cooldown", "abandoned"),
    [
        (UpstreamRateLimited("429", retry_after=12.2), "rate_limited", 13, False),
        (UpstreamRateLimited("429"), "rate_limited", None, False),
        (UpstreamQuotaExhausted("402"), "quota_exhausted", None, False),
        (UpstreamRetryNext("500"), "retry_next", None, False),
        (UpstreamFatal("400"), "fatal", None, False),
        (http_error(429, **{"Retry-After": "7"}), "rate_limited", 7, False),
        (http_error(503), "retry_next", None, False),
        (http_error(408), "retry_next", None, False),
        (http_error(400), "fatal", None, False),
        (httpx.ConnectError("refused"), "retry_next", None, False),
        # Not the upstream's doing: given up, the account not blamed.
        (ValueError("a bug"), "fatal", None, True),
        (KeyboardInterrupt(), "fatal", None, True),
    ],
)
def test_an_upstream_exception_maps_to_its_outcome(exc, outcome, cooldown, abandoned):
    completion = completion_from_exception(exc)
    assert (completion.outcome, completion.cooldown_seconds, completion.abandoned) == (outcome, cooldown, abandoned)
    assert completion.to_json().get("abandoned", False) is abandoned
    assert completion.error_message.startswith(type(exc).__name__)


def test_a_classifier_goes_first_and_may_decline():
    def classify(exc):
        return Completion(outcome="quota_exhausted") if "credits" in str(exc) else None

    assert completion_from_exception(RuntimeError("no credits"), classify).outcome == "quota_exhausted"
    assert completion_from_exception(RuntimeError("other"), classify).outcome == "fatal"


def test_retry_after_reads_seconds_and_http_dates():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert retry_after_seconds("30") == 30
    assert retry_after_seconds("Thu, 01 Jan 2026 12:01:00 GMT", now=now) == 60
    assert retry_after_seconds("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    assert retry_after_seconds("nan") is None


def test_error_answers_become_typed_exceptions():
    error = error_from_response(400, {"error": {"type": "invalid_request_error", "message": "bad"}}, None)
    assert isinstance(error, InvalidRequest) and (error.type, error.message, error.status_code) == (
        "invalid_request_error",
        "bad",
        400,
    )
    assert isinstance(error_from_response(502, None, None), AllAccountsFailed)
    proxy_said = error_from_response(504, "<html>gateway timeout</html>", None)
    assert isinstance(proxy_said, ServiceUnavailable) and "without an error body" in proxy_said.message


DISPATCHED = {
    "lease_id": "5b0c7b3e-8f4e-4b8a-9a55-0d5d0a0f6c11",
    "account": {
        "name": "a",
        "routing_identity": "i",
        "pool": "balanced",
        "proxy_url": None,
        "region": "us-east-1",
        "profile_arn": "",
    },
    "session": "new",
    "expires_at": "2026-01-01T12:15:00Z",
    "waited_ms": 0,
    "added_by_a_newer_server": True,
}


def test_decode_builds_typed_results_and_ignores_unknown_fields():
    dispatched = decode(Dispatched, DISPATCHED)
    assert dispatched.lease_id == uuid.UUID(DISPATCHED["lease_id"])
    assert dispatched.expires_at == dt.datetime(2026, 1, 1, 12, 15, tzinfo=dt.UTC)
    assert dispatched.account.proxy_url is None and dispatched.account.credentials is None


@pytest.mark.parametrize(
    "change",
    [
        {"waited_ms": True},  # a bool is not an int in JSON
        {"waited_ms": "0"},
        {"session": "maybe"},
        {"lease_id": "not-a-uuid"},
        {"account": None},
        {"expires_at": None},
    ],
)
def test_decode_refuses_what_the_schema_does_not_allow(change):
    with pytest.raises(DecodeError):
        decode(Dispatched, {**DISPATCHED, **change})
    missing = {k: v for k, v in DISPATCHED.items() if k != "waited_ms"}
    with pytest.raises(DecodeError, match="waited_ms"):
        decode(Dispatched, missing)
