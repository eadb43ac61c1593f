"""Operators' edits through the ORM (admin, operator API, services, the
shell), seen at once:

- a key saved or deleted is forgotten by this process's key cache, so an
  operator who disables a key sees it refused on the next request the
  process serves (on PostgreSQL every process, this one included, forgets
  it too once the edit commits: the database sends the notice, migration
  ``accounts/0008``, however the key was changed);
- an identity, account or proxy saved, or an account added to a group,
  sends :data:`pool_changed`, as do the services that clear cooldowns or
  reset quotas and an import.
"""

from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import Signal, receiver

from accounts.authentication import key_cache
from accounts.models import Account, AccountGroup, ApiKey, Proxy, RoutingIdentity

# Sent in the transaction of an operator's edit of the pool. Routing acts
# on it (routing/signals.py): an edit may have freed a slot (a raised
# limit, a shorter pacing interval, an account enabled, a cooldown cleared,
# a new account for a group's keys), so dispatches waiting for one look
# again, in every process, once it commits; and order rows it left without
# a latency band get theirs. The dispatcher's own writes are updates, which
# send no signal. accounts cannot call routing's services, which import
# accounts.
pool_changed = Signal()

# Sent with ``key_ids`` in the transaction that disables keys in bulk (the
# admin's action), before their rows are written: routing closes their open
# leases (routing/signals.py), as it does for a key saved unusable or deleted.
keys_disabling = Signal()


@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def api_key_forget(sender, instance: ApiKey, **kwargs) -> None:
    key_cache.forget_through_commit(instance.prefix)


@receiver(post_save, sender=RoutingIdentity)
@receiver(post_save, sender=Account)
@receiver(post_save, sender=Proxy)
def pool_edited(sender, instance, **kwargs) -> None:
    pool_changed.send(sender=sender)


@receiver(m2m_changed, sender=AccountGroup.accounts.through)
def group_joined(sender, action: str, **kwargs) -> None:
    if action == "post_add":
        pool_changed.send(sender=AccountGroup)
