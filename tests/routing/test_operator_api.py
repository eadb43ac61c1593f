"""The operator API for the decision's state: /api/v1/admin/bindings/ and /api/v1/admin/latency/."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import Account
from routing.models import LatencySnapshot, SessionBinding
from tests.factories import (
    AccountFactory,
    ApiKeyFactory,
    LatencySampleFactory,
    ProxyFactory,
    SessionBindingFactory,
    latency_snapshot_create,
)

pytestmark = pytest.mark.django_db

BASE = "/api/v1/admin"

ENDPOINTS = [
    ("get", "/bindings/"),
    ("delete", "/bindings/1/"),
    ("get", "/latency/"),
    ("post", "/latency/refresh/"),
]


def assert_error(response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.content
    assert response.json()["error"]["type"] == error_type
    return response.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_only_staff_may_call(django_user_model, method, path):
    assert_error(getattr(APIClient(), method)(BASE + path), 401, "authentication_error")
    gateway = APIClient()
    gateway.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiKeyFactory().plaintext}")
    assert_error(getattr(gateway, method)(BASE + path), 401, "authentication_error")
    user = django_user_model.objects.create_user(username="viewer", password="pw")
    member = APIClient()
    member.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    assert_error(getattr(member, method)(BASE + path), 403, "permission_error")
    assert not LatencySnapshot.objects.exists()


# --- bindings -------------------------------------------------------------------------------


@pytest.fixture
def bindings():
    now = timezone.now()
    first, second = AccountFactory(name="first"), AccountFactory(name="second")
    key_a, key_b = ApiKeyFactory(name="key-a"), ApiKeyFactory(name="key-b")
    rows = {
        "a1": SessionBindingFactory(api_key=key_a, account=first, session_id="a1", updated_at=now - timedelta(3)),
        "a2": SessionBindingFactory(api_key=key_a, account=second, session_id="a2", updated_at=now - timedelta(2)),
        "b1": SessionBindingFactory(api_key=key_b, account=first, session_id="b1", updated_at=now - timedelta(1)),
        "gone": SessionBindingFactory(
            api_key=key_b,
            account=first,
            session_id="gone",
            updated_at=now - timedelta(hours=7),
            expires_at=now - timedelta(hours=1),
        ),
    }
    return rows, key_a, key_b


def test_bindings_list_live_ones_newest_first(operator_api, bindings):
    rows, key_a, _ = bindings
    response = operator_api.get(f"{BASE}/bindings/")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    assert [row["session_id"] for row in body["results"]] == ["b1", "a2", "a1"]  # the expired one is not there
    first = body["results"][-1]
    assert first == {
        "id": rows["a1"].pk,
        "key": key_a.pk,
        "key_name": "key-a",
        "session_id": "a1",
        "account": "first",
        "created_at": first["created_at"],
        "updated_at": first["updated_at"],
        "expires_at": first["expires_at"],
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?account=first", ["b1", "a1"]),
        ("?key={a}", ["a2", "a1"]),
        ("?account=first&key={b}", ["b1"]),
        ("?account=nobody", []),
    ],
)
def test_bindings_filter_by_account_and_key(operator_api, bindings, query, expected):
    _, key_a, key_b = bindings
    response = operator_api.get(f"{BASE}/bindings/" + query.format(a=key_a.pk, b=key_b.pk))
    assert [row["session_id"] for row in response.json()["results"]] == expected


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?key=key-a", "key"),
        ("?key=1.0", "key"),
        ("?key=0", "key"),
        ("?key=1&key=2", "key"),
        ("?account=", "account"),
        ("?account=first&account=second", "account"),
        ("?offset=abc", "offset"),
        ("?offset=null&offset=null", "offset"),
        ("?offset=-1", "offset"),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=2.5", "limit"),
    ],
)
def test_bindings_bad_filter_or_page_is_400(operator_api, bindings, query, field):
    """What the schema refuses is refused, not read as a default: DRF alone
    took ``offset=abc`` for 0 and ``limit=5000`` for the maximum."""
    assert field in assert_error(operator_api.get(f"{BASE}/bindings/{query}"), 400, "invalid_request_error")


def test_bindings_page_bounds_are_accepted(operator_api, bindings):
    assert len(operator_api.get(f"{BASE}/bindings/?limit=1000&offset=0").json()["results"]) == 3
    assert operator_api.get(f"{BASE}/bindings/?limit=1&offset=5").json()["results"] == []


def test_bindings_are_paginated(operator_api, bindings):
    page = operator_api.get(f"{BASE}/bindings/?limit=2").json()
    assert (page["count"], len(page["results"])) == (3, 2)
    assert page["next"] is not None
    rest = operator_api.get(page["next"]).json()
    assert [row["session_id"] for row in rest["results"]] == ["a1"]


def test_bindings_list_takes_a_fixed_number_of_queries(operator_api, bindings):
    with CaptureQueriesContext(connection) as few:
        operator_api.get(f"{BASE}/bindings/")
    for _ in range(10):
        SessionBindingFactory()
    with CaptureQueriesContext(connection) as many:
        operator_api.get(f"{BASE}/bindings/")
    assert len(many) == len(few)


def test_unbind_one_session(operator_api, bindings):
    rows, _, _ = bindings
    first = Account.objects.get(name="first")
    assert first.binding_rows == 3
    assert operator_api.delete(f"{BASE}/bindings/{rows['a1'].pk}/").status_code == 204
    assert not SessionBinding.objects.filter(pk=rows["a1"].pk).exists()
    first.refresh_from_db()
    assert first.binding_rows == 2  # the trigger kept the count
    assert_error(operator_api.delete(f"{BASE}/bindings/{rows['a1'].pk}/"), 404, "not_found_error")
    # An expired binding is already gone as far as every read is concerned.
    assert_error(operator_api.delete(f"{BASE}/bindings/{rows['gone'].pk}/"), 404, "not_found_error")


# --- latency --------------------------------------------------------------------------------------


def test_latency_before_any_snapshot(operator_api):
    response = operator_api.get(f"{BASE}/latency/")
    assert response.status_code == 200
    assert response.json() == {
        "generated_at": None,
        "window_seconds": None,
        "samples": 0,
        "global_avg_first_token_ms": None,
        "accounts": [],
        "proxies": [],
    }


def test_latency_refresh_builds_and_returns_the_snapshot(operator_api):
    proxy = ProxyFactory(url="http://p1:3128")
    fast, slow = AccountFactory(name="fast", proxy=proxy), AccountFactory(name="slow")
    now = timezone.now()
    for ms in (100.0, 300.0):
        LatencySampleFactory(account=fast, proxy_url=proxy.url, first_token_ms=ms)
    LatencySampleFactory(account=slow, first_token_ms=800.0)
    LatencySampleFactory(account=slow, first_token_ms=5000.0, recorded_at=now - timedelta(hours=2))  # out of window

    response = operator_api.post(f"{BASE}/latency/refresh/")
    assert response.status_code == 200
    body = response.json()
    assert body["samples"] == 3
    assert body["window_seconds"] == 3600
    assert body["global_avg_first_token_ms"] == pytest.approx(400.0)
    assert body["accounts"] == [
        {"account": "fast", "samples": 2, "avg_first_token_ms": 200.0},
        {"account": "slow", "samples": 1, "avg_first_token_ms": 800.0},
    ]
    assert body["proxies"] == [{"proxy_url": "http://p1:3128", "samples": 2, "avg_first_token_ms": 200.0}]
    assert LatencySnapshot.objects.count() == 1
    assert operator_api.get(f"{BASE}/latency/").json() == body


def test_latency_get_returns_the_newest(operator_api):
    AccountFactory(name="x")
    now = timezone.now()
    latency_snapshot_create(generated_at=now - timedelta(minutes=1), window_seconds=3600, global_avg_ms=9.0)
    latency_snapshot_create(
        generated_at=now, window_seconds=3600, global_avg_ms=5.0, sample_count=2, accounts={"x": [2, 5.0]}
    )
    body = operator_api.get(f"{BASE}/latency/").json()
    assert body["global_avg_first_token_ms"] == 5.0
    assert body["accounts"] == [{"account": "x", "samples": 2, "avg_first_token_ms": 5.0}]


def test_latency_refresh_only_posts(operator_api):
    assert_error(operator_api.get(f"{BASE}/latency/refresh/"), 405, "invalid_request_error")
    assert_error(operator_api.post(f"{BASE}/latency/"), 405, "invalid_request_error")
