"""Acquiring a lease: which account serves this request (the sticky fast
path, sticky patience, the ordered walk) and when to wait for a slot or
answer why not. Taking the slot itself is ``routing/slots.py``; ending the
lease is ``routing/completions.py``. Keyword-only, typed.

On PostgreSQL the hottest cases run as one statement each
(``routing/pg.py``, chosen once at startup by ``routing/backend.py``); the
ORM code here is the specification and answers every case.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Min
from django.utils import timezone

from accounts.models import ApiKey, RouteStrategy, RoutingIdentity
from core.errors import AllAccountsFailed, NoUsableAccount, RateLimited
from routing import metrics, readiness, selection, slots, waiting, wakeups
from routing.backend import backend
from routing.dispatch import Acquired, CandidateRow, DispatchRequest, SessionState
from routing.models import Lease, StickyOutcome
from routing.selectors import dispatch as reads
from routing.selectors import key_accounts, walk
from routing.selectors.candidates import HEAD_ROWS
from routing.selectors.counts import EXPIRY_FLOOR
from routing.selectors.latency import StoredSnapshot, latency_snapshot_current

# Past a lease's expiry before looking again, so the expired lease no longer counts.
EXPIRY_WAKE_MARGIN_SECONDS = 0.01


# --- acquire -----------------------------------------------------------------------


# The share of a key's sessions found bound below which the sticky fast
# path looks the binding up first (``StickyOdds``): the look-up pays when
# (1 - share) x the sticky statement's miss costs more than the look-up,
# which costs about two fifths of the miss, and a bound session's turn then
# waits for one round trip more.
STICKY_LOOKUP_FIRST_BELOW = 0.6
# Each dispatch's weight in that running share: about the last 30 count.
STICKY_SHARE_WEIGHT = 1 / 32


class StickyOdds:
    """How often a key's sessions in this process came back to a live
    binding, which decides how the sticky fast path asks for it (PostgreSQL).

    The sticky statement (``pg.Statements.sticky_claim``) reads the bound
    account, claims its slot and inserts the lease in one round trip. With
    no binding it has nothing to do, but Python still builds the lease row
    and the statement's parameters, and PostgreSQL still starts its whole
    plan: a new session paid about 0.5 ms of CPU for that miss, where a
    look-up of the binding alone (``reads.session_bound``) costs about 0.2
    (in-process, both sides, bench/HISTORY.md). So while most of a key's
    sessions are new the look-up goes first, and the statement runs only for
    a session it found bound; while most come back, the statement goes
    first, one round trip for a returning turn. Both read the same binding,
    so the choice changes the cost of an answer, never the answer. A key
    starts as returning (the statement first), as gateways' traffic mostly
    is."""

    def __init__(self, *, lookup_first_below: float = STICKY_LOOKUP_FIRST_BELOW) -> None:
        self.lookup_first_below = lookup_first_below
        self._bound: dict[int, float] = {}

    def lookup_first(self, key_id: int) -> bool:
        return self._bound.get(key_id, 1.0) < self.lookup_first_below

    def observe(self, key_id: int, *, bound: bool) -> None:
        # Unlocked: two threads racing lose one observation, not the share.
        share = self._bound.get(key_id, 1.0)
        self._bound[key_id] = share + (float(bound) - share) * STICKY_SHARE_WEIGHT


sticky_odds = StickyOdds()


def lease_acquire(*, key: ApiKey, request: DispatchRequest) -> Acquired:
    """Choose an account for one upstream request and hold a lease on it.

    A returning turn whose bound account is only crowded waits for it a
    while (sticky patience) before it moves. A dispatch that finds every
    candidate only locally throttled waits for a slot up to
    ``request.max_wait_ms``, woken by a release in any process, the end of a
    pacing interval, cooldown or ejection, or a lease expiry; a process lets
    only so many wait (``routing/waiting.py``). Raises the typed API errors of
    SPEC §2 otherwise."""
    slots.key_limits_check(key=key, now=timezone.now())
    preferred = key_accounts.model_preference(key, request.model)
    deadline = time.monotonic() + request.max_wait_ms / 1000
    with waiting.room.visit(key_id=key.pk, max_wait_ms=request.max_wait_ms) as visit:
        bound_name = None
        if request.session_id and not preferred:
            # Taken before the read that may send the turn waiting for its
            # account (sticky patience): a release from here on wakes that
            # wait. current(), which leaves starting the listener to a turn
            # that does wait: with token() here, closed-loop runs served
            # about a tenth fewer dispatches (README, "Waking"; why was not
            # established).
            token = wakeups.current()
            sticky, bound = _sticky_fast_path(key=key, request=request)
            if sticky is not None:
                return sticky
            if bound is not None:
                bound_name = bound.candidate.account
                sticky = _sticky_patience(
                    key=key, request=request, bound=bound, visit=visit, deadline=deadline, token=token
                )
                if sticky is not None:
                    return sticky
        return _walk(key=key, request=request, preferred=preferred, visit=visit, deadline=deadline, bound=bound_name)


def _walk(
    *, key: ApiKey, request: DispatchRequest, preferred: frozenset[str], visit: waiting.Visit, deadline: float, bound
) -> Acquired:
    """The ordered walk (SPEC §2): claim the first candidate of the order
    that can start a lease; wait, or answer why not."""
    while True:
        token = wakeups.token()
        with visit.claims() as claims:
            with visit.turn(token):
                now = timezone.now()
                read = dict(key=key, request=request, now=now, preferred=preferred)
                # Key 3 (fewest bound sessions) applies: the request has a session
                # id and the sticky fast path did not serve it.
                head = reads.read(**read, snapshot=_snapshot(key), spread=bool(request.session_id), head=True)
                ready = list(itertools.takewhile(lambda row: row.ready, head.rows))
                # A release came during this waiter's turn, after an older
                # waiter's read: that one looks first.
                yielded = bool(ready) and visit.older_due()
                # The first identity it can claim on is taken before the turn
                # passes on: the next reader of the same head already skips it.
                if not yielded:
                    for row in ready:
                        if claims.take(row.identity_id):
                            break
            if yielded:
                continue
            if ready and bound is None and head.bound_account_id is not None:
                # Bound to an account that is no candidate (disabled, or out
                # of the key's group): the lease names the one it moves from.
                bound = key_accounts.account_name(account_id=head.bound_account_id)
            for row in ready:
                if row.identity_id in claims.skipped or not claims.take(row.identity_id):
                    # Another attempt of the key here is (or was, as this head
                    # was read) claiming on it: it is starting a lease, which
                    # puts it behind earlier starts.
                    continue
                sticky = _sticky_of(row, head.bound_account_id)
                grant = slots.slot_claim(
                    key=key, row=row, request=request, waited_ms=visit.waited_ms, sticky=sticky, bound=bound
                )
                if grant is not None:
                    session = SessionState.of(request.session_id, head.bound_account_id)
                    return Acquired(grant, row, session, visit.waited_ms, sticky)
        if claims.skipped:
            visit.claims_wait(claims.skipped)  # read again once those claims are through
            continue
        if len(ready) == HEAD_ROWS:
            continue  # every row of the head was taken a moment before us: read again
        everyone = reads.read(**read, snapshot=None, spread=False).rows if head.rows else []
        candidates = [row for row in everyone if not row.excluded]
        if not candidates:
            # Every candidate excluded, or none at all: the request excluded
            # every enabled account (502), or some it did not are spent (503).
            if key_accounts.every_account_excluded(key=key, request=request):
                raise AllAccountsFailed()
            raise NoUsableAccount()
        miss = readiness.miss_of([row.candidate for row in candidates], now, slow_start=_slow_start())
        if not miss.locally_throttled:
            if miss.shortest_cooldown is not None:
                raise RateLimited(
                    "every candidate account is cooling down",
                    retry_after=readiness.retry_after_seconds(miss.shortest_cooldown),
                )
            raise NoUsableAccount()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # The earliest a retry could succeed without a release: a pacing
            # interval, a cooldown or an ejection ending, a slow-start step.
            retry = (miss.next_ready_at - timezone.now()) if miss.next_ready_at else timedelta(seconds=1)
            raise RateLimited(
                "every candidate account is at its concurrency or pacing limit, or cooling down",
                retry_after=readiness.retry_after_seconds(retry),
            )
        slots.key_limits_recheck(key=key, visit=visit)
        visit.wait(token, min(remaining, _wake_in(miss, candidates)))
        slots.key_usable_recheck(key=key, visit=visit)


def dispatch_warm() -> None:
    """Compile the statements of the common dispatches now, without running
    them: keys routing over a group or the whole pool, preferring either
    pool, with and without a session id and a usable latency snapshot. The
    reads are the ones :func:`_sticky_fast_path` and :func:`_walk` build (a
    test checks that such dispatches compile nothing more). Other shapes (a
    fixed account, exclusions, a model preference) compile on first use.
    Touches no database."""
    now = timezone.now()
    usable = StoredSnapshot(
        id=0,
        sample_count=0,
        window_seconds=0,
        snapshot=selection.LatencySnapshot(generated_at=now, global_avg_ms=1.0, accounts={}, proxies={}),
    )
    # A group's id, like every value, is a parameter of the statement, not part of its shape.
    for group_id, pool, session_id in itertools.product((1, None), selection.POOLS, ("warm-up", None)):
        key = ApiKey(route_strategy=RouteStrategy.AUTO, account_group_id=group_id, preferred_pool=pool)
        read = dict(key=key, request=DispatchRequest(session_id=session_id), now=now, lease_floor=EXPIRY_FLOOR)
        shapes = [
            *(reads.request_shape(**read, snapshot=s, spread=bool(session_id), head=True)[0] for s in (usable, None)),
            reads.request_shape(**read, snapshot=None, spread=False)[0],  # when nothing could be claimed
        ]
        if session_id:
            shapes.append(reads.request_shape(**read, snapshot=None, spread=False, bound_only=True)[0])
        # A large pool's head read goes through the walk (selectors/walk.py).
        shapes += [dataclasses.replace(s, walk=True) for s in shapes if walk.walkable(s, size=sys.maxsize)]
        for shape in shapes:
            reads.compiled(shape)
    if backend.statements is not None:
        backend.statements.warm()
        reads.binding_lookup()


def _sticky_of(row: CandidateRow, bound_account_id: int | None) -> StickyOutcome | None:
    if bound_account_id is None:
        return None
    return StickyOutcome.HIT if row.account_id == bound_account_id else StickyOutcome.MOVED


def _snapshot(key: ApiKey):
    return latency_snapshot_current() if key.latency_routing_enabled else None


def _slow_start() -> timedelta:
    return timedelta(seconds=settings.KIROPOOL_SLOW_START_SECONDS)


def _wake_in(miss: readiness.Miss, candidates: list[CandidateRow], *, holds: bool = True) -> float:
    """Seconds until something other than a release may free a slot: the end
    of a pacing interval, cooldown or ejection, a slow-start step, the
    expiry of a lease on a full identity, or (unless ``holds`` is False:
    a returning turn's own claim does not count them) the lapse of a slot
    held for a returning turn (neither of which anyone announces: the
    lease's holder or the turn waiting may have died)."""
    now = timezone.now()
    wake = float("inf")
    if miss.next_ready_at is not None:
        wake = max(0.0, (miss.next_ready_at - now).total_seconds())
    full = [row for row in candidates if row.candidate.routing_identity in miss.saturated]
    expiry = _next_lease_expiry(identity_ids={row.identity_id for row in full}) if full else None
    if expiry is not None:
        wake = min(wake, (expiry - now).total_seconds() + EXPIRY_WAKE_MARGIN_SECONDS)
    held = {row.identity_id for row in full if holds and row.candidate.reserved}
    lapse = _next_hold_lapse(identity_ids=held) if held else None
    if lapse is not None:
        wake = min(wake, (lapse - now).total_seconds() + EXPIRY_WAKE_MARGIN_SECONDS)
    return wake


def _next_lease_expiry(*, identity_ids: set[int]) -> datetime | None:
    """When the first live lease on these identities expires (the waiting path only)."""
    return Lease.objects.filter(
        identity_id__in=identity_ids, completed_at__isnull=True, expires_at__gt=timezone.now()
    ).aggregate(first=Min("expires_at"))["first"]


def _next_hold_lapse(*, identity_ids: set[int]) -> datetime | None:
    """When the first live hold on these identities lapses (the waiting path only)."""
    return RoutingIdentity.objects.filter(
        pk__in=identity_ids, sticky_waiters__gt=0, sticky_wait_until__gt=timezone.now()
    ).aggregate(first=Min("sticky_wait_until"))["first"]


def _sticky_fast_path(
    *, key: ApiKey, request: DispatchRequest, waited_ms: int = 0
) -> tuple[Acquired | None, CandidateRow | None]:
    """SPEC §2's sticky fast path, reading only the bound account: most
    requests of a conversation end here without reading the rest of the pool.
    Returns the lease when it served, and the bound account's row (None when
    the session has no live binding to one of the key's candidates)."""
    now = timezone.now()
    read = dict(key=key, request=request, now=now, snapshot=None, spread=False, bound_only=True)
    outcome = StickyOutcome.WAITED if waited_ms else StickyOutcome.HIT
    if backend.statements is not None and not key.min_start_interval_ms:
        # A turn waiting for its account (``waited_ms``) was found bound
        # already: it goes straight to the statement.
        if (
            not waited_ms
            and sticky_odds.lookup_first(key.pk)
            and not reads.session_bound(key=key, session_id=request.session_id, now=now)
        ):
            sticky_odds.observe(key.pk, bound=False)
            return None, None
        shape, values = reads.request_shape(**read)
        lease = slots.lease_new(key=key, request=request, now=now, waited_ms=waited_ms)
        lease.sticky = outcome
        cap = slots.key_cap(key)
        row, claim = backend.statements.sticky_claim(shape=shape, values=values, lease=lease, key_cap=cap)
        if claim.key_full and slots.key_slots_free(key_id=key.pk, cap=cap):
            row, claim = backend.statements.sticky_claim(shape=shape, values=values, lease=lease, key_cap=cap)
        sticky_odds.observe(key.pk, bound=row is not None)
        if not claim.leased:
            # No bound row to serve, or the key had no free slot, which the
            # walk's claim answers.
            return None, row
        lease.account_id, lease.identity_id = row.account_id, row.identity_id
        return Acquired(slots.grant(lease), row, SessionState.STICKY, waited_ms, outcome), row
    bound = reads.read(**read).rows
    if not bound:
        return None, None
    row = bound[0]
    ctx = selection.SelectionContext(now=now, slow_start=_slow_start())
    if row.excluded or row.candidate.quota_probe or not readiness.sticky_fast_path_ok(row.candidate, ctx):
        return None, row
    grant = slots.slot_claim(key=key, row=row, request=request, waited_ms=waited_ms, sticky=outcome)
    if grant is None:
        return None, row
    return Acquired(grant, row, SessionState.STICKY, waited_ms, outcome), row


def _sticky_patience(
    *, key: ApiKey, request: DispatchRequest, bound: CandidateRow, visit: waiting.Visit, deadline: float, token: int
) -> Acquired | None:
    """A returning turn whose bound account is only crowded waits for it,
    up to the key's patience (capped by the request's wait budget), rather
    than move and lose its upstream prompt cache. While it waits its
    identity holds a slot for it that new sessions may not take.

    ``token`` was taken before ``bound`` was read, and each later token
    before the read after a wait, so a release between a read and the wait
    it decided on wakes that wait (``routing/wakeups.py``)."""
    patience = settings.KIROPOOL_STICKY_PATIENCE_MS if key.sticky_patience_ms is None else key.sticky_patience_ms
    now = timezone.now()
    ctx = selection.SelectionContext(now=now, slow_start=_slow_start())
    if bound.excluded or patience <= 0 or not readiness.sticky_patience_applies(bound.candidate, ctx):
        return None
    until = min(deadline, time.monotonic() + patience / 1000)
    if until <= time.monotonic():
        return None
    wakeups.listening()  # started before the first wait (PostgreSQL); until then a wait polls
    slots.identity_hold(identity_id=bound.identity_id, until=now + timedelta(seconds=until - time.monotonic()))
    acquired = None
    try:
        row = bound
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return None
            miss = readiness.miss_of([row.candidate], timezone.now(), slow_start=_slow_start())
            slots.key_limits_recheck(key=key, visit=visit)
            # Holds do not keep a returning turn out, its own included.
            visit.wait(token, min(left, _wake_in(miss, [row], holds=False)))
            slots.key_usable_recheck(key=key, visit=visit)
            token = wakeups.token()
            with visit.turn(token):
                acquired, row = _sticky_fast_path(key=key, request=request, waited_ms=max(1, visit.waited_ms))
            if acquired is not None:
                metrics.sticky_wait_observe(visit.waited)
                return acquired
            now = timezone.now()
            ctx = selection.SelectionContext(now=now, slow_start=_slow_start())
            if row is None or not readiness.sticky_patience_applies(row.candidate, ctx):
                return None  # cooling, ejected or gone since: move now
    finally:
        slots.identity_unhold(identity_id=bound.identity_id, leased=acquired is not None)
