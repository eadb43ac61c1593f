"""The simulated pool's state, and the server's writes on it in miniature.

Each function here plays one write of the server on the engine's state, and
says which: the failure streak and outlier ejection of
``routing/completions.py``, and the quota writes of ``routing/quotas.py``
(exhaustion, restore, a completion's balance report, the reset task, the
probe). What they decide from a ``Candidate`` (may it start a lease, how
many slots does slow start allow, how does it sort) stays in
``routing/readiness.py`` and ``routing/selection.py``; the engine asks them.

One simplification: the server keeps quota exhaustion and the probe time
per account and writes them for every alias of the identity at once; here
they live on the identity. A balance report still lands on the one account
that reported it, as on the server, so an alias can look better off than its
identity until it is used.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from bench.simulate.scenario import DAY, AccountSpec, CreditPlan, FailureWindow, IdentitySpec, Knobs
from routing.readiness import ThrottleState, blocked_until, pacing_ready_at, slow_start_step_at, throttle_state
from routing.selection import Candidate

# Simulated t = 0. Any fixed instant works; selection.py only compares times.
EPOCH = datetime(2026, 6, 1, tzinfo=UTC)

# An account's ``min_remaining_credits`` (the server's default): a known
# balance at or below it is not handed out.
MIN_REMAINING_CREDITS = 0.0

# Kiro credits reset monthly: the reset after a simulated one is past the day.
CREDIT_CYCLE_S = 30 * DAY

NEVER = float("inf")


def at(t: float) -> datetime:
    return EPOCH + timedelta(seconds=t)


def seconds(when: datetime) -> float:
    return (when - EPOCH).total_seconds()


@dataclass(slots=True)
class Identity:
    spec: IdentitySpec
    bursts: list[tuple[float, float]]
    quota_at: deque[tuple[float, float]]  # pending (at, reset_after), by time
    failures: list[FailureWindow]
    plan: CreditPlan | None = None
    accounts: list[Account] = field(default_factory=list)
    in_flight: int = 0
    last_started: datetime | None = None
    cooldown_until_s: float = -NEVER
    cooldown_until: datetime | None = None
    # Outlier ejection (routing/completions.py). ``ejected_until`` stays set
    # after it passes: slow start ramps from it.
    failure_streak: int = 0
    ejections: int = 0  # in a row
    ejected_until_s: float = -NEVER
    ejected_until: datetime | None = None
    reserved: int = 0  # slots held for sticky sessions waiting on it
    # The quota as the dispatcher knows it.
    exhausted: bool = False
    next_probe_s: float | None = None
    # The upstream's truth: credits left (None: not modelled, never runs
    # out), the next reset, and a quota event's outage until an operator's reset.
    credits: float | None = None
    reset_s: float = NEVER
    quota_blocked_until_s: float = -NEVER
    version: int = 0  # bumped on every change a Candidate shows
    state_memo: tuple[int, ThrottleState, float] | None = None  # (version, state, valid until)

    def __post_init__(self) -> None:
        if self.plan is not None:
            self.credits = self.plan.credits
            self.reset_s = self.plan.reset_s

    def blocked(self, t: float) -> bool:
        """Cooling down or ejected."""
        return self.cooldown_until_s > t or self.ejected_until_s > t


@dataclass(slots=True)
class Account:
    spec: AccountSpec
    identity: Identity
    proxy_extra_ms: float
    bound: int = 0  # live bindings pointing here
    # What completions reported (SPEC §2: "any completion may carry remaining_credits").
    reported_credits: float | None = None
    resets_at_s: float | None = None  # the quota_resets_at the dispatcher knows
    cached: tuple[int, int, Candidate] | None = None  # (identity version, bound, candidate)

    def __post_init__(self) -> None:
        plan = self.identity.plan
        if plan is not None:
            # An operator entered the balance (and the reset date, when known).
            self.reported_credits = plan.credits
            self.resets_at_s = plan.reset_s if plan.reset_known else None


def touch(ident: Identity) -> None:
    ident.version += 1


# --- what the policy sees (selection.py, readiness.py) ---------------------------------


def candidate(account: Account, *, credit_pacing: bool) -> Candidate:
    """The account as the dispatch read builds it. Without credit pacing the
    ordering never sees a reset time (that is all the sort key reads)."""
    ident = account.identity
    cached = account.cached
    if cached is not None and cached[0] == ident.version and cached[1] == account.bound:
        return cached[2]
    resets_at = at(account.resets_at_s) if credit_pacing and account.resets_at_s is not None else None
    made = Candidate(
        account=account.spec.name,
        routing_identity=ident.spec.name,
        pool=account.spec.pool,
        proxy_url=account.spec.proxy_url,
        remaining_credits=account.reported_credits,
        last_started_at=ident.last_started,
        identity_cooldown_until=ident.cooldown_until,
        in_flight=ident.in_flight,
        max_concurrency=ident.spec.max_concurrency,
        min_start_interval_ms=ident.spec.min_start_interval_ms,
        bound_sessions=account.bound,
        ejected_until=ident.ejected_until,
        reserved=ident.reserved,
        quota_resets_at=resets_at,
        quota_probe=quota_probe(account),
    )
    account.cached = (ident.version, account.bound, made)
    return made


def identity_state(account: Account, t: float, knobs: Knobs, *, credit_pacing: bool) -> ThrottleState:
    """``readiness.throttle_state`` of the account's identity, remembered until it can change.

    Without a change to the identity (its version) a state only changes when
    a cooldown, ejection or pacing interval runs out, or a slow-start step
    adds a slot; ready holds until the next change. ``state_memo[2]`` says
    until when the answer holds."""
    ident = account.identity
    memo = ident.state_memo
    if memo is not None and memo[0] == ident.version and t < memo[2]:
        return memo[1]
    c = candidate(account, credit_pacing=credit_pacing)
    now = at(t)
    slow_start = timedelta(seconds=knobs.slow_start_s)
    state = throttle_state(c, now, slow_start=slow_start)
    until = NEVER
    if state == "cooling":
        until = seconds(blocked_until(c, now))
    elif state == "pacing":
        until = seconds(pacing_ready_at(c))
    elif state == "saturated" and (step := slow_start_step_at(c, now, slow_start)) is not None:
        until = seconds(step)
    ident.state_memo = (ident.version, state, until)
    return state


# --- what the read lets through (routing/selectors/candidates.py) --------------------


def spent(account: Account) -> bool:
    """Quota exhausted, or a known balance at or below the minimum."""
    reported = account.reported_credits
    return account.identity.exhausted or (reported is not None and reported <= MIN_REMAINING_CREDITS)


def selectable(account: Account, t: float) -> bool:
    """A candidate unless spent; spent, it is one again at its known reset
    time, or, with none known, when its probe is due (half-open)."""
    if not spent(account):
        return True
    if account.resets_at_s is not None:
        return account.resets_at_s <= t
    probe = account.identity.next_probe_s
    return probe is not None and probe <= t


def quota_probe(account: Account) -> bool:
    """Selectable only as the probe. (A spent account past its known reset
    time is restored by the reset event at that very instant, before any
    dispatch, so it never shows here.)"""
    return spent(account)


# --- the upstream --------------------------------------------------------------------


def upstream_outcome(ident: Identity, t: float, luck: float) -> str:
    """How the identity's upstream answers a request started at ``t``."""
    if ident.quota_at and ident.quota_at[0][0] <= t:
        _, reset_after = ident.quota_at.popleft()
        ident.quota_blocked_until_s = t + reset_after
    if t < ident.quota_blocked_until_s or (ident.credits is not None and ident.credits <= 0):
        return "quota_exhausted"
    if any(start <= t < end for start, end in ident.bursts):
        return "rate_limited"
    for window in ident.failures:
        if window.start_s <= t < window.end_s and luck < window.share:
            return window.outcome
    return "success"


