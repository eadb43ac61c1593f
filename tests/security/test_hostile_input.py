"""Regressions of what the schemathesis run (tests/fuzz) and hand-made
hostile requests found: every answer under /api/ is JSON in the one error
shape, NUL characters never reach PostgreSQL, and the schema says what the
server accepts."""

import json

import pytest
from django.urls import reverse

from tests.factories import AccountFactory, ApiKeyFactory
from tests.routing.gateway import Gateway

pytestmark = pytest.mark.django_db


def assert_error(response, status, kind):
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["type"] == kind


@pytest.fixture
def gw():
    AccountFactory()
    return Gateway(ApiKeyFactory().plaintext)


@pytest.mark.parametrize(
    "path",
    ["/api/v1/leases/not-a-uuid/complete", "/api/v1/nowhere", "/api/v1/admin/bindings/0.5/", "/api/unknown"],
)
def test_unrouted_api_paths_are_json_404(gw, path):
    assert_error(gw.client.post(path, {}, format="json"), 404, "not_found_error")


def test_pages_keep_their_html_404(staff_client):
    response = staff_client.get("/dashboard/nowhere/at/all")
    assert response.status_code == 404 and "text/html" in response["Content-Type"]


@pytest.mark.parametrize(
    "path",
    ["/api/v1/admin/accounts/a%00b/", "/api/v1/admin/bindings/?account=a%00b", "/admin/accounts/account/?q=%00"],
)
def test_nul_in_the_url_is_400_not_a_database_error(staff_client, path):
    assert_error(staff_client.get(path), 400, "invalid_request_error")


@pytest.mark.parametrize("field", ["session_id", "model", "exclude_accounts"])
@pytest.mark.parametrize("value", ["a\x00b", "\ud800"])
def test_nul_and_lone_surrogates_in_the_body_are_400(gw, field, value):
    body = {field: [value] if field == "exclude_accounts" else value}
    raw = json.dumps(body)  # ASCII-escaped, as a hostile client would send it
    for path in ("/api/v1/dispatch", "/api/v1/dispatch/explain"):
        assert_error(gw.client.post(path, raw, content_type="application/json"), 400, "invalid_request_error")


def test_creating_a_proxy_sends_no_location_header(operator_api):
    # DRF would copy the proxy's "url" field into Location; with control
    # characters in it a WSGI server refuses the response (gunicorn: a 500).
    response = operator_api.post("/api/v1/admin/proxies/", {"name": "p", "url": "http://p\x0b\x07:1"}, format="json")
    assert response.status_code == 201
    assert "Location" not in response


def test_blank_excluded_names_and_512_character_sessions_are_accepted(gw):
    assert gw.dispatch(exclude_accounts=["", "  "], session_id="s" * 512).status_code == 200
    assert_error(gw.dispatch(session_id="s" * 513), 400, "invalid_request_error")


def test_the_schema_documents_those_bounds(client):
    schema = client.get(reverse("schema"), {"format": "json"}).json()
    components = schema["components"]["schemas"]
    dispatch = schema["paths"]["/api/v1/dispatch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = components[dispatch["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert body["session_id"]["maxLength"] == 512
    assert body["exclude_accounts"]["maxItems"] == 256 and "minLength" not in body["exclude_accounts"]["items"]
    latency = schema["paths"]["/api/v1/admin/latency/"]["get"]["responses"]["200"]["content"]["application/json"]
    assert latency["schema"]["$ref"].endswith("/LatencySnapshot")  # one object, not an array
    explain = schema["paths"]["/api/v1/dispatch/explain"]["post"]["responses"]
    assert {"429", "503"} <= set(explain)
    account = components["AccountOutput"]  # dispatch's account: credentials only for keys allowed them
    assert "credentials" in account["properties"] and "credentials" not in account["required"]
