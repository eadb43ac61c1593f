import json

import pytest
from django.test import Client


def test_unknown_api_path_answers_in_the_error_shape(db):
    response = Client().get("/api/v1/nowhere")
    assert response.status_code == 404
    assert response.json() == {"error": {"type": "not_found_error", "message": "no such endpoint"}}


LEASE = "/api/v1/leases/6f0e7a4e-8d7e-4a7e-9a55-5f2b8d1c0a11/complete"


@pytest.mark.parametrize(
    ("method", "path", "right"),
    [
        # the operator API and the description end in "/", the gateway endpoints do not (SPEC names them so)
        ("get", "/api/v1/admin/accounts", "/api/v1/admin/accounts/"),
        ("post", "/api/v1/admin/keys", "/api/v1/admin/keys/"),
        ("post", "/api/v1/admin/accounts/alice-1/reset-quota", "/api/v1/admin/accounts/alice-1/reset-quota/"),
        ("get", "/api/schema", "/api/schema/"),
        ("post", "/api/v1/dispatch/", "/api/v1/dispatch"),
        ("post", f"{LEASE}/", LEASE),
    ],
)
def test_a_path_off_by_its_trailing_slash_is_a_404_naming_the_right_one(db, method, path, right):
    # Not APPEND_SLASH's 301 with an empty HTML body: a client that follows it resends a POST without its body.
    response = getattr(Client(), method)(path, {}, content_type="application/json", HTTP_AUTHORIZATION="Token x")
    assert response.status_code == 404
    message = f"no such endpoint; did you mean {right}?"
    assert response.json() == {"error": {"type": "not_found_error", "message": message}}


def test_a_post_without_its_slash_under_debug_is_no_crash(db, settings):
    settings.DEBUG = True  # APPEND_SLASH raised a RuntimeError: it cannot redirect a POST's body
    assert Client().post("/api/v1/admin/keys", {}, content_type="application/json").status_code == 404


def test_the_paths_as_spec_writes_them_reach_their_views(db):
    # 401 for the bad key: the view answered, not a redirect or a 404.
    for path in ("/api/v1/dispatch", "/api/v1/dispatch/explain", LEASE):
        assert Client().post(path, {}, content_type="application/json").status_code == 401
    assert Client().get("/api/v1/admin/accounts/").status_code == 401


def test_outside_the_api_a_missing_slash_is_still_redirected(db):
    response = Client().get("/dashboard")
    assert response.status_code == 301 and response["Location"] == "/dashboard/"


def test_unknown_page_outside_the_api_is_html(db):
    response = Client().get("/nowhere")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_a_host_not_allowed_is_refused_in_the_error_shape_under_the_api(db):
    response = Client().get("/api/v1/dispatch", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response.json() == {"error": {"type": "invalid_request_error", "message": "bad request"}}
    page = Client().get("/dashboard/", HTTP_HOST="evil.example")
    assert page.status_code == 400 and page["Content-Type"].startswith("text/html")


def test_crash_under_the_api_answers_in_the_error_shape(rf):
    from kiropool.views import server_error

    response = server_error(rf.get("/api/v1/dispatch"))
    assert response.status_code == 500
    assert json.loads(response.content)["error"]["type"] == "api_error"


@pytest.mark.parametrize("path", ["/api/schema/", "/api/docs/"])
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_api_description_refuses_a_wrong_method_in_the_error_shape(db, path, method):
    response = getattr(Client(), method)(path)
    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
    assert response["Allow"] == "GET, HEAD, OPTIONS"
    assert response.json() == {
        "error": {"type": "invalid_request_error", "message": f'Method "{method.upper()}" not allowed.'}
    }


@pytest.mark.parametrize(
    ("path", "params", "headers", "status"),
    [
        ("/api/schema/", {"format": "xml"}, {}, 404),
        ("/api/schema/", {}, {"HTTP_ACCEPT": "text/csv"}, 406),
        ("/api/docs/", {}, {"HTTP_ACCEPT": "application/json"}, 406),
    ],
)
def test_the_api_descriptions_other_errors_are_in_the_error_shape(db, path, params, headers, status):
    response = Client().get(path, params, **headers)
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert set(response.json()["error"]) == {"type", "message"}


def test_the_api_description_still_serves_its_page_and_schema(db):
    client = Client()
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and docs["Content-Type"].startswith("text/html")
    assert client.get("/api/schema/")["Content-Type"].startswith("application/vnd.oai.openapi")
    assert client.get("/api/schema/", {"format": "json"}).json()["openapi"].startswith("3.")
    # OPTIONS describes the docs page in JSON: its HTML renderer has no template for it (a 500).
    options = client.options("/api/docs/")
    assert options.status_code == 200 and options.json()["name"]


@pytest.mark.parametrize("authorization", ["Token not-a-token", "Bearer kp_not-a-key", "Basic Og=="])
def test_the_api_description_ignores_credentials(db, authorization):
    # Open on purpose and the same for everyone: a client sending its (stale, or the gateway's) credentials
    # with every request still gets it. A bad token was a 403, where the rest of the API answers 401.
    client = Client(HTTP_AUTHORIZATION=authorization)
    assert client.get("/api/schema/", {"format": "json"}).json()["openapi"].startswith("3.")
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and docs["Content-Type"].startswith("text/html")
