"""The dashboards (SPEC §6): the pool at a glance, and one account in depth.

Staff only, through the Django session: a gateway's API key authenticates
nothing here, so a key holder is sent to the login page like anyone else.
Staff is the way in, not a licence, as in the admin and the operator API
(``accounts/permissions.py``): a page needs the view (or change) permission
of every model whose rows it shows, and unbinding the delete permission of
session bindings; a staff user without them gets the admin's 403.
Like the admin's, the pages are never cached (``never_cache``): a browser
or proxy keeps no copy of them to show after the operator logs out.

Each page makes a fixed number of queries whatever the size of the pool (see
the reads in ``routing/selectors/dashboard.py``). The overview loads
every account once, then filters, sorts and counts in Python: 500 rows are
cheap to sort, the summary strip needs the whole pool anyway, and the
computed columns (live sessions, latency band, cooldown left) sort exactly as
they are shown.
"""

from __future__ import annotations

from functools import wraps
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from accounts.models import Account, Pool, Proxy, RoutingIdentity
from accounts.permissions import model_permission, view_permissions
from routing import sessions
from routing.dashboard import charts, timecharts
from routing.dashboard.history import (
    ACTIVITY_HOURS,
    ActivityWindow,
    account_activity,
    activity_hours,
    event_lines,
    lease_lines,
    outcome_label,
)
from routing.dashboard.presenters import (
    account_rows,
    identity_bars,
    latency_points,
    live,
    snapshot_info,
    sticky_stats,
    summarize,
)
from routing.dashboard.table import COLUMNS, DEFAULT_SORT, FILTERS, matches_query, parse_sort, sort_rows
from routing.dashboard.text import Left, Moment, ms_text
from routing.models import CooldownEvent, LatencySnapshot, Lease, SessionBinding
from routing.selectors import dashboard as selectors

UNBIND_PERMISSION = model_permission(SessionBinding, "delete")
# The models whose rows each page shows: the overview every account with its
# identity's and proxy's state and the latency snapshot's bands; the account
# page those, and its session bindings, leases (key names, session ids,
# error texts) and cooldown events. Counts over other rows (an account's live
# sessions, the last hour's returning turns) show none of them.
OVERVIEW_MODELS = (Account, RoutingIdentity, Proxy, LatencySnapshot)
ACCOUNT_MODELS = (*OVERVIEW_MODELS, SessionBinding, Lease, CooldownEvent)
BINDINGS_PER_PAGE = 50
RECENT_LEASES = 50
RECENT_EVENTS = 30
# ``?refresh=`` values offered: the page reloads itself, no JavaScript needed.
REFRESH_CHOICES = (0, 10, 30)


def _query_string(params: dict[str, str], **changes: str) -> str:
    merged = {k: v for k, v in {**params, **changes}.items() if v not in ("", None)}
    return f"?{urlencode(merged)}" if merged else "?"


def _refresh(request: HttpRequest) -> int:
    try:
        value = int(request.GET.get("refresh", "0"))
    except ValueError:
        return 0
    return value if value in REFRESH_CHOICES else 0


def views_missing(user, shown) -> list[str]:
    """The view permissions of the models in ``shown`` that ``user`` may not
    look at in the admin (holding neither their view nor change permission)."""
    return [
        model_permission(model, "view")
        for model in shown
        if not any(user.has_perm(permission) for permission in view_permissions(model))
    ]


