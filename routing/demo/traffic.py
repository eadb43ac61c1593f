"""Synthetic gateways against the real HTTP API: a small client for the
gateway and operator endpoints, and a handful of threads that dispatch, hold
the lease while a simulated upstream answers, and report how it went.

The traffic knows the pool it plays against from ``pool.POOL``: how fast each
identity's upstream answers, which accounts report a balance, and which proxy
the scripted proxy failure hits."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from accounts.models import Pool
from routing.demo.pool import POOL, PREFIX, PROXIES


class DemoError(Exception):
    """The demo cannot go on (the message says why)."""


MODELS = ("claude-sonnet-4", "claude-haiku-4")

# Upstream calls are simulated by sleeping; this scales simulated time to wall
# time so a few minutes show plenty of traffic while leases stay visibly in flight.
TIME_SCALE = 0.35


# --- the HTTP API, as a gateway and an operator see it ---------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, body: dict, retry_after: float | None):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body, self.retry_after = status, body, retry_after


class Api:
    def __init__(self, base: str, *, keys: dict[str, str], token: str):
        self.base, self.keys, self.token = base, keys, token

    def _call(self, method: str, path: str, body: dict | None, auth: str, timeout: float = 60) -> dict:
        request = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": auth, "Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": {"type": "http", "message": raw[:200].decode(errors="replace")}}
            retry_after = error.headers.get("Retry-After")
            raise ApiError(error.code, payload, float(retry_after) if retry_after else None) from None

    def dispatch(self, key: str, **body) -> dict:
        return self._call("POST", "/api/v1/dispatch", body, f"Bearer {self.keys[key]}")

    def complete(self, key: str, lease_id: str, **body) -> dict:
        return self._call("POST", f"/api/v1/leases/{lease_id}/complete", body, f"Bearer {self.keys[key]}")

    def latency_refresh(self, *, quiet: bool = False) -> None:
        """Rebuild the snapshot through the operator API (the periodic task does
        this every 60 s under `make run`; the demo runs no Celery worker)."""
        try:
            self._call("POST", "/api/v1/admin/latency/refresh/", None, f"Token {self.token}")
        except (ApiError, OSError) as error:
            if not quiet:
                print(f"  (latency snapshot refresh failed: {error})", file=sys.stderr)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers, whatever it thinks of its health
            except OSError as error:
                if time.monotonic() > deadline:
                    message = f"kiropool did not answer at {self.base} within {timeout:.0f} s: {error}"
                    raise DemoError(message) from error
                time.sleep(0.3)


# --- synthetic gateway traffic ------------------------------------------------------------------


@dataclass
class Conversation:
    session_id: str
    key: str
    turns_left: int
    busy: bool = False


@dataclass
class Stats:
    outcomes: Counter = field(default_factory=Counter)
    sessions: Counter = field(default_factory=Counter)  # "sticky" / "new" / "none"
    statuses: Counter = field(default_factory=Counter)  # dispatch errors by HTTP status
    by_identity: Counter = field(default_factory=Counter)
    waited_ms: int = 0


class Traffic:
    """A handful of gateway clients: each loop sends one request, as a turn of a
    conversation or a stateless call, holds the lease as long as the simulated
    upstream takes, and reports the outcome."""

    def __init__(self, api: Api, *, rng: random.Random, duration: float, clients: int, out):
        self.api, self.rng, self.duration, self.clients, self.out = api, rng, duration, clients, out
        self.lock = threading.Lock()
        self.stats = Stats()
        self.conversations: list[Conversation] = []
        self.next_conversation = 0
        self.latency = {f"{PREFIX}{name}": ms for name, *_, ms in POOL}
        self.credits = {
            f"{PREFIX}{name}{suffix}": credits
            for name, _, _, aliases, _ in POOL
            for suffix, _, _, credits in aliases
            if credits is not None
        }
        # Scripted incidents: (share of the run elapsed, what happens, which lease it hits). Each
        # hits the first matching lease once it is due, whichever account the dispatcher chose.
        self.incidents = [
            (0.30, "rate_limited", lambda a: a["pool"] == Pool.BALANCED and not a["proxy_url"]),
            (0.50, "proxy_failure", lambda a: a["proxy_url"] == PROXIES["ams"]),
            (0.65, "quota_exhausted", lambda a: a["pool"] == Pool.CREDIT_FIRST),
        ]
        self.exhausted: set[str] = set()  # identities whose quota the run used up
        self.started = 0.0
        self.stop = threading.Event()

    # conversation bookkeeping

    def _conversation_take(self) -> Conversation:
        with self.lock:
            idle = [c for c in self.conversations if not c.busy]
            if len(self.conversations) < 36 or not idle or self.rng.random() < 0.12:
                self.next_conversation += 1
                key = "batch" if self.rng.random() < 0.3 else "gateway"
                session_id = f"demo-conversation-{self.next_conversation:04d}"
                conversation = Conversation(session_id, key, turns_left=self.rng.randint(2, 9))
                self.conversations.append(conversation)
            else:
                conversation = self.rng.choice(idle)
            conversation.busy = True
            return conversation

    def _conversation_release(self, conversation: Conversation) -> None:
        with self.lock:
            conversation.busy = False
            conversation.turns_left -= 1
            if conversation.turns_left <= 0:
                self.conversations.remove(conversation)

    def _incident_due(self, account: dict) -> str | None:
        elapsed = (time.monotonic() - self.started) / self.duration
        with self.lock:
            for i, (share, kind, hits) in enumerate(self.incidents):
                if elapsed >= share and hits(account):
                    del self.incidents[i]
                    return kind
        return None

    # one request

    def _one_request(self) -> None:
        rng = self.rng
        conversation = self._conversation_take() if rng.random() < 0.7 else None
        key = conversation.key if conversation else ("batch" if rng.random() < 0.3 else "gateway")
        model = rng.choice(MODELS)
        excluded: list[str] = []
        try:
            for _attempt in range(3):
                body = {"model": model, "max_wait_ms": 5000, "exclude_accounts": excluded}
                if conversation:
                    body["session_id"] = conversation.session_id
                try:
                    lease = self.api.dispatch(key, **body)
                except ApiError as error:
                    with self.lock:
                        self.stats.statuses[error.status] += 1
                    self.stop.wait(min(error.retry_after or 1.0, 3.0))
                    return
                account = lease["account"]["name"]
                identity = lease["account"]["routing_identity"]
                incident = self._incident_due(lease["account"])
                with self.lock:
                    self.stats.sessions[lease["session"]] += 1
                    self.stats.by_identity[identity] += 1
                    self.stats.waited_ms += lease["waited_ms"]
                outcome, report = self._upstream(account, identity, incident)
                try:
                    self.api.complete(key, lease["lease_id"], outcome=outcome, **report)
                except ApiError as error:
                    with self.lock:
                        self.stats.statuses[f"complete {error.status}"] += 1
                    return
                with self.lock:
                    self.stats.outcomes[outcome] += 1
                if outcome != "retry_next":
                    return
                excluded.append(account)  # the gateway tries the next account for this request
        finally:
            if conversation:
                self._conversation_release(conversation)

    def _upstream(self, account: str, identity: str, incident: str | None) -> tuple[str, dict]:
        """Pretend to call the upstream: sleep, then say how it went."""
        rng = self.rng
        base = self.latency.get(identity, 600)
        first_token = max(40.0, rng.gauss(base, base * 0.15))
        generation = rng.uniform(800, 4000)
        if incident == "rate_limited":
            self.stop.wait(first_token / 1000 * TIME_SCALE)
            return "rate_limited", {"cooldown_seconds": 300, "error_message": "429 Too Many Requests (demo)"}
        if incident == "proxy_failure":
            self.stop.wait(rng.uniform(0.2, 0.6))
            return "rate_limited", {
                "cooldown_seconds": 120,
                "proxy_failure": True,
                "error_message": "proxy reset the connection (demo)",
            }
        if incident == "quota_exhausted":
            with self.lock:
                self.exhausted.add(identity)
            return "quota_exhausted", {"remaining_credits": 0, "error_message": "monthly quota used up (demo)"}
        if rng.random() < 0.03:
            self.stop.wait(rng.uniform(0.1, 0.4))
            return "retry_next", {"error_message": "upstream 500, try the next account (demo)"}
        self.stop.wait((first_token + generation) / 1000 * TIME_SCALE)
        report: dict = {"first_token_ms": round(first_token, 1)}
        # A positive balance would put an exhausted identity back into selection
        # (SPEC §2); its aliases stop reporting one so the incident stays visible.
        if account in self.credits and identity not in self.exhausted:
            with self.lock:
                self.credits[account] = max(0.0, self.credits[account] - rng.uniform(0.5, 3.0))
                report["remaining_credits"] = round(self.credits[account], 2)
        return "success", report

    # the run

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                self._one_request()
            except OSError as error:
                with self.lock:
                    self.stats.statuses[f"network: {type(error).__name__}"] += 1
                self.stop.wait(1.0)
            self.stop.wait(self.rng.uniform(0.05, 0.4))

    def run(self) -> None:
        self.started = time.monotonic()
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        last_refresh = last_report = self.started
        try:
            while (now := time.monotonic()) - self.started < self.duration:
                time.sleep(1)
                if now - last_refresh >= 30:
                    self.api.latency_refresh(quiet=True)
                    last_refresh = now
                if now - last_report >= 15:
                    self.out.write(self.progress())
                    last_report = now
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=15)

    def progress(self) -> str:
        with self.lock:
            s = self.stats
            elapsed = time.monotonic() - self.started
            return (
                f"  t+{elapsed:4.0f}s  requests {sum(s.outcomes.values()):5d}  "
                f"success {s.outcomes['success']}  rate-limited {s.outcomes['rate_limited']}  "
                f"retry {s.outcomes['retry_next']}  quota {s.outcomes['quota_exhausted']}  "
                f"sessions new/sticky/none {s.sessions['new']}/{s.sessions['sticky']}/{s.sessions['none']}  "
                f"dispatch errors {sum(s.statuses.values())}"
            )

    def summary(self) -> str:
        s = self.stats
        lines = ["", "Traffic summary", self.progress()]
        if s.statuses:
            lines.append(
                "  dispatch/complete errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(s.statuses.items(), key=str))
            )
        lines.append(
            "  leases per identity: " + ", ".join(f"{k[len(PREFIX) :]} {v}" for k, v in sorted(s.by_identity.items()))
        )
        missed = [kind for _, kind, _ in self.incidents]
        if missed:
            lines.append("  incidents that found no request in time: " + ", ".join(missed))
        return "\n".join(lines)
