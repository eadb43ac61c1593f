"""The pool a fuzz run works against: a few identities (roomy enough that a
dispatch never has to wait for a slot), accounts with and without proxies, a
group, a gateway key and a staff user with a DRF token who holds every
permission of the pool."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Seeded:
    gateway_key: str
    staff_token: str
    account: str
    identity: str


def seed() -> Seeded:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from rest_framework.authtoken.models import Token

    from accounts.models import Pool
    from routing.pools import AccountSpec, IdentitySpec, KeySpec, pool_seed

    pool = [
        IdentitySpec(
            f"kiro-{i}",
            max_concurrency=100_000,
            accounts=(
                AccountSpec(pool=Pool.CREDIT_FIRST if i == 2 else Pool.BALANCED, proxy="egress" if i == 0 else None),
            ),
        )
        for i in range(3)
    ]
    seeded = pool_seed(
        prefix="fuzz-",
        identities=pool,
        proxies={"egress": "http://fuzz-proxy.internal:3128"},
        # No cap on the key's leases: the fuzzer dispatches far more than it completes.
        keys=(
            KeySpec(
                "gateway", options={"account_group": None, "credentials_access": True, "max_concurrency": 1_000_000}
            ),
        ),
    )
    user = get_user_model().objects.create_user(username="fuzz-operator", password=None, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label__in=["accounts", "routing"]))
    token = Token.objects.create(user=user)
    return Seeded(gateway_key=seeded.key, staff_token=token.key, account="fuzz-kiro-0", identity="fuzz-kiro-0")
