"""What the dashboards show, computed from the rows the dashboard selectors
read: one presentable row per account, the filters, sort columns and summary
of the overview, the chart inputs, and readable numbers. Pure presentation: no
query and no request here, so each piece is tested on its own."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlencode

from django.conf import settings
from django.urls import reverse

from accounts.models import Account, Pool
from routing.dashboard import charts
from routing.models import CooldownKind, LeaseOutcome
from routing.selection import (
    LatencySnapshot,
    cooldown_remaining,
    latency_band,
    latency_score,
    latency_usable,
)

# --- readable numbers ------------------------------------------------------------


def duration_text(seconds: float, *, coarse: bool = False) -> str:
    """A span for people: '45 s', '4 min 12 s', '3 h 5 min', '2 d 4 h'.

    Rounded up, so a cooldown never reads '0 s' while it still holds;
    ``coarse`` rounds down and drops the seconds past a minute, for "ago"."""
    seconds = max(0, int(seconds) if coarse else math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs and not coarse else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ago_text(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = (now - when).total_seconds()
    if seconds < 0:
        return f"in {duration_text(-seconds)}"
    if seconds < 5:
        return "just now"
    return f"{duration_text(seconds, coarse=True)} ago"


def ms_text(ms: float | None) -> str:
    if ms is None or not math.isfinite(ms):
        return "—"
    if ms >= 10_000:
        return f"{ms / 1000:,.1f} s"
    return f"{ms:,.0f} ms"


def credits_text(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 1000 else f"{value:,.2f}"


@dataclass(frozen=True, slots=True)
class Moment:
    """A timestamp shown relative to now, with the exact time on hover."""

    text: str
    iso: str | None

    @classmethod
    def of(cls, when: datetime | None, now: datetime) -> Moment:
        return cls(ago_text(when, now), when.isoformat(timespec="seconds") if when else None)


@dataclass(frozen=True, slots=True)
class Left:
    """Time left until a moment, or nothing when it has passed."""

    text: str
    seconds: float
    until_iso: str

    @classmethod
    def of(cls, until: datetime | None, now: datetime) -> Left | None:
        remaining = cooldown_remaining(until, now)
        if remaining is None:
            return None
        return cls(
            duration_text(remaining.total_seconds()), remaining.total_seconds(), until.isoformat(timespec="seconds")
        )


# --- one row per account ---------------------------------------------------------


@dataclass(slots=True)
class AccountRow:
    name: str
    href: str
    identity: str
    identity_id: int
    pool: str
    proxy: str | None
    enabled: bool
    sessions: int
    identity_sessions: int = 0
    in_flight: int = 0
    max_concurrency: int = 1
    samples: int = 0
    avg_ms: float | None = None
    score_ms: float | None = None
    band: int | None = None  # only when the snapshot may order candidates
    cooldown: Left | None = None
    cooldown_reason: str = ""
    proxy_cooldown: Left | None = None
    proxy_cooldown_reason: str = ""
    credits: float | None = None
    exhausted: bool = False
    exhausted_at: Moment | None = None
    exhausted_reason: str = ""
    min_credits: float = 0.0
    quota_resets: Left | None = None
    ejected: Left | None = None  # outlier ejection of the identity left
    last_started_at: datetime | None = None
    last_started: Moment | None = None
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def usable(self) -> bool:
        return not self.flags & {"disabled", "exhausted", "spent", "cooling", "ejected"}

    @property
    def pool_label(self) -> str:
        return Pool(self.pool).label if self.pool in Pool.values else self.pool

    @property
    def avg_text(self) -> str:
        return ms_text(self.avg_ms)

    @property
    def score_text(self) -> str:
        return ms_text(self.score_ms)

    @property
    def credits_text(self) -> str:
        return credits_text(self.credits)

    @property
    def band_text(self) -> str:
        return "—" if self.band is None else f"{self.band:+d}" if self.band else "0"

    @property
    def load_percent(self) -> int:
        return min(100, round(100 * self.in_flight / max(self.max_concurrency, 1)))


def live(total: int, expired: int) -> int:
    return max(0, total - expired)


def account_rows(accounts: list[Account], snapshot: LatencySnapshot | None, *, now: datetime) -> list[AccountRow]:
    """Rows for the given accounts, with the figures the selector would use now."""
    bands_apply = latency_usable(snapshot, now=now, enabled=True)
    chartable = snapshot is not None and snapshot.global_avg_ms is not None and math.isfinite(snapshot.global_avg_ms)
    identity_sessions: dict[int, int] = {}
    for a in accounts:
        identity_sessions[a.identity_id] = identity_sessions.get(a.identity_id, 0) + live(
            a.binding_rows, a.expired_bindings
        )

    rows = []
    for a in accounts:
        identity, proxy = a.identity, a.proxy
        row = AccountRow(
            name=a.name,
            href=reverse("dashboard:account", args=[a.name]),
            identity=identity.name,
            identity_id=identity.pk,
            pool=a.pool,
            proxy=proxy.name if proxy else None,
            enabled=a.enabled,
            sessions=live(a.binding_rows, a.expired_bindings),
            identity_sessions=identity_sessions[a.identity_id],
            in_flight=live(identity.in_flight, getattr(a, "expired_leases", 0)),
            max_concurrency=identity.max_concurrency,
            cooldown=Left.of(identity.cooldown_until, now),
            cooldown_reason=identity.cooldown_reason,
            proxy_cooldown=Left.of(proxy.cooldown_until, now) if proxy else None,
            proxy_cooldown_reason=proxy.cooldown_reason if proxy else "",
            credits=a.remaining_credits,
            exhausted=a.quota_exhausted,
            exhausted_at=Moment.of(a.quota_exhausted_at, now) if a.quota_exhausted_at else None,
            exhausted_reason=a.quota_exhausted_reason,
            min_credits=a.min_remaining_credits,
            quota_resets=Left.of(a.quota_resets_at, now),
            ejected=Left.of(identity.ejected_until, now),
            last_started_at=identity.last_started_at,
            last_started=Moment.of(identity.last_started_at, now),
        )
        if snapshot is not None:
            stats = snapshot.accounts.get(a.name)
            if stats is not None and stats.samples > 0:
                row.samples, row.avg_ms = stats.samples, stats.avg_ms
            if chartable:
                row.score_ms = latency_score(snapshot, account=a.name, proxy_url=proxy.url if proxy else None)
                if bands_apply:
                    row.band = latency_band(row.score_ms, snapshot.global_avg_ms)
        flags = set()
        if not a.enabled:
            flags.add("disabled")
        if a.quota_exhausted:
            flags.add("exhausted")
        elif a.remaining_credits is not None and a.remaining_credits <= a.min_remaining_credits:
            # A known balance at or below the account's minimum: not handed
            # out, though its quota was never reported exhausted.
            flags.add("spent")
        if row.cooldown:
            flags.add("cooling")
        if row.ejected:
            flags.add("ejected")
        if row.proxy_cooldown:
            flags.add("proxy")
        row.flags = frozenset(flags)
        rows.append(row)
    return rows


# --- filters, sorting and the summary ---------------------------------------------

# key → (label, predicate). "abnormal" is everything an operator should look at.
FILTERS: dict[str, tuple[str, Callable[[AccountRow], bool]]] = {
    "all": ("All", lambda r: True),
    "abnormal": ("Needs attention", lambda r: bool(r.flags)),
    "cooling": ("Cooling down", lambda r: "cooling" in r.flags),
    "proxy": ("Proxy cooling", lambda r: "proxy" in r.flags),
    "exhausted": ("Quota exhausted", lambda r: "exhausted" in r.flags),
    "spent": ("No credits", lambda r: "spent" in r.flags),
    "ejected": ("Ejected", lambda r: "ejected" in r.flags),
    "disabled": ("Disabled", lambda r: "disabled" in r.flags),
    "usable": ("Usable", lambda r: r.usable),
}


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    value: Callable[[AccountRow], object]  # None sorts last in both directions
    numeric: bool = False
    descending_first: bool = False
    hint: str = ""


COLUMNS = [
    Column("state", "State", lambda r: (len(r.flags), sorted(r.flags)), descending_first=True),
    Column("name", "Account", lambda r: r.name),
    Column("identity", "Identity", lambda r: (r.identity, r.name)),
    Column("pool", "Pool", lambda r: r.pool),
    Column(
        "sessions",
        "Sessions",
        lambda r: (r.sessions, r.identity_sessions),
        numeric=True,
        descending_first=True,
        hint="live bound sessions of the account, and of its routing identity",
    ),
    Column(
        "in_flight",
        "In flight",
        lambda r: (r.in_flight / max(r.max_concurrency, 1), r.in_flight),
        numeric=True,
        descending_first=True,
        hint="live leases on the identity / its concurrency limit",
    ),
    Column(
        "latency",
        "Latency",
        lambda r: r.avg_ms,
        numeric=True,
        descending_first=True,
        hint="first-token average over the snapshot window, and its sample count",
    ),
    Column(
        "band",
        "Band",
        lambda r: None if r.band is None else (r.band, r.score_ms),
        numeric=True,
        hint="latency band (lower is faster; accounts in one band take turns) and score",
    ),
    Column(
        "cooldown",
        "Cooldown",
        lambda r: (
            max(r.cooldown.seconds if r.cooldown else 0, r.proxy_cooldown.seconds if r.proxy_cooldown else 0) or None
        ),
        numeric=True,
        descending_first=True,
    ),
    Column("credits", "Credits", lambda r: r.credits, numeric=True, descending_first=True),
    Column("quota", "Quota", lambda r: r.exhausted, descending_first=True),
    Column(
        "last_started",
        "Last started",
        lambda r: r.last_started_at,
        numeric=True,
        descending_first=True,
        hint="when a lease last started on the identity",
    ),
]
COLUMNS_BY_KEY = {c.key: c for c in COLUMNS}
DEFAULT_SORT = "name"


def parse_sort(value: str | None) -> tuple[Column, bool]:
    """``?sort=sessions`` or ``?sort=-sessions`` → (column, descending)."""
    value = (value or "").strip()
    descending = value.startswith("-")
    column = COLUMNS_BY_KEY.get(value.lstrip("-")) or COLUMNS_BY_KEY[DEFAULT_SORT]
    if column.key != value.lstrip("-"):
        descending = False
    return column, descending


def sort_rows(rows: list[AccountRow], column: Column, *, descending: bool) -> list[AccountRow]:
    """Sorted by the column, then by name; rows without a value come last either way."""
    by_name = sorted(rows, key=lambda r: r.name)
    known = [r for r in by_name if column.value(r) is not None]
    unknown = [r for r in by_name if column.value(r) is None]
    known.sort(key=column.value, reverse=descending)
    return known + unknown


def matches_query(row: AccountRow, query: str) -> bool:
    q = query.casefold()
    return any(q in text.casefold() for text in (row.name, row.identity, row.proxy or ""))


@dataclass(frozen=True, slots=True)
class Summary:
    accounts: int
    identities: int
    usable: int
    cooling: int
    exhausted: int
    spent: int
    ejected: int
    disabled: int
    proxy: int
    live_sessions: int
    session_capacity: int
    in_flight: int
    concurrency: int

    @property
    def capacity_percent(self) -> int:
        return min(100, round(100 * self.live_sessions / max(self.session_capacity, 1)))


def summarize(rows: list[AccountRow], accounts: list[Account]) -> Summary:
    identities = {a.identity_id: a.identity for a in accounts}
    in_flight = {r.identity_id: r.in_flight for r in rows}
    return Summary(
        accounts=len(rows),
        identities=len(identities),
        usable=sum(r.usable for r in rows),
        cooling=sum("cooling" in r.flags for r in rows),
        exhausted=sum("exhausted" in r.flags for r in rows),
        spent=sum("spent" in r.flags for r in rows),
        ejected=sum("ejected" in r.flags for r in rows),
        disabled=sum("disabled" in r.flags for r in rows),
        proxy=sum("proxy" in r.flags for r in rows),
        live_sessions=sum(r.sessions for r in rows),
        session_capacity=settings.KIROPOOL_AFFINITY_MAX_ENTRIES,
        in_flight=sum(in_flight.values()),
        concurrency=sum(i.max_concurrency for i in identities.values()),
    )


@dataclass(frozen=True, slots=True)
class StickyStats:
    """What happened to returning turns in the last hour (sticky patience)."""

    hit: int
    waited: int
    moved: int
    wait_avg: str
    wait_max: str

    @property
    def total(self) -> int:
        return self.hit + self.waited + self.moved

    @property
    def moved_percent(self) -> int:
        return round(100 * self.moved / self.total) if self.total else 0


def sticky_stats(counts: dict[str, int], wait_avg_ms: float | None, wait_max_ms: float | None) -> StickyStats:
    return StickyStats(
        hit=counts.get("hit", 0),
        waited=counts.get("waited", 0),
        moved=counts.get("moved", 0),
        wait_avg=ms_text(wait_avg_ms),
        wait_max=ms_text(wait_max_ms),
    )


def identity_bars(rows: list[AccountRow]) -> list[charts.SessionBar]:
    """One bar per routing identity, coloured by what stops it serving, if anything."""
    by_identity: dict[int, list[AccountRow]] = {}
    for r in rows:
        by_identity.setdefault(r.identity_id, []).append(r)
    index = reverse("dashboard:index")
    bars = []
    for members in by_identity.values():
        first = members[0]
        if all("disabled" in r.flags for r in members):
            state = "disabled"
        elif all(r.flags & {"disabled", "exhausted"} for r in members):
            state = "exhausted"
        elif first.cooldown:
            state = "cooling"
        else:
            state = "ok"
        names = ", ".join(r.name for r in members)
        detail = f"{len(members)} accounts: {names}" if len(members) > 1 else names
        if state != "ok":
            detail += f"; {state}"
        bars.append(
            charts.SessionBar(
                label=first.identity,
                value=first.identity_sessions,
                state=state,
                href=f"{index}?{urlencode({'q': first.identity})}",
                detail=detail,
            )
        )
    return bars


def latency_points(rows: list[AccountRow], snapshot: LatencySnapshot | None) -> list[charts.LatencyPoint]:
    if snapshot is None or snapshot.global_avg_ms is None:
        return []
    g = snapshot.global_avg_ms
    return [
        charts.LatencyPoint(
            label=r.name,
            score_ms=r.score_ms,
            # The chart draws the band a score falls in even when the snapshot
            # is too old to be used; the table then shows no band.
            band=r.band if r.band is not None else latency_band(r.score_ms, g),
            samples=r.samples,
            href=r.href,
        )
        for r in rows
        if r.score_ms is not None
    ]


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    generated: Moment | None
    global_avg: str
    samples: int
    usable: bool
    state: str  # "fresh", "stale", "none"


def snapshot_info(snapshot: LatencySnapshot | None, samples: int, *, now: datetime) -> SnapshotInfo:
    if snapshot is None:
        return SnapshotInfo(None, "—", 0, False, "none")
    usable = latency_usable(snapshot, now=now, enabled=True)
    return SnapshotInfo(
        generated=Moment.of(snapshot.generated_at, now),
        global_avg=ms_text(snapshot.global_avg_ms),
        samples=samples,
        usable=usable,
        state="fresh" if usable else "stale",
    )


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
