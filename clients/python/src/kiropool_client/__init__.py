"""kiropool's gateway client.

    from kiropool_client import KiropoolClient, UpstreamRateLimited

    client = KiropoolClient("http://127.0.0.1:8000", "kp_...")
    with client.lease(session_id="conv-42", model="claude-sonnet") as lease:
        ...  # call upstream with lease.account; lease.first_token() at the first token

The LiteLLM integration is ``kiropool_client.litellm`` (extra ``litellm``)."""

from kiropool_client._core import RetryPolicy
from kiropool_client._version import __version__
from kiropool_client.aio import AsyncKiropoolClient, AsyncLease
from kiropool_client.client import KiropoolClient, Lease
from kiropool_client.errors import (
    AllAccountsFailed,
    AuthenticationFailed,
    Conflict,
    ConnectionFailed,
    FailoverExhausted,
    InvalidRequest,
    KiropoolError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from kiropool_client.outcomes import (
    UpstreamError,
    UpstreamFatal,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRetryNext,
    completion_from_exception,
)
from kiropool_client.types import (
    Completion,
    Dispatched,
    DispatchExplanation,
    DispatchRequest,
    ExplainCandidate,
    LeaseCompleted,
    LeasedAccount,
)

__all__ = [
    "AllAccountsFailed",
    "AsyncKiropoolClient",
    "AsyncLease",
    "AuthenticationFailed",
    "Completion",
    "Conflict",
    "ConnectionFailed",
    "DispatchExplanation",
    "DispatchRequest",
    "Dispatched",
    "ExplainCandidate",
    "FailoverExhausted",
    "InvalidRequest",
    "KiropoolClient",
    "KiropoolError",
    "Lease",
    "LeaseCompleted",
    "LeasedAccount",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RetryPolicy",
    "ServiceUnavailable",
    "UpstreamError",
    "UpstreamFatal",
    "UpstreamQuotaExhausted",
    "UpstreamRateLimited",
    "UpstreamRetryNext",
    "completion_from_exception",
    "__version__",
]
