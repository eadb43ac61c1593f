import json

import pytest
from django.test import Client


def test_unknown_api_path_answers_in_the_error_shape(db):
    response = Client().get("/api/v1/nowhere")
    assert response.status_code == 404
    assert response.json() == {"error": {"type": "not_found_error", "message": "no such endpoint"}}


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
