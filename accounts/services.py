"""Writes on the pool. Keyword-only, typed, atomic."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from accounts.authentication import key_cache
from accounts.models import Account, ApiKey, Proxy, RoutingIdentity
from accounts.signals import keys_disabling, pool_changed
from routing import quotas
from routing.models import CooldownEvent, CooldownKind

# The columns an operator cools an identity or a proxy down with, and the
# history events of each: (cooled, cleared, the event's column naming it).
COOLDOWN_COLUMNS = ("cooldown_until", "cooldown_reason")
_COOLDOWN_EVENTS = {
    RoutingIdentity: (CooldownKind.IDENTITY_COOLDOWN, CooldownKind.IDENTITY_CLEARED, "identity_id"),
    Proxy: (CooldownKind.PROXY_COOLDOWN, CooldownKind.PROXY_CLEARED, "proxy_id"),
}
# An account's columns that decide whether its known balance takes it out.
BALANCE_COLUMNS = ("remaining_credits", "min_remaining_credits")


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
    rows = list(keys.values_list("pk", "prefix"))
    with transaction.atomic():
        if not enabled:
            keys_disabling.send(sender=ApiKey, key_ids=sorted(pk for pk, _ in rows))
        count = keys.update(enabled=enabled)
        for _, prefix in rows:
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


def cooldown_edit_save(*, row: RoutingIdentity | Proxy, columns: list[str] | None) -> None:
    """Save an operator's edit of an identity or a proxy (the admin's form,
    the operator API): ``columns``, the ones the edit changed (None: a new
    row, inserted whole). An edit that cools the row down, changes its
    cooldown or ends it is recorded as the dispatcher's cooldowns and the
    clear-cooldown action are, with a ``CooldownEvent``: the dashboards show
    the history from those. What the row held before is read under its
    lock, as stored: a gateway may have cooled it since the edit read it."""
    cooled, cleared, subject = _COOLDOWN_EVENTS[type(row)]
    now = timezone.now()
    with transaction.atomic():
        if columns is None:
            row.save()
            before = (None, "")
        elif not set(columns).intersection(COOLDOWN_COLUMNS):
            row.save(update_fields=columns)  # an empty list writes nothing
            return
        else:
            before = type(row).objects.select_for_update().values_list(*COOLDOWN_COLUMNS).get(pk=row.pk)
            row.save(update_fields=columns)
        until, reason = after = type(row).objects.values_list(*COOLDOWN_COLUMNS).get(pk=row.pk)
        if after == before:
            return
        if until is not None and until > now:
            operator = f"set by operator: {reason}" if reason else "set by operator"
            length = CooldownEvent._meta.get_field("reason").max_length
            event = CooldownEvent(kind=cooled, reason=operator[:length], until=until)
        elif before[0] is not None and before[0] > now:
            event = CooldownEvent(kind=cleared, reason="cleared by operator")
        else:
            return  # neither cooling before nor after: nothing happened to it
        setattr(event, subject, row.pk)
        event.created_at = now
        event.save()


def account_edit_save(*, account: Account, columns: list[str] | None) -> None:
    """Save an operator's edit of an account (the admin's form, the operator
    API): ``columns``, the ones the edit changed (None: a new account). A
    balance set at or below the minimum, or a minimum raised to the
    balance, takes it out of selection as a reported one does, and it gets
    the same probe time (``routing.quotas.accounts_probe_schedule``): else
    nothing but the reset time or an operator would bring it back."""
    with transaction.atomic():
        if columns is None:
            account.save()
        else:
            account.save(update_fields=columns)  # an empty list writes nothing
        if columns is None or set(columns).intersection(BALANCE_COLUMNS):
            quotas.accounts_probe_schedule(accounts=Account.objects.filter(pk=account.pk), now=timezone.now())
