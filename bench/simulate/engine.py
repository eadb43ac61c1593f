"""A discrete-event model of the dispatcher, in simulated seconds.

It plays SPEC §2 and §3 against a policy's ordering: candidates (enabled, not
quota-exhausted, not excluded), session state from live bindings, the sticky
fast path, the ordered walk that skips cooling identities and acquires the
first identity with a free slot and pacing room, waiting for a slot up to
``max_wait_ms`` when every candidate is only locally throttled, 429 when all
are cooling. Completions release the slot, record the latency sample, bind
the session (success), cool the identity (rate_limited) or mark its accounts
quota-exhausted; the gateway then retries the request without that account.
Every simulated minute the latency snapshot is rebuilt from the last hour of
samples with ``routing.latency.latency_snapshot_build``, as the Celery task
does.

Nothing here is random: all chance is in the traffic (and in a policy's own
seeded generator), so a run is a pure function of scenario, traffic and
policy. Events at the same instant run in the order they were scheduled.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from bench.simulate.policies import Policy, SessionState, View, policy_build
from bench.simulate.scenario import AccountSpec, IdentitySpec, Knobs, Pool
from bench.simulate.traffic import Script, Traffic, first_token_ms
from routing.latency import latency_snapshot_build
from routing.selection import (
    POOL_BALANCED,
    Candidate,
    LatencySnapshot,
    SelectionContext,
    ThrottleState,
    pacing_ready_at,
    sticky_fast_path_ok,
    throttle_state,
)

# Simulated t = 0. Any fixed instant works; selection.py only compares times.
EPOCH = datetime(2026, 6, 1, tzinfo=UTC)

_ARRIVE, _COMPLETE, _TICK, _WAKE, _DEADLINE, _RESET = range(6)


@dataclass(slots=True)
class _Identity:
    spec: IdentitySpec
    bursts: list[tuple[float, float]]
    quota_at: deque[tuple[float, float]]  # pending (at, reset_after), by time
    in_flight: int = 0
    last_started: datetime | None = None
    cooldown_until_s: float = float("-inf")
    cooldown_until: datetime | None = None
    exhausted: bool = False
    version: int = 0  # bumped on every change a Candidate shows
    state_memo: tuple[int, ThrottleState, float] | None = None  # (version, state, valid until)


@dataclass(slots=True)
class _Account:
    spec: AccountSpec
    identity: _Identity
    proxy_extra_ms: float
    bound: int = 0  # live bindings pointing here
    cached: tuple[int, int, Candidate] | None = None  # (identity version, bound, candidate)


@dataclass(slots=True)
class _Request:
    script: Script
    turn: int
    exclude: set[str] = field(default_factory=set)
    waited_s: float = 0.0
    wait_started_s: float | None = None
    deadline_s: float = 0.0


@dataclass(slots=True)
class _Lease:
    request: _Request
    account: _Account
    outcome: str
    first_token_ms: float


@dataclass(slots=True)
class RunResult:
    """What one policy did with the traffic. Per-identity lists follow ``identities``."""

    policy: str
    identities: list[str]
    served: list[int]  # successful requests per identity
    available_s: list[float]  # time each identity was selectable (not cooling, not exhausted)
    binding_ticks: list[float]  # tick times (s)
    bindings: list[list[int]]  # live bindings per identity at each tick
    latencies_ms: list[float]  # first-token latency of every successful request
    waits_ms: list[float]  # total dispatch wait of every request (served or not)
    sessions_moved: int  # bindings re-pointed to another account
    requests: int
    rejected: dict[str, int]  # reason -> requests that got no account
    upstream_errors: dict[str, int]  # rate_limited / quota_exhausted leases


class Engine:
    def __init__(self, pool: Pool, knobs: Knobs, traffic: Traffic, policy: Policy) -> None:
        self.knobs = knobs
        self.traffic = traffic
        self.policy = policy
        bursts: dict[str, list[tuple[float, float]]] = {}
        for b in traffic.bursts:
            bursts.setdefault(b.identity, []).append((b.start_s, b.end_s))
        quota: dict[str, list[tuple[float, float]]] = {}
        for e in sorted(traffic.quota_events, key=lambda e: e.at_s):
            quota.setdefault(e.identity, []).append((e.at_s, e.reset_after_s))
        self.identities = {
            s.name: _Identity(s, bursts.get(s.name, []), deque(quota.get(s.name, []))) for s in pool.identities
        }
        self.accounts = [
            _Account(a, self.identities[a.identity], pool.proxy_extra_ms(a.proxy_url))
            for a in sorted(pool.accounts, key=lambda a: a.name)
        ]
        self.names = [s.name for s in pool.identities]
        # One account per identity, to ask throttle_state about the identity.
        self.representative = {a.identity.spec.name: a for a in reversed(self.accounts)}
        # Identity states, kept current: an identity is re-asked when it
        # changed (dirty) or when a cooldown or pacing interval may have run
        # out (states_until), not on every walk.
        self.states: dict[str, ThrottleState] = {}
        self.dirty: set[str] = set(self.representative)
        self.states_until = float("-inf")
        self.index = {name: i for i, name in enumerate(self.names)}

        # (key, session id) -> (account, expires at), least recently updated
        # first: with one TTL for all, that is also expiry order.
        self.bindings: OrderedDict[tuple[str, str], tuple[_Account, float]] = OrderedDict()
        # Samples in the snapshot window: their times, and (account, proxy, ms)
        # rows in the shape latency_snapshot_build reads.
        self.sample_times: deque[float] = deque(t for t, *_ in traffic.warm_samples)
        self.sample_rows: deque[tuple[str, str | None, float]] = deque(row for _, *row in traffic.warm_samples)
        self.snapshot: LatencySnapshot | None = None
        self.waiters: list[_Request] = []
        self.wakes: set[float] = set()
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0

        n = len(self.names)
        self.result = RunResult(
            policy=policy.name,
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
        )

    # -- event queue --------------------------------------------------------

    def _at(self, t: float, kind: int, payload: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self) -> RunResult:
        for script in self.traffic.scripts:
            self._at(script.arrival_s, _ARRIVE, _Request(script, 0))
        period = self.knobs.snapshot_period_s
        ticks = int(self.traffic.duration_s // period)
        for i in range(ticks + 1):
            self._at(i * period, _TICK)
        # Pending work past the end is dropped: every tick has run by then.
        end = ticks * period
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > end:
                break
            if kind == _ARRIVE:
                self.result.requests += 1
                self._dispatch_start(payload, t)
            elif kind == _COMPLETE:
                self._complete(payload, t)
                self._waiters_serve(t)
            elif kind == _TICK:
                self._tick(t)
            elif kind == _WAKE:
                self.wakes.discard(t)
                self._waiters_serve(t)
            elif kind == _DEADLINE:
                self._deadline(payload, t)
            elif kind == _RESET:
                payload.exhausted = False  # the operator reset the identity's accounts
                self._touch(payload)
                self._waiters_serve(t)
        return self.result

    # -- dispatch -----------------------------------------------------------

    @staticmethod
    def _dt(t: float) -> datetime:
        return EPOCH + timedelta(seconds=t)

    def _candidate(self, account: _Account) -> Candidate:
        ident = account.identity
        cached = account.cached
        if cached is not None and cached[0] == ident.version and cached[1] == account.bound:
            return cached[2]
        candidate = Candidate(
            account=account.spec.name,
            routing_identity=ident.spec.name,
            pool=POOL_BALANCED,
            proxy_url=account.spec.proxy_url,
            last_started_at=ident.last_started,
            identity_cooldown_until=ident.cooldown_until,
            in_flight=ident.in_flight,
            max_concurrency=ident.spec.max_concurrency,
            min_start_interval_ms=ident.spec.min_start_interval_ms,
            bound_sessions=account.bound,
        )
        account.cached = (ident.version, account.bound, candidate)
        return candidate

    def _touch(self, ident: _Identity) -> None:
        ident.version += 1
        self.dirty.add(ident.spec.name)

    def _identity_states(self, t: float) -> dict[str, ThrottleState]:
        stale = self.representative.keys() if t >= self.states_until else self.dirty
        if stale:
            for name in stale:
                self.states[name] = self._identity_state(self.representative[name], t)
            self.dirty.clear()
            self.states_until = min(a.identity.state_memo[2] for a in self.representative.values())
        return self.states

    def _identity_state(self, account: _Account, t: float) -> ThrottleState:
        """``throttle_state`` of the account's identity, remembered until it can change.

        Without a change to the identity (its version) a state only changes
        when a cooldown or a pacing interval runs out; ready and saturated
        hold until the next change."""
        ident = account.identity
        memo = ident.state_memo
        if memo is not None and memo[0] == ident.version and t < memo[2]:
            return memo[1]
        candidate = self._candidate(account)
        state = throttle_state(candidate, self._dt(t))
        until = float("inf")
        if state == "cooling":
            until = ident.cooldown_until_s
        elif state == "pacing":
            until = (pacing_ready_at(candidate) - EPOCH).total_seconds()
        ident.state_memo = (ident.version, state, until)
        return state

    def _dispatch(self, req: _Request, t: float) -> tuple[str, object]:
        """One dispatch call: ("lease", account) | ("wait", pacing ready time or None) | ("reject", reason)."""
        self._bindings_expire(t)
        usable = [a for a in self.accounts if not a.identity.exhausted and a.spec.name not in req.exclude]
        if not usable:
            if all(a.spec.name in req.exclude for a in self.accounts):
                return "reject", "502 all eligible accounts failed"
            return "reject", "503 no usable account"
        states = self._identity_states(t)
        found = {states[a.identity.spec.name] for a in usable}
        if "ready" not in found:
            # Nothing can start: neither the fast path nor any order would
            # acquire, so there is no need to ask the policy.
            if "saturated" in found or "pacing" in found:
                ready_at = [
                    r
                    for a in usable
                    if states[a.identity.spec.name] == "pacing" and (r := pacing_ready_at(self._candidate(a)))
                ]
                return "wait", (min(ready_at) - EPOCH).total_seconds() if ready_at else None
            return "reject", "429 all cooling down"

        now = self._dt(t)
        by_name = {a.spec.name: a for a in usable}
        candidates = [self._candidate(a) for a in usable]

        session = req.script.session_id
        state: SessionState = "none"
        if session is not None:
            bound = self.bindings.get((req.script.key, session))
            state = "sticky" if bound is not None else "new"
            if bound is not None and self.policy.sticky:
                fast = next((c for c in candidates if c.account == bound[0].spec.name), None)
                if fast is not None and sticky_fast_path_ok(fast, SelectionContext(now=now)):
                    return "lease", bound[0]

        # The walk: skip cooling and throttled identities, take the first ready one.
        view = View(now=now, session=state, snapshot=self.snapshot)
        for c in self.policy.order(candidates, view):
            if states[c.routing_identity] == "ready":
                return "lease", by_name[c.account]
        raise AssertionError("a ready candidate was left out of the order")

    def _dispatch_start(self, req: _Request, t: float) -> None:
        verdict, value = self._dispatch(req, t)
        if verdict == "lease":
            self._acquire(req, value, t)
        elif verdict == "wait" and self.knobs.max_wait_ms > 0:
            req.wait_started_s = t
            req.deadline_s = t + self.knobs.max_wait_ms / 1000.0
            self.waiters.append(req)
            self._at(req.deadline_s, _DEADLINE, req)
            self._wake(value)
        else:
            self._finish(req, t, rejected="429 wait budget spent" if verdict == "wait" else value)

    def _wake(self, t: float | None) -> None:
        if t is not None and t not in self.wakes:
            self.wakes.add(t)
            self._at(t, _WAKE)

    def _waiters_serve(self, t: float) -> None:
        """Walk again for the waiting requests, oldest first, while slots last."""
        for req in list(self.waiters):
            verdict, value = self._dispatch(req, t)
            if verdict == "wait":
                self._wake(value)
                continue
            self.waiters.remove(req)
            req.waited_s += t - req.wait_started_s
            req.wait_started_s = None
            if verdict == "lease":
                self._acquire(req, value, t)
            else:
                self._finish(req, t, rejected=value)

    def _deadline(self, req: _Request, t: float) -> None:
        if req.wait_started_s is None or req not in self.waiters:
            return
        self.waiters.remove(req)
        req.waited_s += t - req.wait_started_s
        req.wait_started_s = None
        self._finish(req, t, rejected="429 wait budget spent")

    # -- leases -------------------------------------------------------------

    def _acquire(self, req: _Request, account: _Account, t: float) -> None:
        ident = account.identity
        ident.in_flight += 1
        ident.last_started = self._dt(t)
        self._touch(ident)
        turn = req.script.turns[req.turn]
        ft = first_token_ms(ident.spec, turn.z_latency, account.proxy_extra_ms)
        outcome = "success"
        if ident.quota_at and ident.quota_at[0][0] <= t:
            outcome = "quota_exhausted"
        elif any(start <= t < end for start, end in ident.bursts):
            outcome = "rate_limited"
        # An upstream error comes back at about first-token time.
        duration = ft / 1000.0 + (turn.generation_s if outcome == "success" else 0.0)
        self._at(t + duration, _COMPLETE, _Lease(req, account, outcome, ft))

    def _complete(self, lease: _Lease, t: float) -> None:
        account, ident, req = lease.account, lease.account.identity, lease.request
        ident.in_flight -= 1
        self._touch(ident)
        if lease.outcome == "success":
            self.sample_times.append(t)
            self.sample_rows.append((account.spec.name, account.spec.proxy_url, lease.first_token_ms))
            self.policy.observe(account.spec.name, lease.first_token_ms)
            self.result.served[self.index[ident.spec.name]] += 1
            self.result.latencies_ms.append(lease.first_token_ms)
            if req.script.session_id is not None:
                self._bind(req.script.key, req.script.session_id, account, t)
            self._finish(req, t)
            return
        self.result.upstream_errors[lease.outcome] = self.result.upstream_errors.get(lease.outcome, 0) + 1
        if lease.outcome == "rate_limited":
            ident.cooldown_until_s = t + self.knobs.cooldown_s
            ident.cooldown_until = self._dt(ident.cooldown_until_s)
            self._touch(ident)
            # the walk skips a cooling identity; wake the waiters when it is back
            self._wake(ident.cooldown_until_s)
        else:
            _, reset_after = ident.quota_at.popleft()
            ident.exhausted = True
            self._touch(ident)
            self._at(t + reset_after, _RESET, ident)
        req.exclude.add(account.spec.name)
        self._dispatch_start(req, t)

    def _finish(self, req: _Request, t: float, *, rejected: str | None = None) -> None:
        self.result.waits_ms.append(req.waited_s * 1000.0)
        if rejected is not None:
            self.result.rejected[rejected] = self.result.rejected.get(rejected, 0) + 1
        nxt = req.turn + 1
        if nxt < len(req.script.turns):
            self._at(t + req.script.turns[nxt].think_s, _ARRIVE, _Request(req.script, nxt))

    # -- session affinity (SPEC §3) -----------------------------------------

    def _bind(self, key: str, session: str, account: _Account, t: float) -> None:
        self._bindings_expire(t)  # an expired binding is not one the session moves away from
        old = self.bindings.pop((key, session), None)
        if old is not None:
            old[0].bound -= 1
            if old[0] is not account:
                self.result.sessions_moved += 1
        self.bindings[(key, session)] = (account, t + self.knobs.affinity_ttl_s)
        account.bound += 1
        while len(self.bindings) > self.knobs.affinity_max_entries:
            _, (evicted, _) = self.bindings.popitem(last=False)
            evicted.bound -= 1

    def _bindings_expire(self, t: float) -> None:
        bindings = self.bindings
        while bindings:
            key, (account, expires) = next(iter(bindings.items()))
            if expires > t:
                return
            del bindings[key]
            account.bound -= 1

    # -- the periodic work --------------------------------------------------

    def _tick(self, t: float) -> None:
        window_start = t - self.knobs.snapshot_window_s
        while self.sample_times and self.sample_times[0] < window_start:
            self.sample_times.popleft()
            self.sample_rows.popleft()
        if self.policy.uses_snapshot:
            self.snapshot = latency_snapshot_build(self.sample_rows, generated_at=self._dt(t))
        self._bindings_expire(t)
        counts = [0] * len(self.names)
        for account in self.accounts:
            counts[self.index[account.identity.spec.name]] += account.bound
        self.result.binding_ticks.append(t)
        self.result.bindings.append(counts)
        period = self.knobs.snapshot_period_s
        for i, name in enumerate(self.names):
            ident = self.identities[name]
            if not ident.exhausted and ident.cooldown_until_s <= t:
                self.result.available_s[i] += period


def simulate(pool: Pool, knobs: Knobs, traffic: Traffic, policy: Policy) -> RunResult:
    return Engine(pool, knobs, traffic, policy).run()


def simulate_policy(name: str, pool: Pool, knobs: Knobs, traffic: Traffic, seed: int) -> RunResult:
    policy = policy_build(name, seed=seed, litellm_buffer=knobs.litellm_buffer, litellm_window=knobs.litellm_window)
    return simulate(pool, knobs, traffic, policy)


def simulate_all(
    names: Sequence[str], pool: Pool, knobs: Knobs, traffic: Traffic, *, seed: int, jobs: int = 1
) -> list[RunResult]:
    """Every policy on the same traffic, in ``names`` order. Runs are independent,
    so spreading them over processes changes nothing but the wall time."""
    if jobs <= 1 or len(names) <= 1:
        return [simulate_policy(n, pool, knobs, traffic, seed) for n in names]
    with ProcessPoolExecutor(max_workers=min(jobs, len(names))) as executor:
        futures = [executor.submit(simulate_policy, n, pool, knobs, traffic, seed) for n in names]
        return [f.result() for f in futures]
