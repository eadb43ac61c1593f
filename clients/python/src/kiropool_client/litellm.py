"""kiropool picks the deployment of a LiteLLM Router (extra ``litellm``).

    router = Router(model_list=[
        {"model_name": "claude", "litellm_params": {...}, "model_info": {"kiropool_account": "acct-1"}},
        {"model_name": "claude", "litellm_params": {...}, "model_info": {"kiropool_account": "acct-2"}},
    ])
    KiropoolRouting.install(router, "http://kiropool:8000", "kp_...")
    router.completion(model="claude", messages=..., metadata={"session_id": "conv-42"})

- **Mapping.** A deployment serves the kiropool account named by its
  ``model_info["kiropool_account"]``; deployments without one are never picked.
  The session id is the request's ``metadata["session_id"]``.
- **Selection.** The Router's pick (LiteLLM's documented custom routing
  strategy, installed with ``Router.register_plugin``) dispatches to kiropool
  with the model group as ``model`` and returns the deployment of the account
  kiropool leased. The lease travels in the request's metadata
  (``metadata["kiropool_leases"]``: account → lease id). A retry or fallback of
  the same request excludes every account already leased for it. An account
  of the key with no deployment in the model group is released at once and
  excluded (scope the key to the Router's accounts to avoid the round trip).
- **Completion.** LiteLLM's success and failure callbacks (a ``CustomLogger``
  in ``litellm.callbacks``) complete the lease: ``success`` with the first-token
  latency from LiteLLM's timing (``completion_start_time - start_time``: the
  first chunk of a stream, the whole answer otherwise), ``rate_limited`` on a
  429 (cooldown from its ``Retry-After``), ``retry_next`` on any other error.

kiropool is the one place that cools accounts down: give the Router
``disable_cooldowns=True`` so LiteLLM does not also bench deployments on its
own. A lease whose request never reaches a callback (a stream nobody reads to
its end, a process killed) is reaped by the server at its TTL; :meth:`close`
releases the ones still open at shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import threading
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import litellm
from litellm.exceptions import RateLimitErrorCategory
from litellm.integrations.custom_logger import CustomLogger
from litellm.types.router import CustomRoutingStrategyBase

from kiropool_client._core import RetryPolicy
from kiropool_client.aio import AsyncKiropoolClient
from kiropool_client.client import KiropoolClient
from kiropool_client.errors import KiropoolError
from kiropool_client.outcomes import Classifier, cooldown_seconds, error_message, retry_after_seconds
from kiropool_client.types import Completion, Dispatched

logger = logging.getLogger("kiropool_client.litellm")

ACCOUNT_FIELD = "kiropool_account"
LEASES_KEY = "kiropool_leases"
# Every account of a key is excluded at most once per request, and the server
# takes at most 256 excluded names: more rounds than that is a bug.
MAX_DISPATCHES_PER_PICK = 256


@dataclass(frozen=True)
class OpenLease:
    lease_id: str
    account: str
    routing_identity: str
    expires_at: dt.datetime


class KiropoolRouting(CustomRoutingStrategyBase, CustomLogger):
    """The Router's custom routing strategy and the callback that completes its leases."""

    def __init__(
        self,
        router: Any,
        base_url: str,
        api_key: str,
        *,
        session_key: str = "session_id",
        max_wait_ms: int | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        classify: Classifier | None = None,
    ) -> None:
        CustomLogger.__init__(self)
        # LiteLLM keeps one CustomLogger per class and public str/int/bool
        # attributes, and drops any "duplicate": a unique one keeps a second
        # Router's routing (or a re-installed one) from being dropped.
        self.routing_id = uuid.uuid4().hex
        self.router = router
        self.session_key = session_key
        self.max_wait_ms = max_wait_ms
        self.classify = classify
        self._client_args = {"base_url": base_url, "api_key": api_key, "timeout": timeout, "retry": retry}
        self.client = KiropoolClient(**self._client_args)
        # httpx's async pool belongs to the event loop that opened it.
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncKiropoolClient] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._open: dict[str, OpenLease] = {}
        self._completing: dict[str, OpenLease] = {}

    @classmethod
    def install(cls, router: Any, base_url: str, api_key: str, **options: Any) -> KiropoolRouting:
        """Make kiropool pick ``router``'s deployments, and complete its leases from LiteLLM's callbacks."""
        routing = cls(router, base_url, api_key, **options)
        router.register_plugin(routing)
        litellm.logging_callback_manager.add_litellm_callback(routing)
        return routing

    def open_leases(self) -> list[OpenLease]:
        """Leases handed out and not completed yet (a completion on its way included)."""
        with self._lock:
            return [*self._open.values(), *self._completing.values()]

    def close(self) -> None:
        """Stop completing through LiteLLM's callbacks and release the leases
        still open (``fatal``, abandoned: the account is not blamed)."""
        # LiteLLM copies litellm.callbacks into its success and failure lists: drop it from all of them.
        litellm.logging_callback_manager.drop_callbacks([self])
        with self._lock:
            lease_ids = list(self._open)
        for lease_id in lease_ids:
            lease = self._claim(lease_id)
            if lease is not None:
                self._complete(
                    lease, Completion(outcome="fatal", error_message="the gateway shut down", abandoned=True)
                )
        self.client.close()

    # --- the pick ------------------------------------------------------------------

    def get_available_deployment(
        self,
        model: str,
        messages: list[dict[str, str]] | None = None,
        input: str | list[object] | None = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, object] | None = None,
    ) -> dict[str, Any]:
        pick = _Pick(self, model, specific_deployment, request_kwargs)
        for _ in range(MAX_DISPATCHES_PER_PICK):
            try:
                dispatched = self.client.dispatch(**pick.dispatch_args())
            except KiropoolError as exc:
                raise litellm_error(exc, model) from exc
            deployment = pick.take(dispatched)
            if deployment is not None:
                return deployment
            self.client.send_completion(dispatched.lease_id, pick.unmapped())
        raise RuntimeError("kiropool kept choosing accounts this Router has no deployment for")

    async def async_get_available_deployment(
        self,
        model: str,
        messages: list[dict[str, str]] | None = None,
        input: str | list[object] | None = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, object] | None = None,
    ) -> dict[str, Any]:
        pick = _Pick(self, model, specific_deployment, request_kwargs)
        client = self._async_client()
        for _ in range(MAX_DISPATCHES_PER_PICK):
            try:
                dispatched = await client.dispatch(**pick.dispatch_args())
            except KiropoolError as exc:
                raise litellm_error(exc, model) from exc
            deployment = pick.take(dispatched)
            if deployment is not None:
                return deployment
            await client.send_completion(dispatched.lease_id, pick.unmapped())
        raise RuntimeError("kiropool kept choosing accounts this Router has no deployment for")

    # --- the callbacks -------------------------------------------------------------

    def log_success_event(self, kwargs, response_obj, start_time, end_time):
        lease = self._lease_of(kwargs)
        if lease is not None:
            self._complete(lease, self._success(kwargs, start_time, end_time))

    def log_failure_event(self, kwargs, response_obj, start_time, end_time):
        lease = self._lease_of(kwargs)
        if lease is not None:
            self._complete(lease, self._failure(kwargs))

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        lease = self._lease_of(kwargs)
        if lease is not None:
            await self._acomplete(lease, self._success(kwargs, start_time, end_time))

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        lease = self._lease_of(kwargs)
        if lease is not None:
            await self._acomplete(lease, self._failure(kwargs))

    def _success(self, kwargs: Mapping[str, Any], start_time: Any, end_time: Any) -> Completion:
        first = kwargs.get("completion_start_time") or end_time
        first_token_ms = None
        if isinstance(first, dt.datetime) and isinstance(start_time, dt.datetime):
            first_token_ms = max(0.0, (first - start_time).total_seconds() * 1000)
        return Completion(outcome="success", first_token_ms=first_token_ms)

    def _failure(self, kwargs: Mapping[str, Any]) -> Completion:
        exc = kwargs.get("exception")
        if not isinstance(exc, BaseException):
            return Completion(outcome="retry_next", error_message=str(kwargs.get("traceback_exception") or "")[:2000])
        if self.classify is not None:
            custom = self.classify(exc)
            if custom is not None:
                return custom
        if getattr(exc, "status_code", None) == 429:
            retry_after = retry_after_seconds(_header(exc, "retry-after"))
            return Completion(
                outcome="rate_limited", cooldown_seconds=cooldown_seconds(retry_after), error_message=error_message(exc)
            )
        return Completion(outcome="retry_next", error_message=error_message(exc))

    # --- bookkeeping ---------------------------------------------------------------

    def _opened(self, dispatched: Dispatched) -> None:
        lease = OpenLease(
            str(dispatched.lease_id),
            dispatched.account.name,
            dispatched.account.routing_identity,
            dispatched.expires_at,
        )
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            # A lease past its expiry was reaped by the server: nothing left to complete.
            for stale in [k for k, v in self._open.items() if v.expires_at <= now]:
                del self._open[stale]
            self._open[lease.lease_id] = lease

    def _lease_of(self, kwargs: Mapping[str, Any]) -> OpenLease | None:
        """The open lease of the deployment that served (or failed) this call, claimed:
        whichever callback gets here first completes it, once."""
        params = kwargs.get("litellm_params") or {}
        metadata = params.get("metadata") or kwargs.get("metadata") or {}
        model_info = params.get("model_info") or metadata.get("model_info") or {}
        leases = metadata.get(LEASES_KEY) or {}
        lease_id = leases.get(model_info.get(ACCOUNT_FIELD))
        return self._claim(lease_id) if lease_id else None

    def _claim(self, lease_id: str) -> OpenLease | None:
        with self._lock:
            lease = self._open.pop(lease_id, None)
            if lease is not None:
                self._completing[lease_id] = lease
            return lease

    def _complete(self, lease: OpenLease, completion: Completion) -> None:
        try:
            self.client.send_completion(lease.lease_id, completion)
        except Exception as exc:  # a callback must never break the request it reports on
            logger.error("kiropool: lease %s on %s not completed: %s", lease.lease_id, lease.account, exc)
        finally:
            self._completed(lease)

    async def _acomplete(self, lease: OpenLease, completion: Completion) -> None:
        try:
            await self._async_client().send_completion(lease.lease_id, completion)
        except Exception as exc:  # a callback must never break the request it reports on
            logger.error("kiropool: lease %s on %s not completed: %s", lease.lease_id, lease.account, exc)
        finally:
            self._completed(lease)

    def _completed(self, lease: OpenLease) -> None:
        with self._lock:
            self._completing.pop(lease.lease_id, None)

    def _async_client(self) -> AsyncKiropoolClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async_clients.get(loop)
            if client is None:
                client = self._async_clients[loop] = AsyncKiropoolClient(**self._client_args)
            return client


