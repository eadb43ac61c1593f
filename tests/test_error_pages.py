import json

from django.test import Client


def test_unknown_api_path_answers_in_the_error_shape(db):
    response = Client().get("/api/v1/nowhere")
    assert response.status_code == 404
    assert response.json() == {"error": {"type": "not_found_error", "message": "no such endpoint"}}


def test_unknown_page_outside_the_api_is_html(db):
    response = Client().get("/nowhere")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_crash_under_the_api_answers_in_the_error_shape(rf):
    from kiropool.views import server_error

    response = server_error(rf.get("/api/v1/dispatch"))
    assert response.status_code == 500
    assert json.loads(response.content)["error"]["type"] == "api_error"
