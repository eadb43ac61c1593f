"""The overview table's controls: its state filters, its columns and how each
sorts, and the search box. Pure, over the rows ``presenters.account_rows``
builds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from routing.dashboard.presenters import AccountRow

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
