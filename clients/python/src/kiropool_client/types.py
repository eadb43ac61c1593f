"""The gateway API's shapes (kiropool SPEC §5), one dataclass per schema
component of ``/api/schema/``. Field names, optionality and types follow the
schema exactly; the server's test suite compares them with the schema it
generates (tests/client/test_types.py), so they cannot drift apart.

Responses are decoded with :func:`decode`: unknown fields are ignored (a newer
server may add some), a missing required field is an error."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Outcome = Literal["success", "rate_limited", "quota_exhausted", "retry_next", "fatal"]
SessionState = Literal["sticky", "new", "none"]
ErrorType = Literal[
    "api_error",
    "authentication_error",
    "conflict_error",
    "invalid_request_error",
    "not_found_error",
    "permission_error",
    "rate_limit_error",
]


# --- requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchRequest:
    """Body of ``POST /api/v1/dispatch`` and ``/dispatch/explain`` (``DispatchInput``).
    ``None`` fields are left out, so the server's defaults apply."""

    session_id: str | None = None
    model: str | None = None
    exclude_accounts: list[str] = field(default_factory=list)
    max_wait_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.session_id is not None:
            body["session_id"] = self.session_id
        if self.model is not None:
            body["model"] = self.model
        if self.exclude_accounts:
            body["exclude_accounts"] = list(self.exclude_accounts)
        if self.max_wait_ms is not None:
            body["max_wait_ms"] = self.max_wait_ms
        return body


@dataclass(frozen=True)
class Completion:
    """Body of ``POST /api/v1/leases/<id>/complete`` (``LeaseCompleteRequest``)."""

    outcome: Outcome
    first_token_ms: float | None = None
    cooldown_seconds: int | None = None
    proxy_failure: bool = False
    remaining_credits: float | None = None
    error_message: str | None = None
    quota_resets_at: dt.datetime | None = None  # when the upstream said the credits reset
    # With retry_next or fatal: the gateway gave the request up itself, or never
    # sent it; the account is not blamed (the server counts it toward no ejection).
    abandoned: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"outcome": self.outcome}
        for name in ("first_token_ms", "cooldown_seconds", "remaining_credits"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.error_message is not None:
            body["error_message"] = error_message_sendable(self.error_message)
        if self.quota_resets_at is not None:
            body["quota_resets_at"] = self.quota_resets_at.isoformat()
        if self.proxy_failure:
            body["proxy_failure"] = True
        if self.abandoned:
            body["abandoned"] = True
        return body


# The server's limits on a completion's message: at most this many characters,
# no NUL, valid Unicode. It refuses a completion over them (400) as a whole, and
# the lease then holds its slot until its TTL, its outcome never reported. The
# message comes from upstream error texts, which may hold anything.
MAX_ERROR_MESSAGE = 2000


def error_message_sendable(text: str) -> str:
    """``text`` within the server's limits: NUL and unpaired surrogates replaced, truncated."""
    text = text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return text[:MAX_ERROR_MESSAGE]


# --- responses ---------------------------------------------------------------------


@dataclass(frozen=True)
class LeasedAccount:
    """The account a dispatch chose (``AccountOutput``). ``credentials`` is only
    present for keys an operator gave credentials access."""

    name: str
    routing_identity: str
    pool: str
    proxy_url: str | None
    region: str
    profile_arn: str
    credentials: dict[str, Any] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Dispatched:
    """A dispatch's answer: the lease and its account."""

    lease_id: uuid.UUID
    account: LeasedAccount
    session: SessionState
    expires_at: dt.datetime
    waited_ms: int


@dataclass(frozen=True)
class LeaseCompleted:
    lease_id: uuid.UUID
    account: str
    outcome: str
    session_bound: bool
    # False: the key sent more capacity-taking reports than the server allows;
    # the lease was released but the report not applied.
    report_applied: bool


@dataclass(frozen=True)
class ExplainLatency:
    generated_at: dt.datetime | None
    global_avg_ms: float | None
    usable: bool


@dataclass(frozen=True)
class ExplainCandidate:
    account: str
    routing_identity: str
    pool: str
    proxy_in_cooldown: bool
    model_preferred: bool
    session_count: int | None
    pool_rank: int
    latency_band: int | None
    latency_score_ms: float | None
    last_started_at: dt.datetime | None
    remaining_credits_sort: float
    credit_burn_per_hour: float | None
    quota_resets_at: dt.datetime | None
    quota_probe: bool
    cooldown_remaining_s: int
    ejected_remaining_s: int
    in_flight: int
    held_for_sticky: int
    effective_concurrency: int
    max_concurrency: int
    can_start: bool


UnselectableReason = Literal["disabled", "quota_exhausted", "credits_at_or_below_minimum", "excluded"]


@dataclass(frozen=True)
class ExplainUnselectable:
    account: str
    reason: UnselectableReason


@dataclass(frozen=True)
class DispatchExplanation:
    session: SessionState
    bound_account: str | None
    latency: ExplainLatency
    candidates: list[ExplainCandidate]
    sticky_patience_ms: int
    sticky_would_wait: bool
    unselectable: list[ExplainUnselectable]


@dataclass(frozen=True)
class ErrorDetail:
    type: ErrorType
    message: str


@dataclass(frozen=True)
class ErrorBody:
    error: ErrorDetail


# --- decoding ----------------------------------------------------------------------

T = TypeVar("T")


class DecodeError(ValueError):
    """A response that does not have the documented shape."""


def decode(cls: type[T], data: Any) -> T:
    """``data`` (parsed JSON) as an instance of the dataclass ``cls``."""
    return _decode(cls, data, cls.__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise DecodeError(f"{where}: null where a value is required")
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _decode(inner, value, where)
    if value is None:
        raise DecodeError(f"{where}: null where a value is required")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DecodeError(f"{where}: missing field {f.name!r}")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected an array")
        (item,) = typing.get_args(tp)
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object")
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise DecodeError(f"{where}: unexpected value {value!r}")
        return value
    try:
        return _SCALARS[tp](value)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{where}: {exc}") from None


def _strict(kind: type, *accepted: type):
    def convert(value):
        # bool is an int in Python, and JSON has no such overlap: refuse it.
        if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return convert


def _datetime(value: Any) -> dt.datetime:
    if not isinstance(value, str):
        raise TypeError("expected a date-time string")
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _uuid(value: Any) -> uuid.UUID:
    if not isinstance(value, str):
        raise TypeError("expected a uuid string")
    return uuid.UUID(value)


_SCALARS = {
    str: _strict(str, str),
    int: _strict(int, int),
    float: _strict(float, int, float),
    bool: _strict(bool, bool),
    dt.datetime: _datetime,
    uuid.UUID: _uuid,
}