def viewing_required(*shown: type):
    """Refuse (403) a staff user who may not look at each of these models."""

    def decorate(view):
        @wraps(view)
        def checked(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            missing = views_missing(request.user, shown)
            if missing:
                raise PermissionDenied(f"Needs the permission {', '.join(missing)}.")
            return view(request, *args, **kwargs)

        return checked

    return decorate


# --- views ------------------------------------------------------------------------


@never_cache
@require_GET
@staff_member_required
@viewing_required(*OVERVIEW_MODELS)
def pool_overview(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    accounts = selectors.dashboard_accounts(now=now)
    stored = selectors.dashboard_latency_snapshot()
    snapshot = stored.snapshot if stored else None
    rows = account_rows(accounts, snapshot, now=now)

    state = request.GET.get("state", "all")
    if state not in FILTERS:
        state = "all"
    query = request.GET.get("q", "").strip()[:200]
    column, descending = parse_sort(request.GET.get("sort"))
    refresh = _refresh(request)
    params = {
        "state": "" if state == "all" else state,
        "q": query,
        "sort": "" if column.key == DEFAULT_SORT and not descending else ("-" if descending else "") + column.key,
        "refresh": str(refresh) if refresh else "",
    }

    searched = [r for r in rows if matches_query(r, query)] if query else rows
    shown = sort_rows([r for r in searched if FILTERS[state][1](r)], column, descending=descending)

    filters = [
        {
            "key": key,
            "label": label,
            "count": sum(1 for r in searched if predicate(r)),
            "href": _query_string(params, state="" if key == "all" else key),
            "active": key == state,
        }
        for key, (label, predicate) in FILTERS.items()
    ]
    headers = []
    for c in COLUMNS:
        active = c.key == column.key
        next_descending = (not descending) if active else c.descending_first
        headers.append(
            {
                "key": c.key,
                "label": c.label,
                "numeric": c.numeric,
                "hint": c.hint,
                "href": _query_string(params, sort=("-" if next_descending else "") + c.key),
                "sorted": ("desc" if descending else "asc") if active else "",
            }
        )
    context = {
        "nav": "pool",
        "now": now,
        "rows": shown,
        "total": len(rows),
        "summary": summarize(rows, accounts),
        "sticky": sticky_stats(*selectors.dashboard_sticky_stats(now=now)),
        "snapshot": snapshot_info(snapshot, stored.sample_count if stored else 0, now=now),
        "filters": filters,
        "state": state,
        "query": query,
        "sort_param": params["sort"],
        "headers": headers,
        "refresh": refresh,
        "refresh_links": [
            {"seconds": s, "href": _query_string(params, refresh=str(s) if s else ""), "active": s == refresh}
            for s in REFRESH_CHOICES
        ],
        "filter_links": {f["key"]: f["href"] for f in filters},
        "sessions_chart": charts.sessions_chart(identity_bars(rows)),
        "latency_chart": charts.latency_chart(
            latency_points(rows, snapshot), global_avg_ms=snapshot.global_avg_ms if snapshot else None
        ),
        "band_tolerance": (
            ms_text(charts.band_tolerance(snapshot.global_avg_ms))
            if snapshot and snapshot.global_avg_ms is not None
            else None
        ),
    }
    return render(request, "dashboard/pool.html", context)


def _admin_url(name: str, *args) -> str:
    return reverse(f"admin:{name}", args=args)


@never_cache
@require_GET
@staff_member_required
@viewing_required(*ACCOUNT_MODELS)
def account_detail(request: HttpRequest, name: str) -> HttpResponse:
    now = timezone.now()
    account = selectors.dashboard_account(name=name, now=now)
    if account is None:
        raise Http404("No account by that name.")
    aliases = selectors.dashboard_identity_aliases(identity_id=account.identity_id, now=now)
    stored = selectors.dashboard_latency_snapshot()
    snapshot = stored.snapshot if stored else None
    row = account_rows([account], snapshot, now=now)[0]
    # The identity total comes from every alias, as on the overview.
    row.identity_sessions = sum(live(a.binding_rows, a.expired_bindings) for a in aliases)

    page = Paginator(selectors.dashboard_account_bindings(account_id=account.pk, now=now), BINDINGS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    bindings = [
        {
            "id": b.pk,
            "key": b.api_key.name,
            "key_admin": _admin_url("accounts_apikey_change", b.api_key_id),
            "session_id": b.session_id,
            "bound": Moment.of(b.created_at, now),
            "used": Moment.of(b.updated_at, now),
            "expires": Left.of(b.expires_at, now),
        }
        for b in page.object_list
    ]
    identity = account.identity
    hours = activity_hours(request.GET.get("hours"))
    window = ActivityWindow.of(hours, now)
    activity = account_activity(
        selectors.dashboard_account_minutes(account_id=account.pk, since=window.start),
        selectors.dashboard_pool_latency_minutes(since=window.start),
        window,
    )
    labels = {o: outcome_label(o) for o in activity.outcomes}
    context = {
        "nav": "pool",
        "now": now,
        "account": account,
        "row": row,
        "identity": identity,
        "pacing": ms_text(identity.min_start_interval_ms) if identity.min_start_interval_ms else None,
        "aliases": [
            {
                "name": a.name,
                "href": reverse("dashboard:account", args=[a.name]),
                "sessions": live(a.binding_rows, a.expired_bindings),
                "pool": Pool(a.pool).label if a.pool in Pool.values else a.pool,
                "enabled": a.enabled,
                "exhausted": a.quota_exhausted,
                "current": a.pk == account.pk,
            }
            for a in aliases
        ],
        "bindings": bindings,
        "page": page,
        "can_unbind": request.user.has_perm(UNBIND_PERMISSION),
        "leases": lease_lines(selectors.dashboard_account_leases(account_id=account.pk, limit=RECENT_LEASES), now=now),
        "events": event_lines(selectors.dashboard_account_events(account=account, limit=RECENT_EVENTS), now=now),
        "snapshot": snapshot,
        "recent_leases": RECENT_LEASES,
        "recent_events": RECENT_EVENTS,
        "admin": {
            "account": _admin_url("accounts_account_change", account.pk),
            "identity": _admin_url("accounts_routingidentity_change", identity.pk),
            "proxy": _admin_url("accounts_proxy_change", account.proxy_id) if account.proxy_id else None,
            "bindings": f"{_admin_url('routing_sessionbinding_changelist')}?{urlencode({'q': account.name})}",
            "leases": f"{_admin_url('routing_lease_changelist')}?{urlencode({'q': account.name})}",
        },
        "self_url": request.get_full_path(),
        "activity": {
            "hours": hours,
            "total": activity.total,
            "bucket_minutes": window.minutes,
            "choices": [{"hours": h, "href": f"?hours={h}#activity", "active": h == hours} for h in ACTIVITY_HOURS],
            "latency_chart": timecharts.latency_timeline(
                window.start, window.minutes, activity.latency_ms, activity.pool_latency_ms
            ),
            "leases_chart": timecharts.leases_timeline(window.start, window.minutes, activity.started),
            "outcomes_chart": timecharts.outcomes_timeline(window.start, window.minutes, activity.outcomes, labels),
            "outcome_keys": [
                {"label": labels[o], "colour": timecharts.OUTCOME_COLOURS.get(o, charts.MUTED), "count": sum(v)}
                for o, v in activity.outcomes.items()
            ],
        },
    }
    return render(request, "dashboard/account.html", context)


@never_cache
@require_POST
@staff_member_required
def binding_unbind(request: HttpRequest, binding_id: int) -> HttpResponse:
    """Forget one session's affinity: its next request is routed as a new session.

    Deleting the row is the whole operation: the database triggers keep the
    account's binding count exact, and there is no in-process cache to clear.
    """
    if not request.user.has_perm(UNBIND_PERMISSION):
        raise PermissionDenied("You may not unbind sessions.")
    binding = selectors.dashboard_binding(binding_id=binding_id)
    next_url = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
        next_url = ""
    if binding is None:
        messages.info(request, "That session was already unbound.")
        return redirect(next_url or reverse("dashboard:index"))
    sessions.session_unbind(bindings=SessionBinding.objects.filter(pk=binding.pk))
    messages.success(request, f"Unbound session “{binding.session_id}” from {binding.account.name}.")
    return redirect(next_url or reverse("dashboard:account", args=[binding.account.name]))