class _Pick:
    """One pick of one request: its deployments by account, its session and
    the accounts already leased for it (earlier attempts, which failed)."""

    def __init__(
        self,
        routing: KiropoolRouting,
        model: str,
        specific_deployment: bool | None,
        request_kwargs: dict[str, object] | None,
    ) -> None:
        if specific_deployment:
            raise ValueError("kiropool picks the deployment itself: specific_deployment requests are not supported")
        self.routing = routing
        self.model = model
        self.by_account: dict[str, dict[str, Any]] = {}
        for deployment in routing.router.registry().deployments(model) or []:
            account = (deployment.get("model_info") or {}).get(ACCOUNT_FIELD)
            if account:
                self.by_account.setdefault(account, deployment)
        if not self.by_account:
            raise ValueError(
                f"no deployment of model group {model!r} names a kiropool account (model_info.{ACCOUNT_FIELD})"
            )
        kwargs = request_kwargs if request_kwargs is not None else {}
        metadata = kwargs.get("metadata")
        if not isinstance(metadata, dict):
            metadata = kwargs["metadata"] = {}
        self.metadata = metadata
        leases = metadata.get(LEASES_KEY)
        if not isinstance(leases, dict):
            leases = metadata[LEASES_KEY] = {}
        self.leases: dict[str, str] = leases
        self.unmapped_accounts: list[str] = []
        session = metadata.get(routing.session_key)
        self.session_id = session if isinstance(session, str) else None

    def dispatch_args(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "model": self.model,
            "exclude_accounts": [*self.leases, *self.unmapped_accounts],
            "max_wait_ms": self.routing.max_wait_ms,
        }

    def take(self, dispatched: Dispatched) -> dict[str, Any] | None:
        deployment = self.by_account.get(dispatched.account.name)
        if deployment is None:
            self.unmapped_accounts.append(dispatched.account.name)
            return None
        self.routing._opened(dispatched)
        self.leases[dispatched.account.name] = str(dispatched.lease_id)
        self.metadata["kiropool_session"] = dispatched.session
        return deployment

    def unmapped(self) -> Completion:
        return Completion(
            outcome="retry_next",
            error_message=f"the Router has no deployment of model group {self.model!r} for this account",
            abandoned=True,  # never sent: nothing failed on the account
        )


