"""The shared types of a dispatch: what a gateway asks for, what the reads
hand the writes, and what the writes answer. Both sides import this module,
neither imports the other's."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from routing import selection
from routing.models import StickyOutcome


class SessionState(enum.StrEnum):
    """SPEC §2: the session state of a request."""

    NONE = "none"  # no session id (or an empty one after trimming)
    STICKY = "sticky"  # a live binding exists for (key, session id)
    NEW = "new"  # a session id with no live binding

    @classmethod
    def of(cls, session_id: str | None, bound_account_id: int | None) -> SessionState:
        """The one place that decides it."""
        if not session_id:
            return cls.NONE
        return cls.STICKY if bound_account_id is not None else cls.NEW


@dataclass(frozen=True, slots=True)
class DispatchRequest:
    session_id: str | None  # already trimmed; None when absent or empty
    model: str | None = None
    exclude_accounts: frozenset[str] = frozenset()
    max_wait_ms: int = 30_000


@dataclass(frozen=True, slots=True)
class SortKeys:
    """The values of SPEC §2's sort keys as the database computed them for a
    row; named as in ``selection.Ranked``, which computes them in Python."""

    proxy_cooling: bool
    model_preferred: bool
    session_count: int | None  # None when key 3 is inactive
    pool_rank: int
    latency_band: int | None
    remaining_credits_sort: float
    credit_burn_per_hour: float | None


@dataclass(frozen=True, slots=True)
class CandidateRow:
    """A selectable account as read for a dispatch: the pure ``Candidate``
    plus the ids and fields the writes and the response need."""

    candidate: selection.Candidate
    account_id: int
    identity_id: int
    region: str
    profile_arn: str
    expired_leases: int = 0  # live-looking leases on the identity already past their TTL
    excluded: bool = False  # named in the request's exclude_accounts
    ready: bool = True  # the read's verdict: not excluded, and a lease could start on it now
    keys: SortKeys | None = None


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A lease just started (the row is in the database)."""

    id: uuid.UUID
    account_id: int
    identity_id: int
    started_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Acquired:
    lease: LeaseGrant
    row: CandidateRow
    session: SessionState
    waited_ms: int
    sticky: StickyOutcome | None = None  # for a bound session: hit, waited or moved


@dataclass(frozen=True, slots=True)
class Completion:
    outcome: str
    first_token_ms: float | None = None
    cooldown_seconds: int | None = None
    proxy_failure: bool = False
    remaining_credits: float | None = None
    quota_resets_at: datetime | None = None
    error_message: str = ""
    # Over the key's rate of capacity-taking reports: release only.
    report_limited: bool = False
    # A failure outcome that is not the account's: the gateway gave the
    # request up itself, or never sent it (as the server does when it cannot
    # decrypt the account's credentials). It counts toward no ejection.
    abandoned: bool = False


@dataclass(frozen=True, slots=True)
class Completed:
    lease_id: uuid.UUID
    account_name: str
    outcome: str
    session_bound: bool
    report_applied: bool = True  # False: over the key's rate of capacity-taking reports
