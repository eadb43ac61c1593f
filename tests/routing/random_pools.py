"""Random pools for the property tests of the dispatch read: specs drawn
by hypothesis, and the pool they describe built in the database."""

from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta

from django.utils import timezone
from hypothesis import strategies as st

from accounts.models import Account, AccountGroup, ApiKey, Pool, Proxy, RoutingIdentity
from routing.dispatch import DispatchRequest
from routing.models import LatencySnapshot, Lease, SessionBinding
from routing.selectors import dispatch as reads
from routing.selectors import walk
from routing.selectors.candidates import HEAD_ROWS
from tests.factories import AccountFactory, ApiKeyFactory, latency_snapshot_create

_SAMPLES = st.one_of(st.none(), st.tuples(st.integers(1, 40), st.floats(50, 3000, allow_nan=False)))


def account_specs(*, identities: int, max_size: int, min_size: int = 1, samples=_SAMPLES):
    """Accounts over ``identities`` identities (several accounts may alias
    one), each with its pool, balance, proxy, bindings and latency samples."""
    return st.lists(
        st.fixed_dictionaries(
            {
                "identity": st.integers(0, identities - 1),
                "pool": st.sampled_from([Pool.BALANCED, Pool.CREDIT_FIRST]),
                "credits": st.one_of(st.none(), st.floats(0, 1000, allow_nan=False).map(lambda x: round(x, 1))),
                "proxy": st.sampled_from([None, 0, 1]),
                "bindings": st.integers(0, 3),
                "expired_bindings": st.integers(0, 1),
                "samples": samples,
                # Out of the read, whose sessions key 3 and whose balance the best
                # known credit_first balance must not count: disabled, exhausted,
                # or outside the key's group.
                "enabled": st.sampled_from([True, True, True, False]),
                "exhausted": st.sampled_from([False, False, False, True]),
                "in_group": st.sampled_from([True, True, True, False]),
            }
        ),
        min_size=min_size,
        max_size=max_size,
    )


def identity_specs(count: int, *, cooling=None, in_flight=None):
    """``count`` identities: last start, cooldown, limit, load and pacing
    (``cooling`` and ``in_flight`` draw those two, when given)."""
    return st.lists(
        st.fixed_dictionaries(
            {
                "started_ago": st.one_of(st.none(), st.integers(1, 600)),
                "cooling": st.booleans() if cooling is None else cooling,
                "max_concurrency": st.integers(1, 3),
                "in_flight": st.integers(0, 3) if in_flight is None else in_flight,
                "pacing_ms": st.sampled_from([0, 0, 500, 60_000]),
            }
        ),
        min_size=count,
        max_size=count,
    )


def pool_build(accounts, identities, *, proxy_cooling, global_avg, proxy_samples):
    """The pool the specs describe, in an emptied database: its accounts, in
    the order of ``accounts``."""
    for model in (Lease, SessionBinding, LatencySnapshot, ApiKey, AccountGroup, Account, RoutingIdentity, Proxy):
        model.objects.all().delete()
    now = timezone.now()
    proxies = [
        Proxy.objects.create(
            name=f"p{i}", url=f"http://p{i}:1", cooldown_until=now + timedelta(minutes=5) if cooling else None
        )
        for i, cooling in enumerate(proxy_cooling)
    ]
    made_identities = []
    for i, spec in enumerate(identities):
        identity = RoutingIdentity.objects.create(
            name=f"i{i}",
            max_concurrency=spec["max_concurrency"],
            min_start_interval_ms=spec["pacing_ms"],
            cooldown_until=now + timedelta(minutes=1) if spec["cooling"] else None,
            last_started_at=now - timedelta(seconds=spec["started_ago"]) if spec["started_ago"] else None,
        )
        made_identities.append(identity)
    other_key = ApiKeyFactory(name="other")
    made = []
    for n, spec in enumerate(accounts):
        # Mixed case and punctuation: names must order by code point in both places.
        account = AccountFactory(
            name=f"{'Ab'[n % 2]}-{n:02d}",
            identity=made_identities[spec["identity"]],
            pool=spec["pool"],
            remaining_credits=spec["credits"],
            proxy=proxies[spec["proxy"]] if spec["proxy"] is not None else None,
            enabled=spec["enabled"],
            quota_exhausted=spec["exhausted"],
        )
        for b in range(spec["bindings"] + spec["expired_bindings"]):
            expires = now - timedelta(seconds=5) if b >= spec["bindings"] else now + timedelta(hours=1)
            SessionBinding.objects.create(
                api_key=other_key,
                session_id=f"{account.name}-{b}",
                account=account,
                created_at=now - timedelta(hours=2),
                updated_at=now - timedelta(hours=2),
                expires_at=expires,
            )
        made.append(account)
    for identity, spec in zip(made_identities, identities, strict=True):
        # Live leases make the in-flight counter; the claim path keeps it so.
        for _ in range(spec["in_flight"]):
            Lease.objects.create(
                account=identity.accounts.first() or made[0],
                account_name="x",
                identity=identity,
                started_at=now,
                expires_at=now + timedelta(minutes=15),
            )
        RoutingIdentity.objects.filter(pk=identity.pk).update(in_flight=spec["in_flight"])
    if global_avg is not None:
        latency_snapshot_create(
            global_avg_ms=global_avg,
            accounts={a.name: spec["samples"] for a, spec in zip(made, accounts, strict=True) if spec["samples"]},
            proxies={p.url: s for p, s in zip(proxies, proxy_samples, strict=True) if s},
        )
    return made


def pool_key(made, accounts, *, grouped: bool, preferred_pool: str) -> ApiKey:
    """The key a property test reads for: limited to a group of the accounts
    whose spec is ``in_group``, or over every account."""
    group = None
    if grouped:
        group = AccountGroup.objects.create(name="keyed")
        group.accounts.set([a for a, spec in zip(made, accounts, strict=True) if spec["in_group"]])
    return ApiKeyFactory(name="gateway", preferred_pool=preferred_pool, model_preferences={}, account_group=group)


def names_at(made, indexes) -> frozenset[str]:
    """The names of the accounts at ``indexes`` (those past the end left out)."""
    return frozenset(made[i].name for i in indexes if i < len(made))


def walk_head_check(
    key: ApiKey, request: DispatchRequest, *, preferred: frozenset[str], snapshot, bands_whole: bool = True
) -> None:
    """The head read of ``request`` through the walk says it is exact
    exactly when the full read's head could be walked, and then it is that
    head, row and value for row. Unless ``bands_whole`` (some row of the
    key's scope lacks its band under ``snapshot``): then it reads nothing."""
    shape, values = reads.request_shape(
        key=key,
        request=request,
        now=timezone.now(),
        snapshot=snapshot,
        spread=bool(request.session_id),
        head=True,
        preferred=preferred,
    )
    assert walk.walkable(shape, size=sys.maxsize)
    full = reads.run(shape, values).rows
    walked = reads.run(dataclasses.replace(shape, walk=True), values).rows
    if not bands_whole:
        assert walked == []
        return
    full_is_walkable = len(full) == HEAD_ROWS and full[-1].ready and not full[-1].keys.proxy_cooling
    assert walk.exact(walked, head_rows=HEAD_ROWS) == full_is_walkable
    if full_is_walkable:
        assert walked == full
