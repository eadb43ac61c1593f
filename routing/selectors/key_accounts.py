"""What a key may route to: its accounts whatever their state, its model
preference, whether a request excluded all of them, and the upstream secrets
of the account a dispatch granted. The ordered candidates read is
``candidates.py``."""

from __future__ import annotations

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


def every_account_excluded(*, key: ApiKey, request: DispatchRequest) -> bool:
    """SPEC §2's 502: the request excluded every enabled account of the key.
    Read only when no account is a candidate: an excluded account that is also
    exhausted or out of credits still counts as excluded (its failure is the
    request's news, not a configuration problem)."""
    if not request.exclude_accounts:
        return False
    accounts = key_accounts(key).filter(enabled=True)
    return accounts.exists() and not accounts.exclude(name__in=request.exclude_accounts).exists()


def account_credentials(*, account_id: int):
    """The account's upstream secrets, decrypted into the redacting
    ``SecretDict`` (accounts/fields.py). Only the dispatch response of a key
    with credentials access reads them."""
    return Account.objects.filter(pk=account_id).values_list("credentials", flat=True).first()
