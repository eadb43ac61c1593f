"""What the dashboards show, computed from the rows the dashboard selectors
read: one presentable row per account, the overview's summary, and the
chart inputs (the overview table's filters and columns are in ``table.py``,
readable numbers in ``text.py``, an account's history in ``history.py``). Pure presentation: no
query and no request here, so each piece is tested on its own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlencode

from django.conf import settings
from django.urls import reverse

from accounts.models import Account, Pool
from routing.dashboard import charts
from routing.dashboard.text import Left, Moment, credits_text, ms_text
from routing.selection import (
    LatencySnapshot,
    latency_band,
    latency_score,
    latency_usable,
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


# --- the summary -------------------------------------------------------------------


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