def credits_spend(ident: Identity, cost: float) -> float:
    """A served request's credits; the upstream lets a request that started
    with credits left finish, and the balance stops at zero."""
    if ident.credits is None:
        return 0.0
    spent_now = min(cost, max(ident.credits, 0.0))
    ident.credits = max(ident.credits - cost, 0.0)
    return spent_now


def credits_reset(ident: Identity) -> float:
    """The upstream's monthly reset; returns the credits it wasted."""
    wasted = max(ident.credits or 0.0, 0.0)
    ident.credits = ident.plan.allowance
    ident.reset_s = ident.plan.reset_s + CREDIT_CYCLE_S
    return wasted


# --- outlier ejection (routing/completions.py) ---------------------------------------


def failure_record(ident: Identity, t: float, knobs: Knobs) -> bool:
    """``_failure_record``: one more failure in a row; at
    ``ejection_failures`` the identity is ejected for base · 2^(ejections in a
    row), capped. A failure while it is ejected (a lease that was already
    out) changes nothing. Returns whether it was ejected now."""
    if ident.ejected_until_s > t:
        return False
    ident.failure_streak += 1
    if ident.failure_streak < knobs.ejection_failures:
        return False
    length = min(knobs.ejection_base_s * 2**ident.ejections, knobs.ejection_max_s)
    ident.ejected_until_s = t + length
    ident.ejected_until = at(ident.ejected_until_s)
    ident.failure_streak = 0
    ident.ejections += 1
    touch(ident)
    return True


def success_record(ident: Identity) -> None:
    """A success ends the failure streak and the run of ejections."""
    ident.failure_streak = 0
    ident.ejections = 0


# --- quota (routing/quotas.py) -------------------------------------------------------


def quota_exhaust(ident: Identity, t: float, knobs: Knobs) -> None:
    """``identity_quota_exhaust``: every alias out; the first probe may go a
    probe interval later (it is only used when no reset time is known)."""
    ident.exhausted = True
    ident.next_probe_s = t + knobs.quota_probe_s
    touch(ident)


def quota_restore(ident: Identity) -> None:
    """``identity_quota_restore``: every alias back; a balance at or below the
    minimum is forgotten (it is what took them out)."""
    ident.exhausted = False
    ident.next_probe_s = None
    for account in ident.accounts:
        if account.reported_credits is not None and account.reported_credits <= MIN_REMAINING_CREDITS:
            account.reported_credits = None
    touch(ident)


def quota_resets_apply(ident: Identity) -> None:
    """``quota_resets_apply`` at the known reset time: restore, and forget the
    reset time until a completion reports the next one."""
    quota_restore(ident)
    for account in ident.accounts:
        account.resets_at_s = None


def account_report(account: Account, t: float, knobs: Knobs) -> None:
    """``account_report``: a completion reports the balance (and the reset
    time, when the upstream tells it). A balance above the minimum brings an
    exhausted account back; at or below, it gets a probe time."""
    ident = account.identity
    plan = ident.plan
    if plan is None:
        return
    if plan.reset_known:
        account.resets_at_s = ident.reset_s
    account.reported_credits = ident.credits
    if ident.credits > MIN_REMAINING_CREDITS:
        if ident.exhausted:
            ident.exhausted = False
            ident.next_probe_s = None
    elif ident.next_probe_s is None:
        ident.next_probe_s = t + knobs.quota_probe_s
    touch(ident)


def quota_probe_take(ident: Identity, t: float, knobs: Knobs) -> None:
    """``_quota_probe_take``: the probe goes, and the wait for the next restarts."""
    ident.next_probe_s = t + knobs.quota_probe_s
    touch(ident)
