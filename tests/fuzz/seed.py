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

    from accounts.models import Account, AccountGroup, Pool, Proxy, RoutingIdentity
    from accounts.services import api_key_create

    proxy = Proxy.objects.create(name="fuzz-proxy", url="http://fuzz-proxy.internal:3128")
    accounts = []
    for i in range(3):
        identity = RoutingIdentity.objects.create(name=f"fuzz-identity-{i}", max_concurrency=100_000)
        accounts.append(
            Account.objects.create(
                name=f"fuzz-account-{i}",
                identity=identity,
                proxy=proxy if i == 0 else None,
                pool=Pool.CREDIT_FIRST if i == 2 else Pool.BALANCED,
                region="us-east-1",
                credentials={"refresh_token": f"fuzz-secret-{i}"},
            )
        )
    group = AccountGroup.objects.create(name="fuzz-group")
    group.accounts.set(accounts[:2])
    _, plaintext = api_key_create(name="fuzz-gateway", credentials_access=True)
    user = get_user_model().objects.create_user(username="fuzz-operator", password=None, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label__in=["accounts", "routing"]))
    token = Token.objects.create(user=user)
    return Seeded(gateway_key=plaintext, staff_token=token.key, account="fuzz-account-0", identity="fuzz-identity-0")
