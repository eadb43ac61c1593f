"""The asyncio client against a real kiropool: the same loop as the sync one,
and a lease that completes even when its task is cancelled (once, or again
while it completes). Each scenario runs in its own event loop; the database
is read after the loop ends (Django's ORM is sync-only)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from kiropool_client import AsyncKiropoolClient, UpstreamRateLimited, UpstreamRetryNext, aio

from routing.models import Lease
from tests.client.conftest import open_leases, run_async, seed_pool

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pool():
    return seed_pool("async")


def test_async_failover_sticks_the_session_to_the_account_that_served(kiropool_url, pool):
    async def scenario():
        attempts = []

        async def call(lease):
            attempts.append(lease.account.name)
            await asyncio.sleep(0)
            if len(attempts) == 1:
                raise UpstreamRetryNext("upstream 503")
            lease.first_token()
            return lease.account.name

        async with AsyncKiropoolClient(kiropool_url, pool.key) as client:
            served = await client.call_with_failover(call, session_id="conv-a", attempts=2)
            async with client.lease(session_id="conv-a") as again:
                pass
        return attempts, served, again

    attempts, served, again = run_async(scenario)
    assert attempts[1] == served != attempts[0]
    assert again.account.name == served and again.dispatched.session == "sticky"
    assert dict(Lease.objects.filter(session_id="conv-a").values_list("account_name", "outcome")) == {
        attempts[0]: "retry_next",
        served: "success",
    }
    assert open_leases() == []


def test_async_exception_maps_to_rate_limited(kiropool_url, pool):
    async def scenario():
        async with AsyncKiropoolClient(kiropool_url, pool.key) as client:
            with pytest.raises(UpstreamRateLimited):
                async with client.lease() as lease:
                    raise UpstreamRateLimited("upstream 429", retry_after=30, proxy_failure=False)
        return lease

    lease = run_async(scenario)
    assert lease.completed.outcome == "rate_limited"
    assert Lease.objects.get().outcome == "rate_limited" and open_leases() == []


def test_a_cancelled_task_completes_its_lease(kiropool_url, pool):
    async def scenario():
        async with AsyncKiropoolClient(kiropool_url, pool.key) as client:
            entered = asyncio.Event()

            async def call():
                async with client.lease(session_id="conv-cancel"):
                    entered.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(call())
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run_async(scenario)
    lease = Lease.objects.get()
    assert lease.outcome == "fatal" and lease.error_message == "CancelledError"
    assert open_leases() == []


class SlowCompletions(httpx.AsyncBaseTransport):
    """The real transport; a completion is held back a moment before it is sent."""

    def __init__(self, delay: float) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.delay = delay
        self.completing = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/complete"):
            self.completing.set()
            await asyncio.sleep(self.delay)
        return await self.inner.handle_async_request(request)


def test_a_task_cancelled_again_while_completing_still_completes_in_the_background(kiropool_url, pool):
    async def scenario():
        transport = SlowCompletions(delay=0.3)
        async with AsyncKiropoolClient(kiropool_url, pool.key, transport=transport) as client:
            entered = asyncio.Event()

            async def call():
                async with client.lease():
                    entered.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(call())
            await entered.wait()
            task.cancel()
            await transport.completing.wait()
            task.cancel()  # again, while the exit awaits the completion
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(aio._DETACHED) == 1  # the completion outlived the task...
            for _ in range(200):
                if not aio._DETACHED:
                    break
                await asyncio.sleep(0.05)
            assert not aio._DETACHED  # ...and ran to its end

    run_async(scenario)
    assert Lease.objects.get().outcome == "fatal" and open_leases() == []
