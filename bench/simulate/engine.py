"""A discrete-event model of the dispatcher, in simulated seconds.

It plays SPEC §2 and §3, ``routing/leases.py`` and ``routing/completions.py``
against a policy's ordering. The engine holds the simulated pool and runs
its event queue: turns arrive, leases complete, credits reset, and the
periodic work runs. A turn's dispatch call (the sticky fast path, sticky
patience, the ordered walk, waiting for a slot) is ``leases.py``, which the
engine inherits; it runs one when a turn arrives or retries, and lets the
waiting requests try again whenever a slot may have freed.

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
from datetime import timedelta

from bench.simulate import state as st
from bench.simulate.affinity import Bindings
from bench.simulate.events import ARRIVE, COMPLETE, CREDIT_RESET, DEADLINE, PATIENCE_END, RESET, TICK, WAKE
from bench.simulate.leases import DispatchCalls, Lease, Request
from bench.simulate.policies import Policy
from bench.simulate.results import MOVED_CROWDED, MOVED_OTHER, STAYED, RunResult
from bench.simulate.scenario import Knobs, Pool
from bench.simulate.state import NEVER, Account, Identity, at
from bench.simulate.traffic import Traffic, peak_window
from bench.simulate.variants import PLAIN, Dispatcher
from routing.latency import SampleGroup, latency_snapshot_build
from routing.readiness import ThrottleState
from routing.selection import LatencySnapshot

# Credits a served request spends (Kiro bills per request; one keeps the
# figures readable).
CREDITS_PER_REQUEST = 1.0


class Engine(DispatchCalls):
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
        # Samples in the snapshot window: their times, and each as the group
        # of one latency_snapshot_build reads.
        self.sample_times: deque[float] = deque(t for t, *_ in traffic.warm_samples)
        self.sample_rows: deque[SampleGroup] = deque(SampleGroup.of(*row) for _, *row in traffic.warm_samples)
        self.snapshot: LatencySnapshot | None = None
        self.patient: list[Request] = []  # waiting for their bound account (patience), oldest first
        self.waiters: list[Request] = []  # waiting for a slot anywhere, oldest first
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
                self._at(ident.reset_s, CREDIT_RESET, ident)
        for script in self.traffic.scripts:
            self._at(script.arrival_s, ARRIVE, Request(script, 0))
        for i in range(ticks + 1):
            self._at(i * period, TICK)
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > end:
                break
            if kind == ARRIVE:
                self.result.requests += 1
                self._dispatch_start(payload, t)
            elif kind == COMPLETE:
                self._complete(payload, t)
                self._serve(t)
            elif kind == TICK:
                self._tick(t)
            elif kind == WAKE:
                self.wakes.discard(t)
                self._serve(t)
            elif kind == DEADLINE:
                self._deadline(payload, t)
            elif kind == PATIENCE_END:
                self._patience_end(payload, t)
            elif kind == RESET:
                st.quota_restore(payload)  # the operator reset the identity's accounts
                self._serve(t)
            elif kind == CREDIT_RESET:
                self._credit_reset(payload, t)
                self._serve(t)
        self.result.sessions_moved = self.bindings.moved
        return self.result

    # -- a lease's end (routing/completions.py), a turn's end, resets --------

    def _complete(self, lease: Lease, t: float) -> None:
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
            self.sample_rows.append(SampleGroup.of(account.spec.name, account.spec.proxy_url, lease.first_token_ms))
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
                self._at(ident.quota_blocked_until_s, RESET, ident)  # an operator resets it then
        elif self.dispatcher.ejection and st.failure_record(ident, t, self.knobs):
            self.result.ejections += 1
            self._wake(ident.ejected_until_s)
        req.exclude.add(account.spec.name)
        self._dispatch_start(req, t)

    def _finish(self, req: Request, t: float, *, rejected: str | None = None) -> None:
        self.result.waits_ms.append(req.waited_s * 1000.0)
        self.result.turn_arrivals_s.append(req.arrival_s)
        if rejected is not None:
            self.result.rejected[rejected] = self.result.rejected.get(rejected, 0) + 1
        nxt = req.turn + 1
        if nxt < len(req.script.turns):
            self._at(t + req.script.turns[nxt].think_s, ARRIVE, Request(req.script, nxt))

    def _credit_reset(self, ident: Identity, t: float) -> None:
        wasted = st.credits_reset(ident)
        self.result.credits_wasted += wasted
        self.result.resets.append((t, ident.spec.name, wasted))
        if ident.plan.reset_known:
            st.quota_resets_apply(ident)
        if ident.reset_s <= self.traffic.duration_s:
            self._at(ident.reset_s, CREDIT_RESET, ident)

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
