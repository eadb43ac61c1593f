"""The bench's periodic-task phases (bench/load/upkeep.py) on the test
database: each seeds its minute of work, runs the real task while another
process plays lease starts, and reports what it measured."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.db.models import Count, F
from django.utils import timezone

from accounts.models import Account
from bench.load import seed, upkeep
from routing.models import LatencySnapshot, PoolOrder, SessionBinding
from tests.factories import AccountFactory, ApiKeyFactory, SessionBindingFactory
from tests.support import test_database_url

# The seeding and the task close their connections, as the bench's do.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres_only")]


def _pool(prefix: str, accounts: int) -> list[Account]:
    return [AccountFactory(name=f"{prefix}{n}", identity__name=f"{prefix}{n}") for n in range(accounts)]


def _timed(measured: dict) -> None:
    assert measured["wall_ms"] > 0 and measured["cpu_ms"] >= 0
    assert measured["lease_start_max_ms"] > 0  # the other process moved the identity meanwhile
    if Path("/proc/self/stat").exists():
        assert measured["postgres_cpu_ms"] is not None


def test_the_refresh_is_timed_over_the_samples_it_seeded():
    _pool(seed.HISTORY_PREFIX, 3)
    AccountFactory(name="other")  # not the history pool's: gets none

    measured = upkeep.refresh_measure(samples=600, runs=2, database_url=test_database_url())

    newest = LatencySnapshot.objects.latest()
    assert newest.sample_count == 600  # every sample seeded lies in the window
    stats = newest.account_stats.values_list("account__name", "samples")
    assert sorted(stats) == [("hist-0", 200), ("hist-1", 200), ("hist-2", 200)]
    assert newest.proxy_stats.count() == 20  # two in three samples through one of 20 URLs
    assert (measured["samples"], measured["runs"]) == (600, 2)
    # The first run moved every band from none; the second found them where the first left them.
    assert measured["bands_written"] == [PoolOrder.objects.count(), 0]
    _timed(measured)


def test_the_purge_is_timed_over_the_bindings_it_expired_and_leaves_the_counters_exact():
    accounts = _pool("main-", 3)
    key, other_key = ApiKeyFactory(), ApiKeyFactory()
    earlier = timezone.now() - timedelta(minutes=1)
    for n in range(12):
        SessionBindingFactory(api_key=key, account=accounts[n % 3], created_at=earlier, updated_at=earlier)
    kept = SessionBindingFactory(api_key=other_key, account=accounts[0])

    measured = upkeep.purge_measure(key_id=key.pk, expired=5, runs=2, database_url=test_database_url())

    assert SessionBinding.objects.filter(api_key=key).count() == 12 - 2 * 5
    assert SessionBinding.objects.filter(pk=kept.pk).exists()  # another key's binding is not touched
    assert not SessionBinding.objects.filter(expires_at__lte=timezone.now()).exists()
    counted = Account.objects.annotate(n=Count("bindings")).exclude(binding_rows=F("n"))
    assert not counted.exists()
    assert (measured["expired"], measured["runs"]) == (5, 2)
    _timed(measured)
