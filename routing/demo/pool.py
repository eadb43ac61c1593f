"""The demo's rows: a demonstration pool with two keys, and a staff login for
the dashboard and the operator API.

Everything seeded is named ``demo-*`` and replaced on the next run, and the
keys are limited to the demo accounts, so it never routes to, or deletes,
anything else in the database it is pointed at. ``foreign_data`` lists what
else the database holds, so the command can refuse, unless forced, to add a
superuser and traffic to it."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from rest_framework.authtoken.models import Token

from accounts.models import Account, AccountGroup, ApiKey, Pool, Proxy, RoutingIdentity
from routing.pools import AccountSpec, IdentitySpec, KeySpec, pool_clear, pool_seed

PREFIX = "demo-"

# (identity, max_concurrency, pacing ms, accounts as (suffix, pool, proxy, credits), first-token ms)
# One identity is clearly fast and one clearly slow, so the latency chart has
# something to show; three identities have aliases, so sessions add up per identity.
# The first-token time is not seeded: it is how long the simulated upstream of
# that identity takes to answer (traffic.py).
POOL = [
    ("ada", 2, 0, [("", "balanced", "fra", None), ("-eu", "balanced", "ams", None)], 560),
    ("brian", 2, 0, [("", "balanced", "fra", None)], 520),
    ("cleo", 2, 0, [("", "balanced", None, None)], 240),
    ("dara", 2, 0, [("", "balanced", "ams", None)], 1450),
    ("emil", 1, 0, [("", "balanced", None, None)], 610),
    ("fern", 2, 250, [("", "balanced", "fra", None)], 650),
    ("gus", 2, 0, [("", "credit_first", None, 900.0), ("-b", "credit_first", "fra", None)], 500),
    ("hana", 1, 0, [("", "credit_first", "ams", 140.0)], 540),
    ("ivo", 2, 0, [("", "credit_first", None, 620.0)], 470),
    ("juno", 2, 0, [("", "balanced", "ams", None)], 700),
    ("kai", 3, 0, [("", "balanced", None, None), ("-backup", "balanced", "fra", None)], 590),
    ("lena", 2, 0, [("", "credit_first", "fra", 380.0)], 680),
]
PROXIES = {"fra": "http://demo-egress-fra.invalid:3128", "ams": "http://demo-egress-ams.invalid:3128"}


# A staff login lives only as long as the demo: it is removed when the demo
# stops, and its name and first name say what it is.
DEMO_USER_NOTE = "kiropool demo login (removed when the demo stops)"


@dataclass(frozen=True)
class Login:
    username: str
    password: str
    token: str


def demo_login() -> Login:
    """A staff login for the dashboard (and a DRF token for the operator API),
    with a fresh password every run unless KIROPOOL_DEMO_PASSWORD chooses it,
    so the one printed always works."""
    username = os.environ.get("KIROPOOL_DEMO_USER", "demo")
    password = os.environ.get("KIROPOOL_DEMO_PASSWORD") or secrets.token_urlsafe(12)
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(username=username)
    user.is_staff = user.is_superuser = user.is_active = True
    user.first_name = DEMO_USER_NOTE
    user.set_password(password)
    user.save()
    token, _ = Token.objects.get_or_create(user=user)
    return Login(username, password, token.key)


def demo_login_remove(login: Login) -> None:
    """The demo is over: its superuser goes (only the one the demo made)."""
    get_user_model().objects.filter(username=login.username, first_name=DEMO_USER_NOTE).delete()


def foreign_data() -> list[str]:
    """What the database holds that the demo did not make, one line a kind."""
    found = []
    for model in (RoutingIdentity, Account, Proxy, AccountGroup, ApiKey):
        count = model.objects.exclude(name__startswith=PREFIX).count()
        if count:
            found.append(f"{count} {model._meta.verbose_name_plural}")
    return found


@transaction.atomic
def demo_pool_seed() -> dict[str, str]:
    """Replace the previous demo pool with a fresh one; return the keys' plaintexts."""
    pool_clear(prefix=PREFIX)
    identities = [
        IdentitySpec(
            name,
            max_concurrency=concurrency,
            min_start_interval_ms=pacing,
            accounts=tuple(AccountSpec(suffix, pool, proxy, credits) for suffix, pool, proxy, credits in aliases),
        )
        for name, concurrency, pacing, aliases, _ in POOL
    ]
    seeded = pool_seed(
        prefix=PREFIX,
        identities=identities,
        proxies=PROXIES,
        keys=(KeySpec("gateway", preferred_pool=Pool.BALANCED), KeySpec("batch", preferred_pool=Pool.CREDIT_FIRST)),
    )
    return seeded.keys
