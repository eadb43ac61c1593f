"""The one pool seeder: identities, their accounts, proxies, a group and a
gateway key, optionally with live session bindings, made in a few bulk
statements whatever the size.

``make demo`` seeds its demonstration pool with it, ``make bench`` its
10- to 1,000-account pools, and the tests that start a real server (drills,
fuzzing, the Python client) their small ones. Every row it makes is named
with the caller's prefix, and :func:`pool_clear` removes exactly those."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import OuterRef, Q
from django.utils import timezone

from accounts.models import Account, AccountGroup, ApiKey, Pool, Proxy, RoutingIdentity
from accounts.services import api_key_create
from routing.models import SessionBinding


@dataclass(frozen=True)
class AccountSpec:
    suffix: str = ""  # the account is named <prefix><identity name><suffix>
    pool: str = Pool.BALANCED
    proxy: str | None = None  # a key of ``pool_seed``'s ``proxies``
    remaining_credits: float | None = None


@dataclass(frozen=True)
class IdentitySpec:
    name: str
    max_concurrency: int = 1
    min_start_interval_ms: int = 0
    accounts: tuple[AccountSpec, ...] = (AccountSpec(),)


@dataclass(frozen=True)
class KeySpec:
    name: str
    preferred_pool: str = Pool.BALANCED
    options: dict = field(default_factory=dict)  # any other ApiKey field (account_group=None: the whole pool)


@dataclass(frozen=True)
class SeededPool:
    keys: dict[str, str]  # key name (without prefix) → plaintext, shown once
    key_ids: dict[str, int]
    accounts: list[Account]
    group: AccountGroup

    @property
    def key(self) -> str:
        """The plaintext of the first key."""
        return next(iter(self.keys.values()))


def uniform_pool(count: int, *, max_concurrency: int = 1, name: str = "kiro") -> list[IdentitySpec]:
    """``count`` identities with one balanced account each, named
    ``<name>-000`` and on (the account like its identity)."""
    width = max(3, len(str(count - 1)))
    return [IdentitySpec(f"{name}-{i:0{width}d}", max_concurrency=max_concurrency) for i in range(count)]


@transaction.atomic
def pool_seed(
    *,
    prefix: str,
    identities: list[IdentitySpec],
    proxies: dict[str, str] | None = None,
    keys: tuple[KeySpec, ...] = (KeySpec("gateway"),),
    region: str = "us-east-1",
    credentials: bool = True,
) -> SeededPool:
    """Create the pool; every key is limited to it through one group."""
    made_proxies = {
        code: proxy
        for code, proxy in zip(
            (proxies or {}),
            Proxy.objects.bulk_create(
                Proxy(name=f"{prefix}egress-{code}", url=url) for code, url in (proxies or {}).items()
            ),
            strict=True,
        )
    }
    made_identities = RoutingIdentity.objects.bulk_create(
        RoutingIdentity(
            name=f"{prefix}{spec.name}",
            max_concurrency=spec.max_concurrency,
            min_start_interval_ms=spec.min_start_interval_ms,
        )
        for spec in identities
    )
    accounts = []
    for spec, identity in zip(identities, made_identities, strict=True):
        for account in spec.accounts:
            name = f"{spec.name}{account.suffix}"
            accounts.append(
                Account(
                    name=f"{prefix}{name}",
                    identity=identity,
                    proxy=made_proxies[account.proxy] if account.proxy else None,
                    pool=account.pool,
                    remaining_credits=account.remaining_credits,
                    region=region,
                    profile_arn=f"arn:aws:codewhisperer:{region}:000000000000:profile/{name.upper()}",
                    credentials={"refresh_token": secrets.token_urlsafe(24)} if credentials else {},
                )
            )
    accounts = Account.objects.bulk_create(accounts)
    group = AccountGroup.objects.create(name=f"{prefix}pool")
    group.accounts.set(accounts)
    plaintexts, key_ids = {}, {}
    for spec in keys:
        fields = {"account_group": group, "preferred_pool": spec.preferred_pool, **spec.options}
        key, plaintext = api_key_create(name=f"{prefix}{spec.name}", **fields)
        plaintexts[spec.name], key_ids[spec.name] = plaintext, key.pk
    return SeededPool(keys=plaintexts, key_ids=key_ids, accounts=accounts, group=group)


@transaction.atomic
def pool_clear(*, prefix: str) -> None:
    """Delete every row a seed with this prefix made (bindings and leases go with them)."""
    ApiKey.objects.filter(name__startswith=prefix).delete()
    AccountGroup.objects.filter(name__startswith=prefix).delete()
    Account.objects.filter(name__startswith=prefix).delete()
    RoutingIdentity.objects.filter(name__startswith=prefix).delete()
    Proxy.objects.filter(name__startswith=prefix).delete()


def bindings_seed(*, key_id: int, accounts: list[Account], count: int, session_prefix: str = "s-") -> None:
    """``count`` live bindings of the key, session ids ``<session_prefix>0 ...``,
    spread round-robin over ``accounts``; the per-account counters follow."""
    now = timezone.now()
    expires = now + timedelta(hours=6)
    if connection.vendor == "postgresql":
        # One statement, generated in the database, with the per-row count
        # trigger off (one account row updated tens of thousands of times in
        # one transaction is slow); the counters are recounted right after.
        ids = [a.pk for a in accounts]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(
                f"""INSERT INTO {SessionBinding._meta.db_table}
                        (api_key_id, session_id, account_id, created_at, updated_at, expires_at)
                    SELECT %s, %s || n, (%s::bigint[])[1 + n %% %s], %s, %s, %s
                      FROM generate_series(0, %s - 1) AS n""",
                [key_id, session_prefix, ids, len(ids), now, now, expires, count],
            )
            # SET LOCAL outlives a savepoint: without this, inside a caller's
            # transaction no trigger would fire until it ends.
            cursor.execute("SET LOCAL session_replication_role = origin")
    else:
        batch = []
        for n in range(count):
            batch.append(
                SessionBinding(
                    api_key_id=key_id,
                    session_id=f"{session_prefix}{n}",
                    account=accounts[n % len(accounts)],
                    created_at=now,
                    updated_at=now,
                    expires_at=expires,
                )
            )
        SessionBinding.objects.bulk_create(batch, batch_size=2000)
    binding_rows_recount(Q(pk__in=[a.pk for a in accounts]))


def binding_rows_recount(accounts: Q) -> None:
    """Set ``binding_rows`` of the matching accounts from their bindings."""
    from django.db.models import Count, Subquery
    from django.db.models.functions import Coalesce

    counted = SessionBinding.objects.filter(account=OuterRef("pk")).order_by().values("account").annotate(n=Count("*"))
    Account.objects.filter(accounts).update(binding_rows=Coalesce(Subquery(counted.values("n")), 0))
