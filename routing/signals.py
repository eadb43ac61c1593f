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
transaction (``slots.identity_slots_release``)."""

from django.db.models.signals import pre_delete
from django.dispatch import receiver

from accounts.models import RoutingIdentity
from accounts.signals import pool_changed
from core.transactions import on_commit_once
from routing import pool_order, slots, wakeups


@receiver(pool_changed)
def pool_edited(sender, **kwargs) -> None:
    wakeups.release_notify()
    on_commit_once(pool_order.pool_order_bands_catch_up, robust=True)


@receiver(pre_delete, sender=RoutingIdentity)
def identity_deleting(sender, instance: RoutingIdentity, **kwargs) -> None:
    slots.identity_slots_release(identity_id=instance.pk)
