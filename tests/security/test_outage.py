"""A database that goes away is a clean, retryable 503 in the one error
shape on every API, never a 500 (the drill in tests/drills does it for real)."""

import pytest
from django.db import InterfaceError, OperationalError

from routing import completions
from routing.selectors import dispatch as reads
from routing.selectors import operator as operator_reads
from tests.factories import AccountFactory, ApiKeyFactory
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db


@pytest.fixture
def gw():
    AccountFactory()
    return Gateway(ApiKeyFactory().plaintext)


def assert_503(response):
    assert response.status_code == 503, response.content
    assert response.json() == {"error": {"type": "api_error", "message": "the database is unavailable; retry shortly"}}
    assert response["Retry-After"] == "1"


@pytest.mark.parametrize("error", [OperationalError("server closed the connection"), InterfaceError("closed")])
def test_dispatch_and_explain_answer_503(gw, monkeypatch, error):
    def down(*args, **kwargs):
        raise error

    monkeypatch.setattr(reads, "read", down)
    assert_503(gw.dispatch())
    assert_503(gw.explain())


def test_complete_answers_503(gw, monkeypatch):
    lease = gw.dispatch().json()["lease_id"]

    def down(*args, **kwargs):
        raise OperationalError("terminating connection due to administrator command")

    monkeypatch.setattr(completions, "lease_complete", down)
    assert_503(gw.complete(lease, outcome="success"))


def test_the_operator_api_answers_503(operator_api, monkeypatch):
    def down(*args, **kwargs):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(operator_reads, "account_operator_list", down)
    assert_503(operator_api.get("/api/v1/admin/accounts/"))
