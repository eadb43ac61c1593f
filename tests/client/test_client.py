"""The synchronous client against a real kiropool (its web server on PostgreSQL):
leases complete on every way out of the block, failover excludes what
failed, 429s are waited out, errors are typed, and only safe calls are retried."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone
from kiropool_client import (
    AllAccountsFailed,
    AuthenticationFailed,
    Conflict,
    ConnectionFailed,
    FailoverExhausted,
    InvalidRequest,
    KiropoolClient,
    NotFound,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    UpstreamFatal,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRetryNext,
)

from accounts.models import Account, RoutingIdentity
from routing.models import LatencySample, Lease
from tests.client.conftest import open_leases, seed_pool

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pool():
    return seed_pool()


@pytest.fixture
def client(kiropool_url, pool):
    with KiropoolClient(kiropool_url, pool.key) as client:
        yield client


def test_a_session_sticks_to_its_account_across_calls(client):
    served = [client.call_with_failover(lambda lease: lease.account.name, session_id="conv-1") for _ in range(4)]
    assert len(set(served)) == 1
    with client.lease(session_id="conv-1") as lease:
        assert lease.dispatched.session == "sticky" and lease.account.name == served[0]
    assert open_leases() == []


def test_success_reports_the_first_token_time_the_caller_recorded(client):
    with client.lease(session_id="conv-ft") as lease:
        time.sleep(0.05)
        lease.first_token()
    assert lease.completed.outcome == "success" and lease.completed.session_bound
    sample = LatencySample.objects.get()
    assert sample.account.name == lease.account.name
    # Slack: the 50 ms sleep is a floor; a busy machine only adds to it.
    assert sample.first_token_ms >= 50
    assert lease.first_token_ms == pytest.approx(sample.first_token_ms)

    with client.lease() as lease:
        lease.first_token_ms = 321.0
    assert sorted(LatencySample.objects.values_list("first_token_ms", flat=True))[-1] == 321.0


def test_failover_excludes_the_account_that_said_retry_next(client, pool):
    attempts = []

    def call(lease):
        attempts.append(lease.account.name)
        if len(attempts) == 1:
            raise UpstreamRetryNext("upstream 500")
        return lease.account.name

    served = client.call_with_failover(call, session_id="conv-2", attempts=3)
    assert attempts == [attempts[0], served] and served != attempts[0]
    outcomes = dict(Lease.objects.values_list("account_name", "outcome"))
    assert outcomes == {attempts[0]: "retry_next", served: "success"}
    # The session now lives on the account that served it.
    with client.lease(session_id="conv-2") as lease:
        assert lease.account.name == served and lease.dispatched.session == "sticky"
    assert open_leases() == []


def test_failover_stops_with_a_clear_error_once_every_account_failed(client, pool):
    def call(lease):
        raise UpstreamRetryNext(f"{lease.account.name} failed")

    with pytest.raises(AllAccountsFailed) as caught:
        client.call_with_failover(call, attempts=5)
    assert caught.value.status_code == 502 and caught.value.type == "api_error"
    assert "all eligible accounts failed" in caught.value.message
    assert Lease.objects.filter(outcome="retry_next").count() == len(pool.accounts)
    assert open_leases() == []


def test_failover_gives_up_after_its_attempts(client):
    def call(lease):
        raise UpstreamRetryNext("upstream 500")

    with pytest.raises(FailoverExhausted) as caught:
        client.call_with_failover(call, attempts=1)
    assert len(caught.value.tried) == 1 and isinstance(caught.value.__cause__, UpstreamRetryNext)
    assert open_leases() == []


def test_a_fatal_upstream_error_is_not_retried_elsewhere(client):
    calls = []

    def call(lease):
        calls.append(lease.account.name)
        raise UpstreamFatal("the prompt is invalid")

    with pytest.raises(UpstreamFatal):
        client.call_with_failover(call, attempts=3)
    assert len(calls) == 1
    assert Lease.objects.get().outcome == "fatal"


class Recorder(httpx.BaseTransport):
    """The real transport, noting when each answer came and what it said."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.answers: list[tuple[float, str, int, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.answers.append(
            (time.monotonic(), request.url.path, response.status_code, response.headers.get("retry-after"))
        )
        return response


def test_call_with_failover_waits_out_a_429_as_retry_after_says(kiropool_url):
    pool = seed_pool("lonely", identities=1)
    transport = Recorder()
    with KiropoolClient(kiropool_url, pool.key, transport=transport) as client:
        with pytest.raises(UpstreamRateLimited), client.lease():
            raise UpstreamRateLimited("upstream 429", retry_after=2)
        served = client.call_with_failover(lambda lease: lease.account.name, attempts=3, max_wait_ms=0)
    assert served == pool.accounts[0]
    dispatches = [
        (at, status, retry_after) for at, path, status, retry_after in transport.answers if "dispatch" in path
    ]
    # The only identity cools for 2 s: kiropool answers 429 with a Retry-After
    # (whole seconds, rounded up), the client sleeps that long, then is served.
    (refused_at, status, retry_after), (served_at, final, _) = dispatches[-2:]
    assert (status, final) == (429, 200) and int(retry_after) >= 1
    assert served_at - refused_at >= int(retry_after)
    assert open_leases() == []