def litellm_error(exc: KiropoolError, model: str) -> Exception:
    """kiropool's refusal to pick as the LiteLLM exception a LiteLLM caller (or
    the LiteLLM proxy) already handles: 429 as ``RateLimitError`` with its
    ``Retry-After``, 502/503 as ``ServiceUnavailableError``. Anything else (a
    bad key, a bad request) is a configuration error and stays as it is."""
    headers = {"retry-after": str(math.ceil(exc.retry_after))} if exc.retry_after is not None else {}
    message = f"kiropool: {exc.message}"
    if exc.status_code == 429:
        return litellm.RateLimitError(
            message=message,
            llm_provider="kiropool",
            model=model,
            category=RateLimitErrorCategory.LITELLM_RATE_LIMIT,
            headers=headers,
        )
    if exc.status_code in (502, 503):
        return litellm.ServiceUnavailableError(message=message, llm_provider="kiropool", model=model)
    return exc


def _header(exc: BaseException, name: str) -> str | None:
    """A header of the upstream answer behind a LiteLLM exception, if it kept one."""
    for holder in (
        getattr(exc, "litellm_response_headers", None),
        getattr(getattr(exc, "response", None), "headers", None),
    ):
        if holder is not None:
            try:
                value = holder.get(name)
            except AttributeError:
                continue
            if value is not None:
                return str(value)
    return None


__all__ = ["ACCOUNT_FIELD", "LEASES_KEY", "KiropoolRouting", "OpenLease"]
