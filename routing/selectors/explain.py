"""What a dispatch would do now, without doing it (``POST
/api/v1/dispatch/explain``): the same candidates read as a dispatch, every
row, ordered by the ordering contract itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings

from accounts.models import Account, ApiKey
from routing import readiness, selection
from routing.dispatch import DispatchRequest, SessionState
from routing.selectors import dispatch as reads
from routing.selectors import key_accounts
from routing.selectors.latency import latency_snapshot_current


@dataclass(frozen=True, slots=True)
class Explanation:
    session: SessionState
    bound_account: str | None
    snapshot: selection.LatencySnapshot | None
    ranked: list[selection.Ranked]  # in the order a dispatch would try them
    sticky_patience_ms: int
    sticky_would_wait: bool  # the bound account is busy and a dispatch would wait for it
    unselectable: list[tuple[str, str]]  # (account, reason) of the key's accounts that are not candidates


def dispatch_explain(*, key: ApiKey, request: DispatchRequest, now: datetime) -> Explanation:
    """What a dispatch would do now, without doing it: every candidate, in
    the order of the ordering contract itself (``selection.order_candidates``),
    the sticky fast path's account first when it would serve."""
    stored = latency_snapshot_current() if key.latency_routing_enabled else None
    snapshot = stored.snapshot if stored else None
    preferred = key_accounts.model_preference(key, request.model)
    found = reads.read(key=key, request=request, now=now, snapshot=None, spread=False, preferred=preferred)
    candidates = [row for row in found.rows if not row.excluded]
    bound_account_id = found.bound_account_id
    if bound_account_id is None and request.session_id and not found.rows:
        # No row to carry the binding (nothing is selectable): the session is
        # still sticky while a live binding exists (SPEC §2), so look it up.
        bound_account_id = _bound_account_id(key=key, session_id=request.session_id, now=now)
    bound = next((row for row in found.rows if row.account_id == bound_account_id), None)
    bound_name = bound.candidate.account if bound else _account_name(bound_account_id)
    ctx = selection.SelectionContext(
        now=now,
        preferred_pool=key.preferred_pool,
        latency_routing_enabled=key.latency_routing_enabled,
        snapshot=snapshot,
        preferred_accounts=preferred,
        slow_start=timedelta(seconds=settings.KIROPOOL_SLOW_START_SECONDS),
    )
    patience = settings.KIROPOOL_STICKY_PATIENCE_MS if key.sticky_patience_ms is None else key.sticky_patience_ms
    fast_path = None
    would_wait = False
    if bound is not None and not bound.excluded and not bound.candidate.quota_probe:
        if readiness.sticky_fast_path_ok(bound.candidate, ctx):
            fast_path = bound.candidate.account
        else:
            would_wait = (
                patience > 0 and request.max_wait_ms > 0 and readiness.sticky_patience_applies(bound.candidate, ctx)
            )
    if request.session_id and fast_path is None:
        # Key 3 counts every account of the key, excluded ones included.
        totals = selection.session_totals([row.candidate for row in found.rows])
        ctx = dataclasses.replace(ctx, spread_sessions=True, session_totals=totals)
    ranked = selection.order_candidates([row.candidate for row in candidates], ctx)
    ranked.sort(key=lambda r: r.candidate.account != fast_path)  # stable: the rest keep their order
    return Explanation(
        session=SessionState.of(request.session_id, bound_account_id),
        bound_account=bound_name,
        snapshot=snapshot,
        ranked=ranked,
        sticky_patience_ms=patience,
        sticky_would_wait=would_wait,
        unselectable=_unselectable(key=key, request=request, now=now, candidates={r.account_id for r in candidates}),
    )


def _unselectable(
    *, key: ApiKey, request: DispatchRequest, now: datetime, candidates: set[int]
) -> list[tuple[str, str]]:
    """The key's accounts a dispatch would not consider, each with the first
    reason that keeps it out (explain only: one query over the key's scope)."""
    accounts = key_accounts.key_accounts(key)
    found = []
    fields = ("id", "name", "enabled", "quota_exhausted", "remaining_credits", "min_remaining_credits")
    for pk, name, enabled, exhausted, credits, minimum in accounts.order_by("name").values_list(*fields):
        if pk in candidates:
            continue
        if not enabled:
            reason = "disabled"
        elif name in request.exclude_accounts:
            reason = "excluded"
        elif exhausted:
            reason = "quota_exhausted"
        elif credits is not None and credits <= minimum:
            reason = "credits_at_or_below_minimum"
        else:
            continue  # back in selection a moment after the read (a reset, a probe)
        found.append((name, reason))
    return found


def _bound_account_id(*, key: ApiKey, session_id: str, now: datetime) -> int | None:
    """The account of the live binding of (key, session id), if any."""
    rows = reads.binding_lookup().fetch({"key_id": key.pk, "session_id": session_id, "now": now})
    return rows[0][0] if rows else None


def _account_name(account_id: int | None) -> str | None:
    if account_id is None:
        return None
    return Account.objects.filter(pk=account_id).values_list("name", flat=True).first()
