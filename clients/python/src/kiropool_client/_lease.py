"""The state of one lease, shared by the sync and the async context manager:
what was dispatched, the first-token time the caller recorded, and the
completion its exit will send."""

from __future__ import annotations

import dataclasses
import time
import uuid

from kiropool_client.outcomes import Classifier, completion_from_exception
from kiropool_client.types import Completion, Dispatched, DispatchRequest, LeaseCompleted, LeasedAccount, Outcome

FAILOVER_OUTCOMES: frozenset[Outcome] = frozenset({"rate_limited", "quota_exhausted", "retry_next"})


class LeaseState:
    def __init__(self, request: DispatchRequest, classify: Classifier | None) -> None:
        self.request = request
        self.dispatched: Dispatched | None = None
        # What the exit reported (or tried to), and the server's acknowledgement:
        # None when a retried completion found the lease already completed.
        self.reported: Completion | None = None
        self.completed: LeaseCompleted | None = None
        self.first_token_ms: float | None = None
        self.remaining_credits: float | None = None
        self._classify = classify
        self._started: float | None = None
        self._explicit: Completion | None = None

    @property
    def account(self) -> LeasedAccount:
        return self._leased().account

    @property
    def lease_id(self) -> uuid.UUID:
        return self._leased().lease_id

    def first_token(self) -> float:
        """Record now as the first token's arrival (once); returns the milliseconds since dispatch."""
        if self.first_token_ms is None:
            self.first_token_ms = (time.monotonic() - (self._started or time.monotonic())) * 1000
        return self.first_token_ms

    def report(
        self,
        outcome: Outcome,
        *,
        cooldown_seconds: int | None = None,
        proxy_failure: bool = False,
        error_message: str | None = None,
    ) -> None:
        """Say how the call went without raising: the exit completes with this
        outcome instead of ``success`` (an exception in the block still wins)."""
        self._explicit = Completion(
            outcome=outcome, cooldown_seconds=cooldown_seconds, proxy_failure=proxy_failure, error_message=error_message
        )

    def _entered(self, dispatched: Dispatched) -> None:
        self.dispatched = dispatched
        self._started = time.monotonic()

    def _completion(self, exc: BaseException | None) -> Completion:
        if exc is not None:
            completion = completion_from_exception(exc, self._classify)
        elif self._explicit is not None:
            completion = self._explicit
        else:
            completion = Completion(outcome="success")
        if completion.outcome == "success" and completion.first_token_ms is None:
            completion = dataclasses.replace(completion, first_token_ms=self.first_token_ms)
        if completion.remaining_credits is None and self.remaining_credits is not None:
            completion = dataclasses.replace(completion, remaining_credits=self.remaining_credits)
        self.reported = completion
        return completion

    def _leased(self) -> Dispatched:
        if self.dispatched is None:
            raise RuntimeError("the lease is not dispatched yet: use it inside its with block")
        return self.dispatched

    def failed_over(self) -> bool:
        """After an exception: was it the upstream call failing on this account (try another)?"""
        return self.dispatched is not None and self.reported is not None and self.reported.outcome in FAILOVER_OUTCOMES

    def __repr__(self) -> str:
        if self.dispatched is None:
            return f"<{type(self).__name__} not dispatched>"
        return f"<{type(self).__name__} {self.dispatched.lease_id} on {self.dispatched.account.name}>"
