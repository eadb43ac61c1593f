"""The synchronous client: ``KiropoolClient`` and its ``Lease``."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import httpx

from kiropool_client import _core
from kiropool_client._lease import LeaseState
from kiropool_client.errors import FailoverExhausted, KiropoolError, RateLimited
from kiropool_client.outcomes import Classifier
from kiropool_client.types import (
    Completion,
    Dispatched,
    DispatchExplanation,
    DispatchRequest,
    LeaseCompleted,
    Outcome,
    decode,
)

logger = logging.getLogger("kiropool_client")

T = TypeVar("T")

# Ctrl-C pressed again while a lease is being completed: the completion is
# tried again this many times before the interrupt wins.
COMPLETION_INTERRUPTS_TOLERATED = 3


class KiropoolClient:
    """A gateway's client of kiropool (``Authorization: Bearer <api key>``).

    ``timeout`` is per request, in seconds (a dispatch adds its ``max_wait_ms``);
    ``classify`` maps an upstream exception to a :class:`Completion` before
    the default mapping (return None to fall back to it)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retry: _core.RetryPolicy | None = None,
        classify: Classifier | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.timeout = timeout
        self.retry = retry or _core.RetryPolicy()
        self.classify = classify
        self._http = httpx.Client(base_url=base_url, headers=_core.headers(api_key), transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KiropoolClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the three endpoints -------------------------------------------------------

    def dispatch(
        self,
        *,
        session_id: str | None = None,
        model: str | None = None,
        exclude_accounts: Sequence[str] = (),
        max_wait_ms: int | None = None,
    ) -> Dispatched:
        """Choose an account and lease it. Remember to complete the lease (or use :meth:`lease`)."""
        request = DispatchRequest(session_id, model, list(exclude_accounts), max_wait_ms)
        return decode(Dispatched, self._send(_core.dispatch_call("dispatch", request, self.timeout)))

    def explain(
        self,
        *,
        session_id: str | None = None,
        model: str | None = None,
        exclude_accounts: Sequence[str] = (),
        max_wait_ms: int | None = None,
    ) -> DispatchExplanation:
        """The order a dispatch would walk the candidates in; acquires nothing."""
        request = DispatchRequest(session_id, model, list(exclude_accounts), max_wait_ms)
        return decode(DispatchExplanation, self._send(_core.dispatch_call("explain", request, self.timeout)))

    def complete(
        self,
        lease_id: uuid.UUID | str,
        outcome: Outcome = "success",
        *,
        first_token_ms: float | None = None,
        cooldown_seconds: int | None = None,
        proxy_failure: bool = False,
        remaining_credits: float | None = None,
        error_message: str | None = None,
        quota_resets_at: dt.datetime | None = None,
    ) -> LeaseCompleted | None:
        """Report how the upstream call went; retried until acknowledged. None:
        a retry found the lease already completed (an earlier try got through)."""
        completion = Completion(
            outcome, first_token_ms, cooldown_seconds, proxy_failure, remaining_credits, error_message, quota_resets_at
        )
        return self.send_completion(lease_id, completion)

    def send_completion(
        self, lease_id: uuid.UUID | str, completion: Completion, *, retried: bool = False
    ) -> LeaseCompleted | None:
        data = self._send(_core.complete_call(lease_id, completion, self.timeout), retried=retried)
        return None if data is None else decode(LeaseCompleted, data)

    # --- the loop a gateway would otherwise write ----------------------------------

    def lease(
        self,
        *,
        session_id: str | None = None,
        model: str | None = None,
        exclude_accounts: Sequence[str] = (),
        max_wait_ms: int | None = None,
    ) -> Lease:
        """``with client.lease(...) as lease:`` dispatches on entry and completes on exit."""
        return Lease(self, DispatchRequest(session_id, model, list(exclude_accounts), max_wait_ms))

    def call_with_failover(
        self,
        fn: Callable[[Lease], T],
        *,
        session_id: str | None = None,
        model: str | None = None,
        attempts: int = 3,
        max_wait_ms: int | None = None,
    ) -> T:
        """Run ``fn(lease)`` on kiropool's choice of account, and again on the next
        one when it fails upstream (rate limit, exhausted quota, retry-next),
        excluding every account that failed this request. A 429 of kiropool
        itself is waited out as its ``Retry-After`` says. ``attempts`` counts
        dispatches. Stops at once on a fatal upstream error, on 502 (every
        account failed) and 503 (none usable); after the last attempt raises
        :class:`FailoverExhausted`."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        tried: list[str] = []
        errors: list[BaseException] = []
        for attempt in range(1, attempts + 1):
            lease = self.lease(session_id=session_id, model=model, exclude_accounts=tried, max_wait_ms=max_wait_ms)
            try:
                with lease:
                    return fn(lease)
            except RateLimited as exc:
                if lease.dispatched is not None:
                    raise
                errors.append(exc)
                if attempt < attempts:
                    time.sleep(exc.retry_after or 1.0)
            except Exception as exc:
                if not lease.failed_over():
                    raise
                tried.append(lease.account.name)
                errors.append(exc)
        raise FailoverExhausted(attempts, tried, errors) from errors[-1]

    # --- transport -----------------------------------------------------------------

    def _send(self, call: _core.Call, *, retried: bool = False) -> Any:
        retrier = _core.Retrier(call, self.retry)
        while True:
            retrier.attempt += 1
            try:
                response = self._http.post(call.path, json=call.body, timeout=call.timeout)
            except httpx.TransportError as exc:
                again = _core.transport_failure(call, exc)
                cause: BaseException = exc
            else:
                verdict = _core.judge(call, response, retried=retried or retrier.attempt > 1)
                if isinstance(verdict, _core.Done):
                    return verdict.data
                again, cause = verdict, verdict.error
            pause = retrier.pause(again)
            if pause is None:
                raise again.error from cause
            logger.info("kiropool %s: %s; trying again in %.2f s", call.kind, again.error, pause)
            time.sleep(pause)


class Lease(LeaseState):
    """One upstream call's lease. On entry it dispatches; on exit it completes:
    ``success`` (with ``first_token_ms`` when recorded) or the outcome of the
    exception that left the block. The exit always tries to complete, also on
    ``KeyboardInterrupt`` (and goes on completing when Ctrl-C comes again while
    it does); a failure to complete never hides the block's own exception."""

    def __init__(self, client: KiropoolClient, request: DispatchRequest) -> None:
        super().__init__(request, client.classify)
        self._client = client

    def __enter__(self) -> Lease:
        if self.dispatched is not None:
            raise RuntimeError("a lease is entered once")
        r = self.request
        self._entered(
            self._client.dispatch(
                session_id=r.session_id, model=r.model, exclude_accounts=r.exclude_accounts, max_wait_ms=r.max_wait_ms
            )
        )
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        completion = self._completion(exc)
        try:
            self._complete(completion)
        except KiropoolError as error:
            if exc is None:
                raise
            logger.error("kiropool: lease %s not completed (%s); the server reaps it at its TTL", self.lease_id, error)

    def _complete(self, completion: Completion) -> None:
        interrupted: KeyboardInterrupt | None = None
        for _ in range(COMPLETION_INTERRUPTS_TOLERATED + 1):
            try:
                self.completed = self._client.send_completion(
                    self.lease_id, completion, retried=interrupted is not None
                )
                break
            except KeyboardInterrupt as exc:
                # The interrupted request may or may not have reached the server:
                # the retry counts a 409 as done.
                interrupted = exc
        if interrupted is not None:
            raise interrupted
