"""The dispatcher's reads, for one request: which shape of the candidates
read (``candidates.py``) it needs, with which parameters, and its rows as
``CandidateRow``s.

Each shape is compiled once per process (``compiled.py``): a dispatch pays
for running the query, not for building it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings

from accounts.models import ApiKey
from routing import selection
from routing.dispatch import CandidateRow, DispatchRequest, SortKeys
from routing.selectors import key_accounts, reaped, rules, walk
from routing.selectors.candidates import (
    HEAD_ROWS,
    PARAMETERS,
    Shape,
    candidates_queryset,
    live_binding,
    scope_of,
)
from routing.selectors.compiled import CompiledQuery, sentinel_values
from routing.selectors.latency import StoredSnapshot


@functools.lru_cache(maxsize=256)
def compiled(shape: Shape) -> CompiledQuery:
    """The read of this shape, compiled once per process.

    It runs on its generic plan (``compiled.py``), planned once per
    connection, and the key's group id is written into the statement rather
    than sent: a generic plan does not know a parameter's value, so it
    planned every group's read for the average group, and a 10-account
    group's read scanned every account of the table. Written in, the plan
    knows the group's size (one prepared statement per group)."""
    sentinels = sentinel_values(PARAMETERS, {"excluded": shape.excluded, "preferred": shape.preferred})
    return CompiledQuery(
        lambda values: candidates_queryset(shape, values), sentinels, generic=True, written=frozenset({"group_id"})
    )


@functools.cache
def binding_lookup() -> CompiledQuery:
    """The binding look-up, compiled once per process."""
    sentinels = sentinel_values({"key_id": int, "session_id": str, "now": datetime}, {})
    return CompiledQuery(live_binding, sentinels, generic=True)


def session_bound(*, key: ApiKey, session_id: str, now: datetime) -> bool:
    """Whether (key, session id) has a live binding, to any account: a read
    of one index entry, far cheaper for PostgreSQL to start than the sticky
    statement, which has nothing to do without one (``leases.StickyOdds``)."""
    return bool(binding_lookup().fetch({"key_id": key.pk, "session_id": session_id, "now": now}))


@dataclass(frozen=True, slots=True)
class Read:
    rows: list[CandidateRow]
    bound_account_id: int | None  # the live binding of (key, session id), if asked for


def request_shape(
    *,
    key: ApiKey,
    request: DispatchRequest,
    now: datetime,
    snapshot: StoredSnapshot | None,
    spread: bool,
    head: bool = False,
    bound_only: bool = False,
    preferred: frozenset[str] = frozenset(),
    lease_floor: datetime | None = None,
) -> tuple[Shape, dict[str, object]]:
    """The shape of this request's candidates read, and its parameter values.
    ``lease_floor``: where the probe for unreaped leases starts, this
    process's ``reaped.lease_floor()`` unless given."""
    latency = snapshot is not None and selection.latency_usable(
        snapshot.snapshot, now=now, enabled=key.latency_routing_enabled
    )
    excluded = sorted(request.exclude_accounts)
    preferred_names = sorted(preferred)
    shape = Shape(
        scope=scope_of(key),
        preferred_pool=key.preferred_pool,
        with_session=bool(request.session_id),
        bound_only=bound_only,
        spread=spread,
        latency=latency,
        excluded=len(excluded),
        preferred=len(preferred_names),
        head=head,
    )
    values = {
        "now": now,
        "lease_floor": reaped.lease_floor() if lease_floor is None else lease_floor,
        "key_id": key.pk,
        "session_id": request.session_id or "",
        "group_id": key.account_group_id or 0,
        "fixed_account_id": key.fixed_account_id or 0,
        "snapshot_id": snapshot.id if latency else 0,
        # Unused without latency (no band in the read).
        **rules.band_values(snapshot.snapshot.global_avg_ms if latency else 0.0),
        "slow_start_seconds": settings.KIROPOOL_SLOW_START_SECONDS,
        "excluded": excluded,
        "preferred": preferred_names,
    }
    return shape, values


def read(**request) -> Read:
    """Run the candidates read of a request (``request_shape``'s arguments).

    A head read of a large pool goes through the walk (``walk.py``); when
    its rows cannot show they are the head, the full read runs instead."""
    shape, values = request_shape(**request)
    if walk.walkable(shape, size=key_accounts.pool_size(request["key"])):
        found = run(dataclasses.replace(shape, walk=True), values)
        if walk.exact(found.rows, head_rows=HEAD_ROWS):
            return found
    return run(shape, values)


def run(shape: Shape, values: Mapping[str, object]) -> Read:
    """Run the read of ``shape`` with ``values``, as it is."""
    query = compiled(shape)
    rows = query.fetch(values)
    # The same on every row: the binding may point at an account that is
    # not a candidate (disabled, say), and the session is still sticky.
    bound = rows[0][query.columns["bound_account_id"]] if rows and shape.with_session else None
    return Read(rows=[_row(r, query.columns) for r in rows], bound_account_id=bound)


def row_from(raw: tuple, query: CompiledQuery) -> CandidateRow:
    """A row of ``query`` fetched by someone else (a statement reusing its SQL)."""
    return _row(query.convert(raw), query.columns)


def _row(r: tuple, c: Mapping[str, int]) -> CandidateRow:
    expired_leases = r[c["expired_leases"]]
    return CandidateRow(
        candidate=selection.Candidate(
            account=r[c["name"]],
            routing_identity=r[c["identity__name"]],
            pool=r[c["pool"]],
            proxy_url=r[c["proxy__url"]],
            proxy_cooldown_until=r[c["proxy__cooldown_until"]],
            remaining_credits=r[c["remaining_credits"]],
            last_started_at=r[c["identity__last_started_at"]],
            identity_cooldown_until=r[c["identity__cooldown_until"]],
            in_flight=r[c["identity__in_flight"]] - expired_leases,
            max_concurrency=r[c["identity__max_concurrency"]],
            min_start_interval_ms=r[c["identity__min_start_interval_ms"]],
            bound_sessions=r[c["live_sessions"]],
            ejected_until=r[c["identity__ejected_until"]],
            reserved=r[c["reserved"]],
            quota_resets_at=r[c["quota_resets_at"]],
            quota_probe=bool(r[c["quota_probe"]]),
        ),
        account_id=r[c["id"]],
        identity_id=r[c["identity_id"]],
        region=r[c["region"]],
        profile_arn=r[c["profile_arn"]],
        expired_leases=expired_leases,
        excluded=bool(r[c["excluded"]]),
        ready=bool(r[c["ready"]]),
        keys=SortKeys(
            proxy_cooling=bool(r[c["proxy_cooling"]]),
            model_preferred=bool(r[c["model_preferred"]]),
            session_count=r[c["identity_sessions"]],
            pool_rank=r[c["pool_rank"]],
            latency_band=r[c["band"]],
            # Negated for an ascending order, and 0 in the other pool's column.
            remaining_credits_sort=_credits_sort(r[c["credit_first_credits"]], r[c["balanced_credits"]]),
            credit_burn_per_hour=r[c["credit_burn"]],
        ),
    )


def _credits_sort(credit_first: float | None, balanced: float | None) -> float | None:
    if credit_first is None or balanced is None:  # a bound-only read leaves the sort keys out
        return None
    return -(credit_first + balanced)
