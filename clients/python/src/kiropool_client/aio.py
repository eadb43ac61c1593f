"""The asyncio client: ``AsyncKiropoolClient`` and its ``AsyncLease``. Same
behaviour as :mod:`kiropool_client.client`, awaited."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
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

# Completions that outlived the task awaiting them (it was cancelled while it
# waited): held here so they run to the end instead of being collected.
_DETACHED: set[asyncio.Task] = set()


class AsyncKiropoolClient:
    """The asyncio twin of :class:`kiropool_client.KiropoolClient`. Use it from
    one event loop (httpx's connection pool belongs to the loop that opened it)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retry: _core.RetryPolicy | None = None,
        classify: Classifier | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.timeout = timeout
        self.retry = retry or _core.RetryPolicy()
        self.classify = classify
        self._http = httpx.AsyncClient(base_url=base_url, headers=_core.headers(api_key), transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKiropoolClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def dispatch(
        self,
        *,
        session_id: str | None = None,
        model: str | None = None,
        exclude_accounts: Sequence[str] = (),
        max_wait_ms: int | None = None,
    ) -> Dispatched:
        request = DispatchRequest(session_id, model, list(exclude_accounts), max_wait_ms)
        return decode(Dispatched, await self._send(_core.dispatch_call("dispatch", request, self.timeout)))

    async def explain(
        self,
        *,
        session_id: str | None = None,
        model: str | None = None,
        exclude_accounts: Sequence[str] = (),
        max_wait_ms: int | None = None,
    ) -> DispatchExplanation:
        request = DispatchRequest(session_id, model, list(exclude_accounts), max_wait_ms)
        return decode(DispatchExplanation, await self._send(_core.dispatch_call("explain", request, self.timeout)))

    async def complete(
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
        completion = Completion(
            outcome, first_token_ms, cooldown_seconds, proxy_failure, remaining_credits, error_message, quota_resets_at
        )
        return await self.send_completion(lease_id, completion)

    async def send_completion(
        self, lease_id: uuid.UUID | str, completion: Completion, *, retried: bool = False
    ) -> LeaseCompleted | None:
        data = await self._send(_core.complete_call(lease_id, completion, self.timeout), retried=retried)
        return None if data is None else decode(LeaseCompleted, data)

    def lease(
        self,
        *,
        session_id: str | None = None,
        model: str | None = None,
        exclude_accounts: Sequence[str] = (),
        max_wait_ms: int | None = None,
    ) -> AsyncLease:
        """``async with client.lease(...) as lease:``"""
        return AsyncLease(self, DispatchRequest(session_id, model, list(exclude_accounts), max_wait_ms))

    async def call_with_failover(
        self,
        fn: Callable[[AsyncLease], Awaitable[T]],
        *,
        session_id: str | None = None,
        model: str | None = None,
        attempts: int = 3,
        max_wait_ms: int | None = None,
    ) -> T:
        """See :meth:`kiropool_client.KiropoolClient.call_with_failover`."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        tried: list[str] = []
        errors: list[BaseException] = []
        for attempt in range(1, attempts + 1):
            lease = self.lease(session_id=session_id, model=model, exclude_accounts=tried, max_wait_ms=max_wait_ms)
            try:
                async with lease:
                    return await fn(lease)
            except RateLimited as exc:
                if lease.dispatched is not None:
                    raise
                errors.append(exc)
                if attempt < attempts:
                    await asyncio.sleep(exc.retry_after or 1.0)
            except Exception as exc:
                if not lease.failed_over():
                    raise
                tried.append(lease.account.name)
                errors.append(exc)
        raise FailoverExhausted(attempts, tried, errors) from errors[-1]

    async def _send(self, call: _core.Call, *, retried: bool = False) -> Any:
        retrier = _core.Retrier(call, self.retry)
        while True:
            retrier.attempt += 1
            try:
                response = await self._http.post(call.path, json=call.body, timeout=call.timeout)
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
            await asyncio.sleep(pause)


class AsyncLease(LeaseState):
    """``async with`` twin of :class:`kiropool_client.client.Lease`. The
    completion runs in its own task, shielded: when the block was cancelled,
    or the exit is cancelled again while it completes, the completion still
    runs to the end (in the background in the latter case)."""

    def __init__(self, client: AsyncKiropoolClient, request: DispatchRequest) -> None:
        super().__init__(request, client.classify)
        self._client = client

    async def __aenter__(self) -> AsyncLease:
        if self.dispatched is not None:
            raise RuntimeError("a lease is entered once")
        r = self.request
        self._entered(
            await self._client.dispatch(
                session_id=r.session_id, model=r.model, exclude_accounts=r.exclude_accounts, max_wait_ms=r.max_wait_ms
            )
        )
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        task = asyncio.ensure_future(self._client.send_completion(self.lease_id, self._completion(exc)))
        _DETACHED.add(task)
        task.add_done_callback(_detached_done)
        try:
            self.completed = await asyncio.shield(task)
        except asyncio.CancelledError:
            _ORPHANS.add(task)
            raise
        except KiropoolError as error:
            if exc is None:
                raise
            logger.error("kiropool: lease %s not completed (%s); the server reaps it at its TTL", self.lease_id, error)


# Completions whose awaiting exit was cancelled: nobody else will see how they end.
_ORPHANS: set[asyncio.Task] = set()


def _detached_done(task: asyncio.Task) -> None:
    _DETACHED.discard(task)
    orphan = task in _ORPHANS
    _ORPHANS.discard(task)
    if task.cancelled() or task.exception() is None:
        return
    if orphan:
        logger.error("kiropool: a lease completion failed after its task was cancelled: %s", task.exception())
