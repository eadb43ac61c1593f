"""Routing's side of an operator's edit of the pool
(``accounts.signals.pool_changed``): once the edit commits, the order rows
it left without a latency band get theirs
(``maintenance.pool_order_bands_catch_up``), so their scope's dispatches
walk the band index again at once, not after the next refresh. Robust: the
edit has committed, and a failure here only leaves the rows to that
refresh."""

from django.dispatch import receiver

from accounts.signals import pool_changed
from core.transactions import on_commit_once
from routing import maintenance


@receiver(pool_changed)
def order_bands_catch_up(sender, **kwargs) -> None:
    on_commit_once(maintenance.pool_order_bands_catch_up, robust=True)