def test_a_429_of_dispatch_is_typed_with_its_retry_after(kiropool_url):
    pool = seed_pool("cool", identities=1)
    with KiropoolClient(kiropool_url, pool.key) as client:
        with pytest.raises(UpstreamRateLimited), client.lease():
            raise UpstreamRateLimited("upstream 429", retry_after=60)
        with pytest.raises(RateLimited) as caught:
            client.dispatch(max_wait_ms=0)
    assert caught.value.type == "rate_limit_error" and 55 <= caught.value.retry_after <= 60


def test_exceptions_map_to_outcomes_and_no_lease_is_left_open(client, pool):
    with pytest.raises(UpstreamRateLimited), client.lease() as lease:
        raise UpstreamRateLimited("upstream 429", retry_after=120)
    identity = RoutingIdentity.objects.get(name=lease.account.routing_identity)
    # Slack: 10 s between the completion and this read.
    assert timedelta(seconds=110) < identity.cooldown_until - timezone.now() <= timedelta(seconds=120)

    with pytest.raises(UpstreamQuotaExhausted), client.lease() as lease:
        raise UpstreamQuotaExhausted("no credits left", remaining_credits=0)
    assert Account.objects.get(name=lease.account.name).quota_exhausted

    Account.objects.update(quota_exhausted=False)
    RoutingIdentity.objects.update(cooldown_until=None)
    with pytest.raises(ZeroDivisionError), client.lease():
        1 / 0  # noqa: B018 - a bug in the gateway's own code
    with pytest.raises(KeyboardInterrupt), client.lease():
        raise KeyboardInterrupt
    with pytest.raises(httpx.HTTPStatusError), client.lease():
        request = httpx.Request("POST", "https://upstream.invalid/generate")
        response = httpx.Response(429, headers={"Retry-After": "30"}, request=request)
        raise httpx.HTTPStatusError("429", request=request, response=response)

    outcomes = list(Lease.objects.order_by("started_at").values_list("outcome", "error_message"))
    assert [o for o, _ in outcomes] == ["rate_limited", "quota_exhausted", "fatal", "fatal", "rate_limited"]
    assert outcomes[2][1].startswith("ZeroDivisionError") and outcomes[3][1] == "KeyboardInterrupt"
    assert open_leases() == []


def test_requests_the_gateway_abandoned_do_not_eject_the_account(kiropool_url):
    # The client completes a block left by anything but an upstream failure (a
    # bug in the gateway, Ctrl-C, a cancelled task) as `fatal`, abandoned: five
    # plain `fatal`s in a row (KIROPOOL_EJECTION_FAILURES' default) would
    # eject the identity, for every key.
    pool = seed_pool("abandoned", identities=1)
    with KiropoolClient(kiropool_url, pool.key) as client:
        for _ in range(5):
            with pytest.raises(KeyboardInterrupt), client.lease():
                raise KeyboardInterrupt  # the caller gave up, the upstream did nothing wrong
    assert [o for (o,) in Lease.objects.values_list("outcome")] == ["fatal"] * 5
    identity = RoutingIdentity.objects.get(name=pool.identities[0])
    assert identity.ejected_until is None, "abandoned requests ejected the identity"
    with KiropoolClient(kiropool_url, pool.key) as client, client.lease(max_wait_ms=0):
        pass


def test_an_upstream_message_with_a_nul_character_still_completes_the_lease(client):
    # The error message goes to the server as the exception's text, truncated
    # to the server's 2,000 characters; but the server refuses NUL in any
    # string (400), so the completion failed, was only logged, and the lease
    # held its slot until the TTL, its failure never reported.
    with pytest.raises(UpstreamRetryNext), client.lease() as lease:
        raise UpstreamRetryNext("upstream said: \x00\x01garbled body")
    assert lease.completed is not None and lease.completed.outcome == "retry_next"
    assert open_leases() == []
    assert "\x00" not in Lease.objects.get().error_message
    # A message the caller reports itself, over the server's 2,000 characters.
    with client.lease() as lease:
        lease.report("retry_next", error_message="upstream said: " + "x" * 3000)
    assert lease.completed is not None and lease.completed.outcome == "retry_next"
    assert open_leases() == []


