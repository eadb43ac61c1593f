"""What the sync and the async client share: the requests they send and the
judgement of each answer (done, worth another try, or an error). Only the
sending and the sleeping differ between them.

Which failures are retried, and why:

- a dispatch or an explain is retried on a connection error, a time-out, a
  503 with ``Retry-After`` (the server's database was away) and a 5xx that is
  not kiropool's (a proxy in front of it), up to ``RetryPolicy.attempts``.
  Explain changes nothing; a dispatch whose answer was lost leaves at worst
  one lease that nobody completes, which the server reaps at its TTL.
- a completion is retried on the same failures until it is acknowledged or
  ``RetryPolicy.completion_deadline_s`` has passed: an unreported lease holds
  a slot until its TTL. A 409 on a retry means an earlier try got through,
  so it counts as done.
- nothing else is retried: a 4xx will not change by asking again, and a 429
  of dispatch is for the caller to wait on (``call_with_failover`` does)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from kiropool_client._version import __version__
from kiropool_client.errors import ConnectionFailed, KiropoolError, error_from_response
from kiropool_client.outcomes import retry_after_seconds
from kiropool_client.types import Completion, DispatchRequest

DISPATCH_PATH = "/api/v1/dispatch"
EXPLAIN_PATH = "/api/v1/dispatch/explain"
SERVER_DEFAULT_WAIT_MS = 30_000

Kind = Literal["dispatch", "explain", "complete"]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    completion_deadline_s: float = 120.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


@dataclass(frozen=True)
class Call:
    kind: Kind
    path: str
    body: dict[str, Any]
    timeout: httpx.Timeout


@dataclass(frozen=True)
class Done:
    data: Any  # parsed JSON, or None for a completion found already done


@dataclass(frozen=True)
class Again:
    """Worth another try; ``error`` is what to raise when no try is left."""

    error: KiropoolError
    retry_after: float | None = None


def headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": f"kiropool-client/{__version__}"}


def timeout_of(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(seconds, 5.0))


def dispatch_call(kind: Literal["dispatch", "explain"], request: DispatchRequest, timeout: float) -> Call:
    # A dispatch may wait server-side for a free slot up to max_wait_ms: the
    # read time-out must outlast that wait, or the client gives up on a lease
    # the server is about to hand out.
    wait_s = (SERVER_DEFAULT_WAIT_MS if request.max_wait_ms is None else request.max_wait_ms) / 1000
    read = timeout + (wait_s if kind == "dispatch" else 0)
    path = DISPATCH_PATH if kind == "dispatch" else EXPLAIN_PATH
    return Call(kind, path, request.to_json(), httpx.Timeout(read, connect=min(timeout, 5.0)))


def complete_call(lease_id: uuid.UUID | str, completion: Completion, timeout: float) -> Call:
    lease = uuid.UUID(str(lease_id))  # never lets a caller's string reach the URL path unchecked
    return Call("complete", f"/api/v1/leases/{lease}/complete", completion.to_json(), timeout_of(timeout))


def judge(call: Call, response: httpx.Response, *, retried: bool) -> Done | Again:
    """Done, worth another try, or raises the server's error. ``retried``: an
    earlier try of this call may have reached the server."""
    status = response.status_code
    body = _json(response)
    if 200 <= status < 300:
        return Done(body)
    if call.kind == "complete" and status == 409 and retried:
        return Done(None)
    retry_after = retry_after_seconds(response.headers.get("retry-after"))
    error = error_from_response(status, body, retry_after)
    if (status == 503 and retry_after is not None) or (status >= 500 and not _kiropool_error(body)):
        return Again(error, retry_after)
    raise error


def transport_failure(call: Call, exc: httpx.TransportError) -> Again:
    return Again(ConnectionFailed(f"{call.kind} got no answer from kiropool: {type(exc).__name__}: {exc}"))


class Retrier:
    """Counts the tries of one call and says how long to pause before the next, or None: give up."""

    def __init__(self, call: Call, policy: RetryPolicy) -> None:
        self.call = call
        self.policy = policy
        self.attempt = 0
        self.deadline = time.monotonic() + policy.completion_deadline_s

    def pause(self, again: Again) -> float | None:
        wait = max(self.policy.backoff(self.attempt), again.retry_after or 0.0)
        if self.call.kind == "complete":
            return wait if time.monotonic() + wait < self.deadline else None
        return wait if self.attempt < self.policy.attempts else None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _kiropool_error(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "type" in body["error"]
