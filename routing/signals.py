"""Routing's side of an operator's edit of the pool
(``accounts.signals.pool_changed``), in the edit's transaction:

- dispatches waiting for a slot look again, in every process, once it
  commits (``wakeups.release_notify``): the edit may have freed one;
- once it commits, the order rows it left without a latency band get
  theirs (``pool_order.pool_order_bands_catch_up``, once per
  transaction), so their scope's dispatches walk the band index again at
  once, not after the next refresh. Robust: the edit has committed, and a
  failure here only leaves the rows to that refresh.

An identity deleted (over the operator API, in the ORM) takes its leases
with it: the key slots its open leases held are given back in the same
transaction (``revocations.identity_slots_release``).

A key that may no longer be used (saved disabled or past its expiry,
disabled by the admin's bulk action, or deleted) has its open leases closed
and their identity and key slots given back, in the same transaction and
before its row is written (``revocations.key_leases_close``): its gateway could no
longer complete them. A key whose expiry moves earlier has its open leases
end by then (``revocations.key_leases_shorten``)."""

from django.db.models.signals import pre_delete, pre_save
from django.dispatch import receiver

from accounts.models import ApiKey, RoutingIdentity
from accounts.signals import keys_disabling, pool_changed
from core.transactions import on_commit_once
from routing import pool_order, revocations, wakeups


@receiver(pool_changed)
def pool_edited(sender, **kwargs) -> None:
    wakeups.release_notify()
    on_commit_once(pool_order.pool_order_bands_catch_up, robust=True)


@receiver(pre_delete, sender=RoutingIdentity)
def identity_deleting(sender, instance: RoutingIdentity, **kwargs) -> None:
    revocations.identity_slots_release(identity_id=instance.pk)


@receiver(pre_save, sender=ApiKey)
def key_saving(sender, instance: ApiKey, **kwargs) -> None:
    # Before the key's row is written: a pacing claim locks its identity,
    # then the key's row, and closing the leases locks identities.
    if instance._state.adding:
        return
    if not instance.is_usable():
        revocations.key_leases_close(key_ids=[instance.pk])
    elif instance.expires_at is not None:
        revocations.key_leases_shorten(key_id=instance.pk, expires_at=instance.expires_at)


@receiver(keys_disabling)
def keys_disabled(sender, key_ids: list[int], **kwargs) -> None:
    revocations.key_leases_close(key_ids=key_ids)


@receiver(pre_delete, sender=ApiKey)
def key_deleting(sender, instance: ApiKey, **kwargs) -> None:
    revocations.key_leases_close(key_ids=[instance.pk])
