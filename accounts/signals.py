"""A key saved or deleted through the ORM (admin, operator API, services,
the shell) is forgotten by this process's key cache at once, so an operator
who disables a key sees it refused on the next request the process serves.
Other processes notice within ``KIROPOOL_KEY_CACHE_SECONDS``."""

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from accounts.authentication import key_cache
from accounts.models import ApiKey


@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def api_key_forget(sender, instance: ApiKey, **kwargs) -> None:
    key_cache.forget(instance.prefix)
    # And once committed: a request in between may have cached the old row.
    transaction.on_commit(lambda: key_cache.forget(instance.prefix))
