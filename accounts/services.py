"""Writes on the pool. Keyword-only, typed, atomic."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from accounts.authentication import key_cache
from accounts.models import Account, ApiKey, Proxy, RoutingIdentity
from accounts.signals import pool_changed
from routing import quotas
from routing.models import CooldownEvent, CooldownKind


@transaction.atomic
def api_key_create(**fields) -> tuple[ApiKey, str]:
    """Create a key and return it with its plaintext: the only moment the
    plaintext exists outside the caller's hands."""
    key = ApiKey(**fields)
    plaintext = key.set_new_secret()
    key.full_clean()
    key.save()
    return key, plaintext


def api_key_enabled_set(*, keys, enabled: bool) -> int:
    """Enable or disable keys in bulk (the admin's actions). An update of a
    queryset sends no ``post_save``: this process's key cache forgets them
    itself (on PostgreSQL every process hears the database's notice too)."""
    prefixes = list(keys.values_list("prefix", flat=True))
    with transaction.atomic():
        count = keys.update(enabled=enabled)
        for prefix in prefixes:
            key_cache.forget_through_commit(prefix)
    return count


def account_enabled_set(*, accounts, enabled: bool) -> int:
    """Enable or disable accounts in bulk (the admin's actions). An update
    of a queryset sends no ``post_save``, so the enabling says itself that
    the pool changed: a dispatch waiting for a slot may take one of them."""
    with transaction.atomic():
        count = accounts.update(enabled=enabled)
        if count and enabled:
            pool_changed.send(sender=Account)
    return count


def account_quota_reset(*, accounts) -> int:
    """Put spent accounts back into selection, as a quota reset does: those
    whose quota is exhausted, and those whose known balance is at or below
    their minimum (``routing.quotas.accounts_quota_restore``)."""
    with transaction.atomic():
        count = quotas.accounts_quota_restore(accounts=accounts, reason="reset by operator", now=timezone.now())
        if count:
            pool_changed.send(sender=Account)
    return count


def identity_cooldown_clear(*, identities) -> int:
    now = timezone.now()
    with transaction.atomic():
        ids = list(identities.filter(cooldown_until__gt=now).values_list("id", flat=True))
        RoutingIdentity.objects.filter(id__in=ids).update(cooldown_until=None, cooldown_reason="")
        CooldownEvent.objects.bulk_create(
            CooldownEvent(
                kind=CooldownKind.IDENTITY_CLEARED, identity_id=pk, reason="cleared by operator", created_at=now
            )
            for pk in ids
        )
        if ids:
            pool_changed.send(sender=RoutingIdentity)
    return len(ids)


def proxy_cooldown_clear(*, proxies) -> int:
    now = timezone.now()
    with transaction.atomic():
        ids = list(proxies.filter(cooldown_until__gt=now).values_list("id", flat=True))
        Proxy.objects.filter(id__in=ids).update(cooldown_until=None, cooldown_reason="")
        CooldownEvent.objects.bulk_create(
            CooldownEvent(kind=CooldownKind.PROXY_CLEARED, proxy_id=pk, reason="cleared by operator", created_at=now)
            for pk in ids
        )
        if ids:
            pool_changed.send(sender=Proxy)
    return len(ids)
