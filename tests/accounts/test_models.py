"""What must never be false is enforced by the database itself."""

import pytest
from django.db import IntegrityError, transaction
from django.db.models import F

from accounts.models import Account, ApiKey, RoutingIdentity
from routing.models import Lease, SessionBinding
from tests.factories import (
    AccountFactory,
    ApiKeyFactory,
    LeaseFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
)

pytestmark = pytest.mark.django_db


def violates(make) -> bool:
    try:
        with transaction.atomic():
            make()
    except IntegrityError:
        return True
    return False


def test_names_are_unique():
    identity = RoutingIdentityFactory(name="alpha")
    AccountFactory(name="a1", identity=identity)
    ProxyFactory(name="p1", url="http://p1")
    assert violates(lambda: RoutingIdentity.objects.create(name="alpha"))
    assert violates(lambda: Account.objects.create(name="a1", identity=identity))
    assert violates(lambda: ProxyFactory(name="p1"))
    assert violates(lambda: ProxyFactory(url="http://p1"))


@pytest.mark.parametrize(
    "fields",
    [{"max_concurrency": 0}, {"in_flight": -1}],
)
def test_identity_limits(fields):
    identity = RoutingIdentityFactory()
    assert violates(lambda: RoutingIdentity.objects.filter(pk=identity.pk).update(**fields))


def test_identity_interval_cannot_go_negative():
    identity = RoutingIdentityFactory(min_start_interval_ms=0)
    assert violates(
        lambda: RoutingIdentity.objects.filter(pk=identity.pk).update(
            min_start_interval_ms=F("min_start_interval_ms") - 1
        )
    )


def test_pool_and_strategy_values_are_known():
    account = AccountFactory()
    key = ApiKeyFactory()
    assert violates(lambda: Account.objects.filter(pk=account.pk).update(pool="cheapest"))
    assert violates(lambda: ApiKey.objects.filter(pk=key.pk).update(preferred_pool="cheapest"))
    assert violates(lambda: ApiKey.objects.filter(pk=key.pk).update(route_strategy="random"))


def test_fixed_key_names_its_account():
    key = ApiKeyFactory()
    assert violates(lambda: ApiKey.objects.filter(pk=key.pk).update(route_strategy="fixed"))
    account = AccountFactory()
    ApiKey.objects.filter(pk=key.pk).update(route_strategy="fixed", fixed_account=account)
    assert ApiKey.objects.get(pk=key.pk).fixed_account == account


def test_key_limits():
    key = ApiKeyFactory()
    assert violates(lambda: ApiKey.objects.filter(pk=key.pk).update(max_concurrency=0))
    ApiKey.objects.filter(pk=key.pk).update(max_concurrency=None)


def test_one_binding_per_key_and_session():
    binding = SessionBindingFactory(session_id="s-1")
    assert violates(lambda: SessionBindingFactory(api_key=binding.api_key, session_id="s-1"))
    # the same session id under another key is another binding
    SessionBindingFactory(session_id="s-1")


def test_completed_lease_has_known_outcome():
    lease = LeaseFactory()
    assert violates(lambda: Lease.objects.filter(pk=lease.pk).update(outcome="maybe"))
    assert violates(lambda: Lease.objects.filter(pk=lease.pk).update(outcome="success"))  # not completed


class TestBindingRowsCount:
    """The per-account binding count is kept by triggers, whatever writes."""

    def counts(self, *accounts):
        return [Account.objects.get(pk=a.pk).binding_rows for a in accounts]

    def test_insert_move_delete(self):
        a, b = AccountFactory(), AccountFactory()
        first = SessionBindingFactory(account=a)
        SessionBindingFactory(account=a)
        assert self.counts(a, b) == [2, 0]
        SessionBinding.objects.filter(pk=first.pk).update(account=b)
        assert self.counts(a, b) == [1, 1]
        SessionBinding.objects.filter(pk=first.pk).update(session_id="renamed")
        assert self.counts(a, b) == [1, 1]
        SessionBinding.objects.all().delete()
        assert self.counts(a, b) == [0, 0]

    def test_cascade_from_deleted_key(self):
        a = AccountFactory()
        key = ApiKeyFactory()
        SessionBindingFactory.create_batch(3, account=a, api_key=key)
        SessionBindingFactory(account=a)
        key.delete()
        assert self.counts(a) == [1]


class TestAccountRowsCount:
    """The per-identity account count (its aliases) is kept by triggers,
    whatever writes: the dispatch read asks it which identities have aliases."""

    def counts(self, *identities):
        return [RoutingIdentity.objects.get(pk=i.pk).account_rows for i in identities]

    def test_insert_move_delete(self):
        one, two = RoutingIdentityFactory(), RoutingIdentityFactory()
        first = AccountFactory(identity=one)
        AccountFactory(identity=one)
        assert self.counts(one, two) == [2, 0]
        Account.objects.filter(pk=first.pk).update(identity=two)
        assert self.counts(one, two) == [1, 1]
        Account.objects.filter(pk=first.pk).update(name="renamed", identity=two)
        assert self.counts(one, two) == [1, 1]
        Account.objects.all().delete()
        assert self.counts(one, two) == [0, 0]

    def test_bulk_create_and_a_save_through_the_model(self):
        identity = RoutingIdentityFactory()
        Account.objects.bulk_create(
            [Account(name=f"bulk-{i}", identity=identity, credentials={"access_token": "t"}) for i in range(3)]
        )
        account = Account.objects.get(name="bulk-0")
        account.save()  # a whole-row save does not count the account twice
        assert self.counts(identity) == [3]
