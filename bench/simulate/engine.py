"""A discrete-event model of the dispatcher, in simulated seconds.

It plays SPEC §2 and §3 and ``routing/leases.py`` against a policy's
ordering. A dispatch call:

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

Completions release the slot, record the latency sample, bind the session
(success), cool the identity (rate_limited), take its accounts out
(quota_exhausted), count toward its failure streak and eject it (retry_next,
fatal, with ejection on); the balance they report updates the account. The
gateway retries a failed request as a new dispatch call, excluding the
account. The upstream's credits reset at their reset time, wasting what is
left. Every simulated minute the latency snapshot is rebuilt from the last
hour of samples with ``routing.latency.latency_snapshot_build``, as the
Celery task does.

Nothing here is random: all chance is in the traffic (and in a policy's own
seeded generator), so a run is a pure function of scenario, traffic, policy
and dispatcher. Events at the same instant run in the order they were
scheduled.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

from bench.simulate import state as st
from bench.simulate.affinity import Bindings
from bench.simulate.policies import Policy, SessionState, View
from bench.simulate.results import MOVED_CROWDED, MOVED_OTHER, STAYED, RunResult
from bench.simulate.scenario import Knobs, Pool
from bench.simulate.state import NEVER, Account, Identity, at, seconds
from bench.simulate.traffic import Script, Traffic, first_token_ms, peak_window
from bench.simulate.variants import PLAIN, Dispatcher
from routing.latency import latency_snapshot_build
from routing.readiness import ThrottleState, miss_of, sticky_fast_path_ok, sticky_patience_applies
from routing.selection import Candidate, LatencySnapshot, SelectionContext

_ARRIVE, _COMPLETE, _TICK, _WAKE, _DEADLINE, _RESET, _CREDIT_RESET, _PATIENCE_END = range(8)

# Credits a served request spends (Kiro bills per request; one keeps the
# figures readable).
CREDITS_PER_REQUEST = 1.0


@dataclass(slots=True)
class _Request:
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
class _Lease:
    request: _Request
    account: Account
    outcome: str
    first_token_ms: float
    started_s: float
    probe: bool = False


class Engine:
    def __init__(
        self,
        pool: Pool,
        knobs: Knobs,
        traffic: Traffic,
        policy: Policy,
        dispatcher: Dispatcher = PLAIN,
    ) -> None:
        self.knobs = knobs
        self.traffic = traffic
        self.policy = policy
        self.dispatcher = dispatcher
        self.pool = pool
        self.slow_start = timedelta(seconds=knobs.slow_start_s)
        self.patience_s = dispatcher.sticky_patience_ms / 1000.0 if policy.sticky else 0.0
        bursts: dict[str, list[tuple[float, float]]] = {}
        for b in traffic.bursts:
            bursts.setdefault(b.identity, []).append((b.start_s, b.end_s))
        quota: dict[str, list[tuple[float, float]]] = {}
        for e in sorted(traffic.quota_events, key=lambda e: e.at_s):
            quota.setdefault(e.identity, []).append((e.at_s, e.reset_after_s))
        failures: dict[str, list] = {}
        for w in traffic.failures:
            failures.setdefault(w.identity, []).append(w)
        plans = {p.identity: p for p in traffic.credit_plans}
        self.identities = {
            s.name: Identity(
                s, bursts.get(s.name, []), deque(quota.get(s.name, [])), failures.get(s.name, []), plans.get(s.name)
            )
            for s in pool.identities
        }
        self.accounts = [
            Account(a, self.identities[a.identity], pool.proxy_extra_ms(a.proxy_url))
            for a in sorted(pool.accounts, key=lambda a: a.name)
        ]
        for account in self.accounts:
            account.identity.accounts.append(account)
        self.names = [s.name for s in pool.identities]
        # One account per identity, to ask throttle_state about the identity.
        self.representative = {a.identity.spec.name: a for a in reversed(self.accounts)}
        # Identity states, kept current: an identity is re-asked when it
        # changed (its version) or when a cooldown, pacing interval or
        # slow-start step may have changed it (states_until), not on every walk.
        self.states: dict[str, ThrottleState] = {}
        self.states_version: dict[str, int] = {}
        self.states_until = -NEVER
        self.index = {name: i for i, name in enumerate(self.names)}

        self.bindings = Bindings(ttl_s=knobs.affinity_ttl_s, max_entries=knobs.affinity_max_entries)
        # Samples in the snapshot window: their times, and (account, proxy, ms)
        # rows in the shape latency_snapshot_build reads.
        self.sample_times: deque[float] = deque(t for t, *_ in traffic.warm_samples)
        self.sample_rows: deque[tuple[str, str | None, float]] = deque(row for _, *row in traffic.warm_samples)
        self.snapshot: LatencySnapshot | None = None
        self.patient: list[_Request] = []  # waiting for their bound account (patience), oldest first
        self.waiters: list[_Request] = []  # waiting for a slot anywhere, oldest first
        self.wakes: set[float] = set()
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0

        n = len(self.names)
        self.result = RunResult(
            policy=dispatcher.name or policy.name,
            identities=list(self.names),
            served=[0] * n,
            available_s=[0.0] * n,
            binding_ticks=[],
            bindings=[],
            latencies_ms=[],
            waits_ms=[],
            sessions_moved=0,
            requests=0,
            rejected={},
            upstream_errors={},
            peak_s=peak_window(traffic),
        )

    # -- event queue --------------------------------------------------------

    def _at(self, t: float, kind: int, payload: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self) -> RunResult:
        period = self.knobs.snapshot_period_s
        ticks = int(self.traffic.duration_s // period)
        # Pending work past the end is dropped: every tick has run by then.
        end = ticks * period
        # Scheduled first, so a reset runs before anything else at its instant.
        for ident in self.identities.values():
            if ident.plan is not None and ident.reset_s <= end:
                self._at(ident.reset_s, _CREDIT_RESET, ident)
        for script in self.traffic.scripts:
            self._at(script.arrival_s, _ARRIVE, _Request(script, 0))
        for i in range(ticks + 1):
            self._at(i * period, _TICK)
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > end:
                break
            if kind == _ARRIVE:
                self.result.requests += 1
                self._dispatch_start(payload, t)
            elif kind == _COMPLETE:
                self._complete(payload, t)
                self._serve(t)
            elif kind == _TICK:
                self._tick(t)
            elif kind == _WAKE:
                self.wakes.discard(t)
                self._serve(t)
            elif kind == _DEADLINE:
                self._deadline(payload, t)
            elif kind == _PATIENCE_END:
                self._patience_end(payload, t)
            elif kind == _RESET:
                st.quota_restore(payload)  # the operator reset the identity's accounts
                self._serve(t)
            elif kind == _CREDIT_RESET:
                self._credit_reset(payload, t)
                self._serve(t)
        self.result.sessions_moved = self.bindings.moved
        return self.result

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

    def _bound(self, req: _Request) -> Account | None:
        return self.bindings.get(req.script.key, req.script.session_id)

    def _bound_candidate(self, bound: Account | None, req: _Request, t: float) -> Candidate | None:
        """The bound account as the fast path reads it: None unless it is a
        candidate (selectable, not excluded) and not only there as a probe."""
        if bound is None or bound.spec.name in req.exclude or not st.selectable(bound, t) or st.quota_probe(bound):
            return None
        return self._candidate(bound)

    def _dispatch_start(self, req: _Request, t: float) -> None:
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

    def _walk(self, req: _Request, t: float) -> tuple[str, object]:
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

    def _walk_start(self, req: _Request, t: float) -> None:
        verdict, value = self._walk(req, t)
        if verdict == "lease":
            self._wait_end(req, t)
            self._acquire(req, value, t)
        elif verdict == "wait" and req.deadline_s > t:
            self._wait_begin(req, t)
            self.waiters.append(req)
            self._at(req.deadline_s, _DEADLINE, (req, req.call))
            self._wake(value)
        else:
            self._wait_end(req, t)
            self._finish(req, t, rejected="429 wait budget spent" if verdict == "wait" else value)

    # -- waiting ------------------------------------------------------------

    def _wait_begin(self, req: _Request, t: float) -> None:
        if req.wait_started_s is None:
            req.wait_started_s = t

    def _wait_end(self, req: _Request, t: float) -> None:
        if req.wait_started_s is not None:
            req.waited_s += t - req.wait_started_s
            req.wait_started_s = None

    def _wake(self, t: float | None) -> None:
        if t is not None and t not in self.wakes:
            self.wakes.add(t)
            self._at(t, _WAKE)

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

    def _deadline(self, payload: tuple[_Request, int], t: float) -> None:
        req, call = payload
        if req.call != call or req not in self.waiters:
            return
        self.waiters.remove(req)
        self._wait_end(req, t)
        self._finish(req, t, rejected="429 wait budget spent")

    # -- sticky patience (routing/leases.py _sticky_patience) ---------------

    def _patience_begin(self, req: _Request, bound: Account, candidate: Candidate, ctx, t: float) -> bool:
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
        self._at(until, _PATIENCE_END, (req, req.call))
        self._wake(seconds(miss.next_ready_at) if miss.next_ready_at is not None else None)
        return True

    def _patience_leave(self, req: _Request) -> Account:
        account = req.patient_on
        self.patient.remove(req)
        req.patient_on = None
        account.identity.reserved -= 1
        st.touch(account.identity)
        return account

    def _patience_check(self, req: _Request, t: float) -> None:
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

    def _patience_end(self, payload: tuple[_Request, int], t: float) -> None:
        req, call = payload
        if req.call != call or req.patient_on is None:
            return
        self._patience_leave(req)
        self._walk_start(req, t)

    # -- leases -------------------------------------------------------------

    def _acquire(self, req: _Request, account: Account, t: float) -> None:
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
        self._at(t + duration, _COMPLETE, _Lease(req, account, outcome, ft, t, probe))

    def _complete(self, lease: _Lease, t: float) -> None:
        account, ident, req = lease.account, lease.account.identity, lease.request
        ident.in_flight -= 1
        st.touch(ident)
        if lease.outcome == "success":
            st.success_record(ident)
            self.result.credits_spent += st.credits_spend(ident, CREDITS_PER_REQUEST)
            st.account_report(account, t, self.knobs)
            if lease.probe:
                st.quota_restore(ident)  # a probe that succeeded
            self.sample_times.append(t)
            self.sample_rows.append((account.spec.name, account.spec.proxy_url, lease.first_token_ms))
            self.policy.observe(account.spec.name, lease.first_token_ms)
            self.result.served[self.index[ident.spec.name]] += 1
            self.result.latencies_ms.append(lease.first_token_ms)
            # What the user sees: waits, failed attempts and the first token.
            first_token_at = lease.started_s + lease.first_token_ms / 1000.0
            self.result.first_tokens.append((req.arrival_s, (first_token_at - req.arrival_s) * 1000.0))
            if req.bound_at_arrival is not None:
                code = STAYED
                if account.spec.name != req.bound_at_arrival:
                    code = MOVED_CROWDED if req.crowded_at_arrival else MOVED_OTHER
                self.result.returning.append((req.arrival_s, code))
            if req.script.session_id is not None:
                self.bindings.bind(req.script.key, req.script.session_id, account, t)
            self._finish(req, t)
            return
        self.result.upstream_errors[lease.outcome] = self.result.upstream_errors.get(lease.outcome, 0) + 1
        if lease.outcome == "rate_limited":
            ident.cooldown_until_s = t + self.knobs.cooldown_s
            ident.cooldown_until = at(ident.cooldown_until_s)
            st.touch(ident)
            # the walk skips a cooling identity; wake the waiters when it is back
            self._wake(ident.cooldown_until_s)
        elif lease.outcome == "quota_exhausted":
            st.quota_exhaust(ident, t, self.knobs)
            if ident.quota_blocked_until_s > t:
                self._at(ident.quota_blocked_until_s, _RESET, ident)  # an operator resets it then
        elif self.dispatcher.ejection and st.failure_record(ident, t, self.knobs):
            self.result.ejections += 1
            self._wake(ident.ejected_until_s)
        req.exclude.add(account.spec.name)
        self._dispatch_start(req, t)

    def _finish(self, req: _Request, t: float, *, rejected: str | None = None) -> None:
        self.result.waits_ms.append(req.waited_s * 1000.0)
        self.result.turn_arrivals_s.append(req.arrival_s)
        if rejected is not None:
            self.result.rejected[rejected] = self.result.rejected.get(rejected, 0) + 1
        nxt = req.turn + 1
        if nxt < len(req.script.turns):
            self._at(t + req.script.turns[nxt].think_s, _ARRIVE, _Request(req.script, nxt))

    def _credit_reset(self, ident: Identity, t: float) -> None:
        wasted = st.credits_reset(ident)
        self.result.credits_wasted += wasted
        self.result.resets.append((t, ident.spec.name, wasted))
        if ident.plan.reset_known:
            st.quota_resets_apply(ident)
        if ident.reset_s <= self.traffic.duration_s:
            self._at(ident.reset_s, _CREDIT_RESET, ident)

    # -- the periodic work --------------------------------------------------

    def _tick(self, t: float) -> None:
        window_start = t - self.knobs.snapshot_window_s
        while self.sample_times and self.sample_times[0] < window_start:
            self.sample_times.popleft()
            self.sample_rows.popleft()
        if self.policy.uses_snapshot:
            self.snapshot = latency_snapshot_build(self.sample_rows, generated_at=at(t))
        self.bindings.expire(t)
        counts = [0] * len(self.names)
        for account in self.accounts:
            counts[self.index[account.identity.spec.name]] += account.bound
        self.result.binding_ticks.append(t)
        self.result.bindings.append(counts)
        period = self.knobs.snapshot_period_s
        for i, name in enumerate(self.names):
            ident = self.identities[name]
            if not ident.blocked(t) and any(st.selectable(a, t) for a in ident.accounts):
                self.result.available_s[i] += period


def simulate(pool: Pool, knobs: Knobs, traffic: Traffic, policy: Policy, dispatcher: Dispatcher = PLAIN) -> RunResult:
    return Engine(pool, knobs, traffic, policy, dispatcher).run()
