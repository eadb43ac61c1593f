"""What a key may route to: its accounts whatever their state, its model
preference, whether a request excluded all of them, and the upstream secrets
of the account a dispatch granted. The ordered candidates read is
``candidates.py``."""

from __future__ import annotations

import time

from django.db.models import QuerySet

from accounts.models import Account, ApiKey, RouteStrategy
from routing.dispatch import DispatchRequest


def model_preference(key: ApiKey, model: str | None) -> frozenset[str]:
    """Accounts the key prefers for this model (SPEC §2 key 2); empty when none is active."""
    wanted = key.model_preferences.get(model, []) if model and key.model_preferences else []
    return frozenset(name for name in wanted if isinstance(name, str))


def key_accounts(key: ApiKey) -> QuerySet:
    """Every account the key may route to, whatever its state: its fixed
    account, its group's accounts, or all."""
    accounts = Account.objects.all()
    if key.route_strategy == RouteStrategy.FIXED:
        return accounts.filter(pk=key.fixed_account_id)
    if key.account_group_id is not None:
        return accounts.filter(groups=key.account_group_id)
    return accounts


# How long a process trusts a pool's size, and how many sizes it keeps.
POOL_SIZE_SECONDS = 60.0
POOL_SIZES_KEPT = 1024
_pool_sizes: dict[tuple[str, int | None], tuple[float, int]] = {}


def pool_size(key: ApiKey) -> int:
    """How many accounts the key routes to, whatever their state, as counted
    at most ``POOL_SIZE_SECONDS`` ago in this process. It only chooses the
    faster of two reads that give the same answer (``walk.py``), so a count
    a minute old is good enough, and counting on every dispatch is not."""
    if key.route_strategy == RouteStrategy.FIXED:
        return 1
    scope = ("group", key.account_group_id) if key.account_group_id is not None else ("all", None)
    now = time.monotonic()
    known = _pool_sizes.get(scope)
    if known is not None and known[0] > now:
        return known[1]
    size = key_accounts(key).count()
    if len(_pool_sizes) >= POOL_SIZES_KEPT:
        _pool_sizes.clear()
    _pool_sizes[scope] = (now + POOL_SIZE_SECONDS, size)
    return size


def pool_sizes_clear() -> None:
    """Forget the sizes counted (tests, which reuse ids)."""
    _pool_sizes.clear()


def every_account_excluded(*, key: ApiKey, request: DispatchRequest) -> bool:
    """SPEC §2's 502: the request excluded every enabled account of the key.
    Read only when no account is a candidate: an excluded account that is also
    exhausted or out of credits still counts as excluded (its failure is the
    request's news, not a configuration problem)."""
    if not request.exclude_accounts:
        return False
    accounts = key_accounts(key).filter(enabled=True)
    return accounts.exists() and not accounts.exclude(name__in=request.exclude_accounts).exists()


def account_name(*, account_id: int) -> str | None:
    return Account.objects.filter(pk=account_id).values_list("name", flat=True).first()


def account_credentials(*, account_id: int):
    """The account's upstream secrets, decrypted into the redacting
    ``SecretDict`` (accounts/fields.py). Only the dispatch response of a key
    with credentials access reads them."""
    return Account.objects.filter(pk=account_id).values_list("credentials", flat=True).first()
