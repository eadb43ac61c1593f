"""Test data. Factories build valid rows with unique names; pass fields to
shape the case at hand."""

from datetime import timedelta

import factory
from django.utils import timezone

from accounts.models import Account, AccountGroup, ApiKey, Pool, Proxy, RoutingIdentity
from routing import selection
from routing.models import AccountLatency, LatencySample, LatencySnapshot, Lease, ProxyLatency, SessionBinding
from routing.pool_order import pool_order_bands_write


class RoutingIdentityFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = RoutingIdentity

    name = factory.Sequence(lambda n: f"identity-{n:03d}")


class ProxyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Proxy

    name = factory.Sequence(lambda n: f"proxy-{n:03d}")
    url = factory.Sequence(lambda n: f"http://proxy-{n:03d}.internal:3128")


class AccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Account

    name = factory.Sequence(lambda n: f"account-{n:03d}")
    identity = factory.SubFactory(RoutingIdentityFactory)
    pool = Pool.BALANCED
    credentials = factory.LazyFunction(lambda: {"refresh_token": "secret-refresh-token"})


class AccountGroupFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = AccountGroup
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"group-{n:03d}")

    @factory.post_generation
    def accounts(self, create, extracted, **kwargs):
        if create and extracted:
            self.accounts.set(extracted)


class ApiKeyFactory(factory.django.DjangoModelFactory):
    """``key.plaintext`` holds the secret of a freshly built key."""

    class Meta:
        model = ApiKey

    name = factory.Sequence(lambda n: f"key-{n:03d}")

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        key = model_class(*args, **kwargs)
        key.plaintext = key.set_new_secret()
        key.save()
        return key


class SessionBindingFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = SessionBinding

    api_key = factory.SubFactory(ApiKeyFactory)
    session_id = factory.Sequence(lambda n: f"session-{n}")
    account = factory.SubFactory(AccountFactory)
    created_at = factory.LazyFunction(timezone.now)
    updated_at = factory.LazyFunction(timezone.now)
    expires_at = factory.LazyFunction(lambda: timezone.now() + timedelta(hours=6))


class LeaseFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Lease

    account = factory.SubFactory(AccountFactory)
    account_name = factory.SelfAttribute("account.name")
    identity = factory.SelfAttribute("account.identity")
    started_at = factory.LazyFunction(timezone.now)
    expires_at = factory.LazyFunction(lambda: timezone.now() + timedelta(seconds=900))


class LatencySampleFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = LatencySample

    account = factory.SubFactory(AccountFactory)
    first_token_ms = 500.0
    recorded_at = factory.LazyFunction(timezone.now)


def latency_snapshot_create(
    *, generated_at=None, window_seconds=3600, global_avg_ms=None, sample_count=0, accounts=None, proxies=None
) -> LatencySnapshot:
    """A snapshot with its stats rows and its bands in the order table, as
    the refresh task writes them:
    ``accounts`` maps account names and ``proxies`` proxy URLs to ``(samples, avg_ms)``."""
    snapshot = LatencySnapshot.objects.create(
        generated_at=generated_at or timezone.now(),
        window_seconds=window_seconds,
        global_avg_ms=global_avg_ms,
        sample_count=sample_count,
    )
    g = global_avg_ms if global_avg_ms is not None else 0.0
    ids = dict(Account.objects.filter(name__in=list(accounts or {})).values_list("name", "id"))
    AccountLatency.objects.bulk_create(
        AccountLatency(
            snapshot=snapshot,
            account_id=ids[name],
            samples=n,
            avg_ms=avg,
            score_part=selection.account_score_part(selection.LatencyStats(n, avg), g),
        )
        for name, (n, avg) in (accounts or {}).items()
    )
    ProxyLatency.objects.bulk_create(
        ProxyLatency(
            snapshot=snapshot,
            proxy_id=url,
            samples=n,
            avg_ms=avg,
            score_part=selection.proxy_score_part(selection.LatencyStats(n, avg), g),
        )
        for url, (n, avg) in (proxies or {}).items()
    )
    pool_order_bands_write(snapshot)
    return snapshot


def api_key_admin_form(**fields: str) -> dict[str, str]:
    """The admin's add-key form, filled in as an operator would, with ``fields`` changed."""
    return {
        "name": "from-admin",
        "enabled": "on",
        "route_strategy": "auto",
        "preferred_pool": "balanced",
        "latency_routing_enabled": "on",
        "min_start_interval_ms": "0",
        "model_preferences": "{}",
        **fields,
    }
