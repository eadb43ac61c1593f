"""One account's history on its page: its recent leases, the cooldown and
quota events that touched it, and its activity over time (leases started,
outcomes and first-token latency per bucket, beside the pool's). Pure
presentation of what the dashboard selectors read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from routing.dashboard.text import Moment, duration_text, ms_text
from routing.models import CooldownKind, LeaseOutcome


@dataclass(frozen=True, slots=True)
class LeaseLine:
    started: Moment
    key: str
    session_id: str
    model: str
    state: str  # an outcome value, "in_flight" or "lapsed"
    state_label: str
    duration: str
    first_token: str
    waited: str
    error: str


def lease_lines(leases, *, now: datetime) -> list[LeaseLine]:
    lines = []
    for lease in leases:
        if lease.completed_at is not None:
            state, label = lease.outcome, LeaseOutcome(lease.outcome).label
            duration = duration_text((lease.completed_at - lease.started_at).total_seconds())
        elif lease.expires_at > now:
            state, label, duration = (
                "in_flight",
                "in flight",
                f"{duration_text((now - lease.started_at).total_seconds())} so far",
            )
        else:
            state, label, duration = "lapsed", "lapsed (never completed)", "—"
        lines.append(
            LeaseLine(
                started=Moment.of(lease.started_at, now),
                key=lease.api_key.name if lease.api_key else "(deleted key)",
                session_id=lease.session_id,
                model=lease.model,
                state=state,
                state_label=label,
                duration=duration,
                first_token=ms_text(lease.first_token_ms),
                waited=ms_text(lease.waited_ms) if lease.waited_ms else "—",
                error=lease.error_message,
            )
        )
    return lines


EVENT_TONES = {
    CooldownKind.IDENTITY_COOLDOWN: "warn",
    CooldownKind.PROXY_COOLDOWN: "warn",
    CooldownKind.QUOTA_EXHAUSTED: "bad",
    CooldownKind.IDENTITY_CLEARED: "good",
    CooldownKind.PROXY_CLEARED: "good",
    CooldownKind.QUOTA_RESET: "good",
    CooldownKind.QUOTA_PROBE: "muted",
    CooldownKind.EJECTED: "bad",
}


PROXY_KINDS = {CooldownKind.PROXY_COOLDOWN, CooldownKind.PROXY_CLEARED}
IDENTITY_KINDS = {CooldownKind.IDENTITY_COOLDOWN, CooldownKind.IDENTITY_CLEARED}


def event_lines(events, *, now: datetime) -> list[dict]:
    lines = []
    for e in events:
        # What the event is about follows from its kind: a rate limit cools the
        # identity even though the report came through one of its accounts.
        if e.kind in PROXY_KINDS and e.proxy_id:
            subject = f"proxy {e.proxy.name}"
        elif e.kind in IDENTITY_KINDS and e.identity_id:
            subject = f"identity {e.identity.name}"
            if e.account_id:
                subject += f" (reported on {e.account.name})"
        elif e.account_id:
            subject = f"account {e.account.name}"
        elif e.identity_id:
            subject = f"identity {e.identity.name}"
        elif e.proxy_id:
            subject = f"proxy {e.proxy.name}"
        else:
            subject = "—"
        lines.append(
            {
                "when": Moment.of(e.created_at, now),
                "kind": CooldownKind(e.kind).label if e.kind in CooldownKind.values else e.kind,
                "tone": EVENT_TONES.get(e.kind, "muted"),
                "subject": subject,
                "until": Moment.of(e.until, now) if e.until else None,
                "active": e.until is not None and e.until > now,
                "reason": e.reason,
            }
        )
    return lines


# --- the account's activity over time ------------------------------------------------

# ``?hours=`` choices on the account page, and the default.
ACTIVITY_HOURS = (1, 3, 6, 24)
DEFAULT_ACTIVITY_HOURS = 3
# At most this many buckets per chart: past 3 h, minutes are grouped so a bar
# stays wider than a pixel.
MAX_BUCKETS = 180
# Stacking order, bottom up: what went well first, then what went wrong.
OUTCOME_ORDER = (
    LeaseOutcome.SUCCESS,
    LeaseOutcome.RETRY_NEXT,
    LeaseOutcome.RATE_LIMITED,
    LeaseOutcome.QUOTA_EXHAUSTED,
    LeaseOutcome.FATAL,
    LeaseOutcome.EXPIRED,
    "",
)
OPEN_LABEL = "in flight or never reported"


def activity_hours(value: str | None) -> int:
    try:
        hours = int(value or DEFAULT_ACTIVITY_HOURS)
    except ValueError:
        return DEFAULT_ACTIVITY_HOURS
    return hours if hours in ACTIVITY_HOURS else DEFAULT_ACTIVITY_HOURS


@dataclass(frozen=True, slots=True)
class ActivityWindow:
    """``count`` buckets of ``minutes`` each, the last one holding now."""

    start: datetime
    minutes: int
    count: int

    @classmethod
    def of(cls, hours: int, now: datetime) -> ActivityWindow:
        minutes = max(1, math.ceil(hours * 60 / MAX_BUCKETS))
        count = hours * 60 // minutes
        end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        return cls(end - timedelta(minutes=minutes * count), minutes, count)

    def index(self, minute: datetime) -> int | None:
        i = int((minute - self.start).total_seconds() // 60) // self.minutes
        return i if 0 <= i < self.count else None


@dataclass(frozen=True, slots=True)
class Activity:
    window: ActivityWindow
    started: list[int]  # leases started per bucket
    latency_ms: list[float | None]  # the account's mean first-token latency per bucket
    pool_latency_ms: list[float | None]  # the whole pool's
    outcomes: dict[str, list[int]]  # outcome ("" = open) → leases per bucket, present outcomes only

    @property
    def total(self) -> int:
        return sum(self.started)


def account_activity(minutes: list[dict], pool_minutes: list[dict], window: ActivityWindow) -> Activity:
    """The chart series from the two per-minute aggregates of the selectors."""
    started = [0] * window.count
    latency_sum = [0.0] * window.count
    latency_n = [0] * window.count
    outcomes: dict[str, list[int]] = {}
    for row in minutes:
        i = window.index(row["minute"])
        if i is None:
            continue
        started[i] += row["leases"]
        latency_sum[i] += row["first_token_sum"] or 0.0
        latency_n[i] += row["first_token_count"]
        outcomes.setdefault(row["outcome"], [0] * window.count)[i] += row["leases"]
    pool_sum = [0.0] * window.count
    pool_n = [0] * window.count
    for row in pool_minutes:
        i = window.index(row["minute"])
        if i is not None:
            pool_sum[i] += row["avg_ms"] * row["samples"]
            pool_n[i] += row["samples"]
    ordered = {o: outcomes[o] for o in OUTCOME_ORDER if o in outcomes}
    ordered.update({o: v for o, v in outcomes.items() if o not in ordered})
    return Activity(
        window=window,
        started=started,
        latency_ms=[s / n if n else None for s, n in zip(latency_sum, latency_n, strict=True)],
        pool_latency_ms=[s / n if n else None for s, n in zip(pool_sum, pool_n, strict=True)],
        outcomes=ordered,
    )


def outcome_label(outcome: str) -> str:
    if not outcome:
        return OPEN_LABEL
    return LeaseOutcome(outcome).label if outcome in LeaseOutcome.values else outcome
