"""A real LiteLLM Router picking its deployments through a real kiropool.

Deployments answer with LiteLLM's own mock responses (``mock_response``,
``mock_delay``), so nothing leaves the machine; a guard fails the test if
anything tries to connect anywhere but loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from accounts.models import Account, ApiKey, RoutingIdentity
from routing.models import LatencySample, Lease, SessionBinding
from tests.client.conftest import open_leases, run_async, seed_pool
from tests.factories import SessionBindingFactory

litellm = pytest.importorskip("litellm")
from kiropool_client.litellm import KiropoolRouting  # noqa: E402
from litellm import Router  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "claude"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection attempt to a non-loopback address (or name) is refused and noted."""
    escapes: list[object] = []
    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def local(host) -> bool:
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return host == "localhost"

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            escapes.append(address)
            raise OSError(f"test network guard: refused {address}")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):
            escapes.append(address)
            return 111  # ECONNREFUSED
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not local(host if isinstance(host, str) else host.decode()):
            escapes.append(host)
            raise socket.gaierror(f"test network guard: refused to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert escapes == [], f"something tried to leave the machine: {escapes}"


def make_router(accounts: list[str], *, num_retries: int = 0, params: dict[str, dict] | None = None) -> Router:
    model_list = [
        {
            "model_name": MODEL,
            "litellm_params": {
                "model": f"openai/kiro-{account}",
                "api_key": "sk-not-used",
                "mock_response": f"served by {account}",
                **(params or {}).get(account, {}),
            },
            "model_info": {"id": f"deployment-{account}", "kiropool_account": account},
        }
        for account in accounts
    ]
    return Router(model_list=model_list, num_retries=num_retries, retry_after=0, disable_cooldowns=True)


@pytest.fixture
def routed(kiropool_url):
    """(pool, router, routing) for a pool of three identities, one deployment each."""
    created = []

    def build(pool=None, *, accounts=None, **router_options):
        pool = pool or seed_pool("llm", identities=3)
        router = make_router(accounts or pool.accounts, **router_options)
        routing = KiropoolRouting.install(router, kiropool_url, pool.key, max_wait_ms=0)
        created.append(routing)
        return pool, router, routing

    yield build
    for routing in created:
        routing.close()


def settle(routing: KiropoolRouting, timeout: float = 15.0) -> None:
    """Wait for LiteLLM's callbacks (run after the call returns) to complete every lease."""
    deadline = time.monotonic() + timeout
    while routing.open_leases():
        assert time.monotonic() < deadline, f"leases left open: {routing.open_leases()}"
        time.sleep(0.02)


async def asettle(routing: KiropoolRouting, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while routing.open_leases():
        assert time.monotonic() < deadline, f"leases left open: {routing.open_leases()}"
        await asyncio.sleep(0.02)


def served_by(response) -> str:
    return response.choices[0].message.content.removeprefix("served by ")


def test_a_session_stays_on_its_account(routed):
    pool, router, routing = routed()
    served = []
    for _ in range(4):
        response = router.completion(model=MODEL, messages=MESSAGES, metadata={"session_id": "conv-1"})
        settle(routing)
        served.append(served_by(response))
    assert len(set(served)) == 1
    leases = list(Lease.objects.order_by("started_at").values_list("account_name", "session_id", "outcome"))
    assert leases == [(served[0], "conv-1", "success")] * 4
    assert SessionBinding.objects.get(session_id="conv-1").account.name == served[0]
    assert open_leases() == []


def test_new_sessions_spread_over_identities_and_report_litellms_latency(routed):
    pool = seed_pool("llm", identities=3)
    _, router, routing = routed(pool, params={account: {"mock_delay": 0.2} for account in pool.accounts})

    async def scenario():
        served = []
        for session in ("conv-a", "conv-b", "conv-c"):
            response = await router.acompletion(model=MODEL, messages=MESSAGES, metadata={"session_id": session})
            await asettle(routing)
            served.append(served_by(response))
        return served

    served = run_async(scenario)
    identities = {RoutingIdentity.objects.get(accounts__name=name).name for name in served}
    assert identities == set(pool.identities)
    # The first-token latency is LiteLLM's own measure of the (mock) call:
    # at least its 200 ms delay (slack: a busy machine only adds).
    samples = list(LatencySample.objects.values_list("first_token_ms", flat=True))
    assert len(samples) == 3 and min(samples) >= 200
    assert open_leases() == []


def rate_limit(retry_after: str) -> Exception:
    request = httpx.Request("POST", "https://upstream.invalid/v1/chat/completions")
    response = httpx.Response(429, headers={"retry-after": retry_after}, request=request)
    return litellm.RateLimitError(
        message="upstream says slow down", llm_provider="openai", model="kiro", response=response
    )


def test_a_mocked_429_cools_the_identity_in_kiropool(routed):
    pool, router, routing = routed()
    with pytest.raises(litellm.RateLimitError):
        router.completion(model=MODEL, messages=MESSAGES, mock_response=rate_limit("120"))
    settle(routing)
    lease = Lease.objects.get()
    assert lease.outcome == "rate_limited"
    identity = RoutingIdentity.objects.get(name=lease.identity.name)
    # Retry-After: 120 became the identity's cooldown (slack: 10 s for the round trip).
    assert timedelta(seconds=110) < identity.cooldown_until - timezone.now() <= timedelta(seconds=120)

    # The cooled identity is not picked again while it cools.
    others = set()
    for _ in range(4):
        others.add(served_by(router.completion(model=MODEL, messages=MESSAGES)))
        settle(routing)
    assert lease.account_name not in others and len(others) == 2
    assert open_leases() == []


def test_an_upstream_error_is_retried_on_another_account(routed):
    pool = seed_pool("llm", identities=3)
    broken = pool.accounts[0]
    # The session is bound to the broken account, so kiropool picks it first.
    SessionBindingFactory(api_key=ApiKey.objects.get(), session_id="conv-x", account=Account.objects.get(name=broken))
    _, router, routing = routed(pool, num_retries=2, params={broken: {"mock_response": "litellm.InternalServerError"}})

    async def scenario():
        response = await router.acompletion(model=MODEL, messages=MESSAGES, metadata={"session_id": "conv-x"})
        await asettle(routing)
        return served_by(response)

    served = run_async(scenario)
    assert served != broken
    outcomes = list(Lease.objects.order_by("started_at").values_list("account_name", "outcome"))
    assert outcomes == [(broken, "retry_next"), (served, "success")]
    # The session moved to the account that served it.
    assert SessionBinding.objects.get(session_id="conv-x").account.name == served
    assert open_leases() == []


def test_kiropool_refusals_reach_the_caller_as_litellm_errors(routed):
    pool = seed_pool("solo", identities=1)
    RoutingIdentity.objects.update(cooldown_until=timezone.now() + timedelta(seconds=30))
    _, router, routing = routed(pool)
    with pytest.raises(litellm.RateLimitError) as caught:
        router.completion(model=MODEL, messages=MESSAGES)
    assert 1 <= int(caught.value.headers["retry-after"]) <= 30
    assert "every candidate account is cooling down" in str(caught.value)

    RoutingIdentity.objects.update(cooldown_until=None)
    Account.objects.update(enabled=False)
    with pytest.raises(litellm.ServiceUnavailableError):
        router.completion(model=MODEL, messages=MESSAGES)
    assert Lease.objects.count() == 0


def test_an_account_without_a_deployment_is_released_and_skipped(routed):
    pool = seed_pool("llm", identities=3)
    unmapped = pool.accounts[2]
    # The session is bound to the account the Router has no deployment for.
    SessionBindingFactory(api_key=ApiKey.objects.get(), session_id="conv-u", account=Account.objects.get(name=unmapped))
    _, router, routing = routed(pool, accounts=pool.accounts[:2])
    served = served_by(router.completion(model=MODEL, messages=MESSAGES, metadata={"session_id": "conv-u"}))
    settle(routing)
    assert served in pool.accounts[:2]
    outcomes = dict(Lease.objects.values_list("account_name", "outcome"))
    assert outcomes == {unmapped: "retry_next", served: "success"}
    assert open_leases() == []


def test_releasing_an_account_without_a_deployment_does_not_eject_its_identity(routed):
    # The README allows a key wider than the Router ("scope the key to the
    # Router's accounts to save the round trip"): the pick releases such an
    # account at once, as `retry_next` abandoned: nothing was sent to it, and
    # five plain `retry_next`s would eject the identity from the pool, for
    # every key and gateway.
    pool = seed_pool("llm", identities=3)
    unmapped = pool.accounts[2]
    _, router, routing = routed(pool, accounts=pool.accounts[:2])
    released = Lease.objects.filter(account_name=unmapped)
    for turn in range(10):
        if released.count() == 5:
            break
        # A new session each time: key 3 sends it to the identity with the
        # fewest bound sessions, and the unmapped one never gets any.
        router.completion(model=MODEL, messages=MESSAGES, metadata={"session_id": f"conv-{turn}"})
        settle(routing)
    assert list(released.values_list("outcome", flat=True)) == ["retry_next"] * 5
    assert RoutingIdentity.objects.get(name=unmapped).ejected_until is None


def test_close_releases_the_leases_no_callback_completed(routed):
    pool, router, routing = routed()
    deployment = routing.get_available_deployment(MODEL, MESSAGES, request_kwargs={"metadata": {}})
    assert deployment["model_info"]["kiropool_account"] in pool.accounts
    assert len(open_leases()) == 1 and len(routing.open_leases()) == 1
    routing.close()
    assert open_leases() == [] and Lease.objects.get().outcome == "fatal"