def test_report_completes_with_an_outcome_without_raising(client):
    with client.lease() as lease:
        lease.report("rate_limited", cooldown_seconds=5, error_message="handled upstream 429")
    assert lease.completed.outcome == "rate_limited"
    assert RoutingIdentity.objects.get(name=lease.account.routing_identity).cooldown_until is not None


def test_ctrl_c_in_a_real_process_still_completes_its_lease(kiropool_url, pool):
    script = textwrap.dedent(
        """
        import sys, time
        from kiropool_client import KiropoolClient

        with KiropoolClient(sys.argv[1], sys.argv[2]) as client, client.lease(session_id="sigint") as lease:
            print(lease.lease_id, flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, kiropool_url, pool.key],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lease_id = proc.stdout.readline().strip()
        assert lease_id, proc.stderr.read()
        assert open_leases() != []
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in stderr
    lease = Lease.objects.get(id=lease_id)
    assert lease.completed_at is not None and lease.outcome == "fatal"
    assert open_leases() == []


def test_server_errors_are_typed_with_the_servers_type_and_message(kiropool_url, client):
    with (
        KiropoolClient(kiropool_url, "kp_000000000000_not-a-key") as stranger,
        pytest.raises(AuthenticationFailed) as caught,
    ):
        stranger.dispatch()
    assert caught.value.status_code == 401 and caught.value.type == "authentication_error" and caught.value.message

    with pytest.raises(InvalidRequest) as caught:
        client.dispatch(max_wait_ms=-1)
    assert caught.value.type == "invalid_request_error" and "max_wait_ms" in caught.value.message

    with pytest.raises(NotFound):
        client.complete("00000000-0000-0000-0000-000000000000")

    dispatched = client.dispatch()
    client.complete(dispatched.lease_id)
    with pytest.raises(Conflict) as caught:
        client.complete(dispatched.lease_id, "fatal")
    assert caught.value.type == "conflict_error"
    assert Lease.objects.get(id=dispatched.lease_id).outcome == "success"


def test_no_usable_account_is_a_503_that_failover_does_not_retry(kiropool_url):
    pool = seed_pool("gone", identities=1)
    Account.objects.update(enabled=False)
    calls = []
    with KiropoolClient(kiropool_url, pool.key) as client, pytest.raises(ServiceUnavailable) as caught:
        client.call_with_failover(calls.append, attempts=3)
    assert caught.value.status_code == 503 and caught.value.retry_after is None and calls == []


class Flaky(httpx.BaseTransport):
    """The real transport to the real server, with one failure injected: before
    sending (nothing reached the server), or after it answered (the answer is lost)."""

    def __init__(self, *, fail: str, when: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.fail, self.when = fail, when
        self.sent: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request.url.path)
        if self.fail in request.url.path and self.when == "before" and len(self.sent) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        response = self.inner.handle_request(request)
        if self.fail in request.url.path and self.when == "after" and self.sent.count(request.url.path) == 1:
            response.read()
            raise httpx.ReadTimeout("timed out", request=request)
        return response


def test_a_dispatch_is_retried_after_a_connection_error(kiropool_url, pool):
    transport = Flaky(fail="/dispatch", when="before")
    client = KiropoolClient(kiropool_url, pool.key, transport=transport, retry=RetryPolicy(backoff_s=0.01))
    with client, client.lease():
        pass
    assert transport.sent[:2] == ["/api/v1/dispatch", "/api/v1/dispatch"]
    assert Lease.objects.count() == 1 and open_leases() == []


def test_a_completion_whose_answer_was_lost_is_retried_and_409_counts_as_done(kiropool_url, pool):
    transport = Flaky(fail="/complete", when="after")
    client = KiropoolClient(kiropool_url, pool.key, transport=transport, retry=RetryPolicy(backoff_s=0.01))
    with client, client.lease() as lease:
        lease.first_token_ms = 12.0
    assert [p.rsplit("/", 1)[-1] for p in transport.sent] == ["dispatch", "complete", "complete"]
    assert lease.completed is None  # acknowledged by the 409 of the retry
    assert Lease.objects.get().outcome == "success" and open_leases() == []


def test_without_a_server_the_client_gives_up_with_connection_failed(pool):
    retry = RetryPolicy(attempts=2, backoff_s=0.01, completion_deadline_s=0.2)
    with KiropoolClient("http://127.0.0.1:9", pool.key, retry=retry) as client:
        with pytest.raises(ConnectionFailed) as caught:
            client.dispatch()
        assert caught.value.type == "connection_error"
        started = time.monotonic()
        with pytest.raises(ConnectionFailed):
            client.complete("00000000-0000-0000-0000-000000000000")
        # The completion kept trying for its deadline (0.2 s), no longer (slack: 2 s).
        assert time.monotonic() - started < 2.2
