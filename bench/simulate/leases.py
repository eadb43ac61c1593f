"""Acquiring a lease in simulated time: the engine's dispatch call.

It plays SPEC §2 and ``routing/leases.py`` against a policy's ordering. A
dispatch call:

1. the sticky fast path: a returning turn whose bound account is a candidate
   takes it when ``readiness.sticky_fast_path_ok`` says it can start now;
2. sticky patience (when the dispatcher has it): when
   ``readiness.sticky_patience_applies`` (the bound identity is only
   crowded), the turn waits for it, up to the patience and the wait budget,
   holding a slot that other requests may not take (``Candidate.reserved``),
   and is served ahead of them; when patience runs out, or the identity
   starts cooling, it moves on to
3. the ordered walk: candidates (enabled, not spent unless reset or due for
   a probe, not excluded) in the policy's order, the first whose identity
   ``readiness.throttle_state`` finds ready is leased. When none is,
   ``readiness.miss_of`` decides: wait for a slot (woken by a completion, a
   pacing interval, a cooldown or ejection ending) up to ``max_wait_ms``,
   429 when everything is cooling, 503 when nothing is usable. A waiting
   request walks again; it does not retry the fast path (the server does not).

Taking the lease draws the upstream's outcome and schedules its completion;
what the completion writes, and everything else that happens to the pool
over time, is the engine's (``engine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.simulate import state as st
from bench.simulate.events import COMPLETE, DEADLINE, PATIENCE_END, WAKE
from bench.simulate.policies import SessionState, View
from bench.simulate.state import Account, at, seconds
from bench.simulate.traffic import Script, first_token_ms
from routing.readiness import ThrottleState, miss_of, sticky_fast_path_ok, sticky_patience_applies
from routing.selection import Candidate, SelectionContext


@dataclass(slots=True)
class Request:
    """One turn of a script, across its dispatch calls."""

    script: Script
    turn: int
    exclude: set[str] = field(default_factory=set)
    waited_s: float = 0.0
    wait_started_s: float | None = None
    call: int = 0  # dispatch calls so far: a retry after an upstream error is a new call
    deadline_s: float = 0.0  # end of the current call's wait budget
    arrival_s: float | None = None  # of the turn's first call
    bound_at_arrival: str | None = None  # the account its session was bound to then
    crowded_at_arrival: bool = False  # ... and that account was only crowded
    patient_on: Account | None = None  # the bound account it is waiting for (patience)


@dataclass(slots=True)
class Lease:
    """A lease taken, with the outcome the upstream will report: the payload
    of its completion event."""

    request: Request
    account: Account
    outcome: str
    first_token_ms: float
    started_s: float
    probe: bool = False


class DispatchCalls:
    """The dispatch call, as part of the engine: ``Engine`` inherits it and
    sets up everything it reads.

    It reads the engine's setup (the knobs, the policy, the dispatcher, the
    pool, the slow start and the patience) and reads and writes its state
    (the accounts and their identities, the bindings, the latency snapshot,
    the identity states kept current, the patient and waiting requests, the
    pending wakes, the result). It uses two of the engine's methods: ``_at``
    to schedule an event and ``_finish`` to end a turn. The engine calls
    ``_dispatch_start`` when a turn arrives or retries after an upstream
    error, ``_serve`` when a slot may have freed, ``_wake`` when a cooldown
    or ejection will end, and ``_deadline`` and ``_patience_end`` when their
    events come due.
    """

    # -- what the policy sees (selection.py, readiness.py) ------------------

    def _candidate(self, account: Account) -> Candidate:
        return st.candidate(account, credit_pacing=self.dispatcher.credit_pacing)

    def _ctx(self, t: float) -> SelectionContext:
        return SelectionContext(now=at(t), slow_start=self.slow_start)

    def _identity_states(self, t: float) -> dict[str, ThrottleState]:
        """Every identity's throttle state now, re-asked only for identities
        that changed, or for all once one may have run out (``states_until``)."""
        everyone = t >= self.states_until
        changed = False
        for name, account in self.representative.items():
            version = account.identity.version
            if everyone or self.states_version.get(name) != version:
                self.states[name] = st.identity_state(
                    account, t, self.knobs, credit_pacing=self.dispatcher.credit_pacing
                )
                self.states_version[name] = version
                changed = True
        if changed:
            self.states_until = min(a.identity.state_memo[2] for a in self.representative.values())
        return self.states

    # -- a dispatch call ----------------------------------------------------

    def _bound(self, req: Request) -> Account | None:
        return self.bindings.get(req.script.key, req.script.session_id)

    def _bound_candidate(self, bound: Account | None, req: Request, t: float) -> Candidate | None:
        """The bound account as the fast path reads it: None unless it is a
        candidate (selectable, not excluded) and not only there as a probe."""
        if bound is None or bound.spec.name in req.exclude or not st.selectable(bound, t) or st.quota_probe(bound):
            return None
        return self._candidate(bound)

    def _dispatch_start(self, req: Request, t: float) -> None:
        req.call += 1
        req.deadline_s = t + self.knobs.max_wait_ms / 1000.0
        self.bindings.expire(t)
        bound = self._bound(req)
        candidate = self._bound_candidate(bound, req, t)
        ctx = self._ctx(t)
        if req.arrival_s is None:
            req.arrival_s = t
            req.bound_at_arrival = bound.spec.name if bound is not None else None
            req.crowded_at_arrival = candidate is not None and sticky_patience_applies(candidate, ctx)
        if candidate is not None and self.policy.sticky:
            if sticky_fast_path_ok(candidate, ctx):
                self._acquire(req, bound, t)
                return
            if self._patience_begin(req, bound, candidate, ctx, t):
                return
        self._walk_start(req, t)

    def _walk(self, req: Request, t: float) -> tuple[str, object]:
        """The ordered walk: ("lease", account) | ("wait", wake time or None) | ("reject", reason)."""
        self.bindings.expire(t)
        selectable = [a for a in self.accounts if st.selectable(a, t)]
        usable = [a for a in selectable if a.spec.name not in req.exclude]
        if not usable:
            if all(a.spec.name in req.exclude for a in self.accounts):
                return "reject", "502 all eligible accounts failed"
            return "reject", "503 no usable account"
        states = self._identity_states(t)
        now = at(t)
        candidates = [self._candidate(a) for a in usable]
        if not any(states[a.identity.spec.name] == "ready" for a in usable):
            # Nothing can start: neither the fast path nor any order would
            # acquire, so there is no need to ask the policy.
            miss = miss_of(candidates, now, slow_start=self.slow_start)
            if miss.locally_throttled:
                return "wait", seconds(miss.next_ready_at) if miss.next_ready_at is not None else None
            return "reject", "429 all cooling down"

        script = req.script
        session: SessionState = "none"
        totals = None
        if script.session_id is not None:
            session = "sticky" if self._bound(req) is not None else "new"
            # Key 3 counts every account of the key, excluded ones included.
            totals = {}
            for a in selectable:
                name = a.identity.spec.name
                totals[name] = totals.get(name, 0) + a.bound
        view = View(
            now=now,
            session=session,
            snapshot=self.snapshot,
            preferred_pool=self.pool.preferred_pool(script.key),
            session_totals=totals,
        )
        by_name = {a.spec.name: a for a in usable}
        for c in self.policy.order(candidates, view):
            if states[c.routing_identity] == "ready":
                return "lease", by_name[c.account]
        raise AssertionError("a ready candidate was left out of the order")

    def _walk_start(self, req: Request, t: float) -> None:
        verdict, value = self._walk(req, t)
        if verdict == "lease":
            self._wait_end(req, t)
            self._acquire(req, value, t)
        elif verdict == "wait" and req.deadline_s > t:
            self._wait_begin(req, t)
            self.waiters.append(req)
            self._at(req.deadline_s, DEADLINE, (req, req.call))
            self._wake(value)
        else:
            self._wait_end(req, t)
            self._finish(req, t, rejected="429 wait budget spent" if verdict == "wait" else value)

    # -- waiting ------------------------------------------------------------

    def _wait_begin(self, req: Request, t: float) -> None:
        if req.wait_started_s is None:
            req.wait_started_s = t

    def _wait_end(self, req: Request, t: float) -> None:
        if req.wait_started_s is not None:
            req.waited_s += t - req.wait_started_s
            req.wait_started_s = None

    def _wake(self, t: float | None) -> None:
        if t is not None and t not in self.wakes:
            self.wakes.add(t)
            self._at(t, WAKE)

    def _serve(self, t: float) -> None:
        """Something may have freed a slot: the patient sessions try their
        bound accounts first (they are served ahead), then the waiting
        requests walk again, oldest first."""
        for req in list(self.patient):
            self._patience_check(req, t)
        for req in list(self.waiters):
            verdict, value = self._walk(req, t)
            if verdict == "wait":
                self._wake(value)
                continue
            self.waiters.remove(req)
            self._wait_end(req, t)
            if verdict == "lease":
                self._acquire(req, value, t)
            else:
                self._finish(req, t, rejected=value)

    def _deadline(self, payload: tuple[Request, int], t: float) -> None:
        req, call = payload
        if req.call != call or req not in self.waiters:
            return
        self.waiters.remove(req)
        self._wait_end(req, t)
        self._finish(req, t, rejected="429 wait budget spent")

    # -- sticky patience (routing/leases.py _sticky_patience) ---------------

    def _patience_begin(self, req: Request, bound: Account, candidate: Candidate, ctx, t: float) -> bool:
        """Wait for the bound account instead of moving, when it is only crowded."""
        if self.patience_s <= 0 or self.knobs.max_wait_ms <= 0 or not sticky_patience_applies(candidate, ctx):
            return False
        until = min(t + self.patience_s, req.deadline_s)
        if until <= t:
            return False
        # The wake time is read before the hold, as the server reads the row.
        miss = miss_of([candidate], ctx.now, slow_start=self.slow_start)
        bound.identity.reserved += 1
        st.touch(bound.identity)
        req.patient_on = bound
        self.patient.append(req)
        self._wait_begin(req, t)
        self._at(until, PATIENCE_END, (req, req.call))
        self._wake(seconds(miss.next_ready_at) if miss.next_ready_at is not None else None)
        return True

    def _patience_leave(self, req: Request) -> Account:
        account = req.patient_on
        self.patient.remove(req)
        req.patient_on = None
        account.identity.reserved -= 1
        st.touch(account.identity)
        return account

    def _patience_check(self, req: Request, t: float) -> None:
        """Woken: take the bound account if it can start (the held slot is the
        session's own), move now if it is no longer only crowded, or wait on."""
        self.bindings.expire(t)
        account = req.patient_on
        candidate = self._bound_candidate(account, req, t) if self._bound(req) is account else None
        ctx = self._ctx(t)
        if candidate is not None and sticky_fast_path_ok(candidate, ctx):
            self._patience_leave(req)
            self._wait_end(req, t)
            self._acquire(req, account, t)
        elif candidate is None or not sticky_patience_applies(candidate, ctx):
            self._patience_leave(req)
            self._walk_start(req, t)  # cooling, ejected or gone since: move now
        else:
            miss = miss_of([candidate], ctx.now, slow_start=self.slow_start)
            self._wake(seconds(miss.next_ready_at) if miss.next_ready_at is not None else None)

    def _patience_end(self, payload: tuple[Request, int], t: float) -> None:
        req, call = payload
        if req.call != call or req.patient_on is None:
            return
        self._patience_leave(req)
        self._walk_start(req, t)

    # -- taking the lease ---------------------------------------------------

    def _acquire(self, req: Request, account: Account, t: float) -> None:
        ident = account.identity
        probe = st.quota_probe(account)
        if probe:
            st.quota_probe_take(ident, t, self.knobs)
            self.result.probes += 1
        ident.in_flight += 1
        ident.last_started = at(t)
        st.touch(ident)
        turn = req.script.turns[req.turn]
        ft = first_token_ms(ident.spec, turn.z_latency, account.proxy_extra_ms)
        outcome = st.upstream_outcome(ident, t, turn.luck)
        # An upstream error comes back at about first-token time.
        duration = ft / 1000.0 + (turn.generation_s if outcome == "success" else 0.0)
        self._at(t + duration, COMPLETE, Lease(req, account, outcome, ft, t, probe))
