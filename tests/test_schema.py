"""OpenAPI 3 at /api/schema/ and the Swagger UI at /api/docs/, served locally."""

import re

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db

OPERATOR_PATHS = [
    "/api/v1/admin/identities/",
    "/api/v1/admin/identities/{name}/",
    "/api/v1/admin/identities/{name}/clear-cooldown/",
    "/api/v1/admin/accounts/",
    "/api/v1/admin/accounts/{name}/",
    "/api/v1/admin/accounts/{name}/reset-quota/",
    "/api/v1/admin/proxies/",
    "/api/v1/admin/proxies/{name}/",
    "/api/v1/admin/proxies/{name}/clear-cooldown/",
    "/api/v1/admin/groups/",
    "/api/v1/admin/groups/{name}/",
    "/api/v1/admin/keys/",
    "/api/v1/admin/keys/{id}/",
    "/api/v1/admin/bindings/",
    "/api/v1/admin/bindings/{id}/",
    "/api/v1/admin/latency/",
    "/api/v1/admin/latency/refresh/",
]


@pytest.fixture
def schema(client):
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def test_schema_is_openapi_3_with_every_operator_endpoint(schema):
    assert schema["openapi"].startswith("3.")
    assert set(OPERATOR_PATHS) <= set(schema["paths"])
    assert all(path.endswith("/") for path in schema["paths"] if path.startswith("/api/v1/admin/"))


def test_schema_describes_the_gateway_endpoints_too(schema):
    assert {"/api/v1/dispatch", "/api/v1/dispatch/explain", "/api/v1/leases/{lease_id}/complete"} <= set(
        schema["paths"]
    )


def test_every_operator_operation_documents_its_errors_in_the_one_shape(schema):
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    detail = schema["components"]["schemas"][error["properties"]["error"]["$ref"].rsplit("/", 1)[-1]]
    assert set(detail["properties"]) == {"type", "message"}
    for path in OPERATOR_PATHS:
        for method, operation in schema["paths"][path].items():
            responses = operation["responses"]
            for status in ("401", "403"):
                assert status in responses, (method, path, status)
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (method, path, status)
            assert {"tokenAuth": []} in operation["security"]
            assert operation["summary"]


def test_writes_document_their_request_and_validation_errors(schema):
    create = schema["paths"]["/api/v1/admin/accounts/"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AccountRequest")
    assert {"201", "400", "409", "422"} <= set(create["responses"])
    assert "409" in schema["paths"]["/api/v1/admin/identities/{name}/"]["delete"]["responses"]


def test_credentials_are_write_only_and_the_key_is_only_in_the_create_response(schema):
    components = schema["components"]["schemas"]
    assert components["AccountRequest"]["properties"]["credentials"]["writeOnly"] is True
    assert "credentials" not in components["Account"]["properties"]
    assert "key" not in components["ApiKey"]["properties"] and "key" not in components["ApiKeyRequest"]["properties"]
    created = schema["paths"]["/api/v1/admin/keys/"]["post"]["responses"]["201"]
    created_schema = components[created["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert "key" in created_schema["properties"]


def test_gateway_key_auth_is_described(schema):
    schemes = schema["components"]["securitySchemes"]
    assert schemes["GatewayBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer kp_...`",
    }
    assert schemes["GatewayApiKey"]["name"] == "x-api-key"
    assert schema["paths"]["/api/v1/dispatch"]["post"]["security"] == [{"GatewayBearer": []}, {"GatewayApiKey": []}]


def test_docs_page_uses_only_local_static_files(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in page
    external = re.findall(r"""(?:src|href)=["'](https?://[^"']+)""", page)
    assert external == []
    assert not re.search(r"cdn\.|jsdelivr|unpkg", page)


def test_spectacular_validates_without_warnings():
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", "/dev/null")
