"""The client's dataclasses against the server's OpenAPI schema (/api/schema/):
same fields, same required-ness, same types, nested shapes and enums
included. A server change that a client would notice fails here first.

Shapes are found through the operations (request body, 200 and error
responses), not by component name, so a renamed component is still found."""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
import uuid
from typing import Any, Literal

import pytest
from kiropool_client.types import (
    Completion,
    Dispatched,
    DispatchExplanation,
    DispatchRequest,
    ErrorBody,
    LeaseCompleted,
)

DISPATCH = "/api/v1/dispatch"
EXPLAIN = "/api/v1/dispatch/explain"
COMPLETE = "/api/v1/leases/{lease_id}/complete"

# (dataclass, path, "request" or a response status): every shape the client sends or reads.
SHAPES = [
    (DispatchRequest, DISPATCH, "request"),
    (DispatchRequest, EXPLAIN, "request"),
    (Dispatched, DISPATCH, "200"),
    (Completion, COMPLETE, "request"),
    (LeaseCompleted, COMPLETE, "200"),
    (DispatchExplanation, EXPLAIN, "200"),
    *[(ErrorBody, DISPATCH, status) for status in ("400", "401", "429", "502", "503")],
    *[(ErrorBody, EXPLAIN, status) for status in ("400", "401", "429", "503")],
    *[(ErrorBody, COMPLETE, status) for status in ("400", "401", "404", "409", "422", "503")],
]


@pytest.fixture(scope="module")
def schema(django_db_blocker):
    from django.test import Client

    with django_db_blocker.unblock():
        response = Client().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def operation_schema(schema: dict, path: str, where: str) -> dict:
    operation = schema["paths"][path]["post"]
    holder = operation["requestBody"] if where == "request" else operation["responses"][where]
    return holder["content"]["application/json"]["schema"]


def resolve(schema: dict, node: dict) -> dict:
    while True:
        if "$ref" in node:
            node = {**schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]], **_rest(node, "$ref")}
        elif len(node.get("allOf", [])) == 1:
            node = {**node["allOf"][0], **_rest(node, "allOf")}
        else:
            return node


def _rest(node: dict, key: str) -> dict:
    return {k: v for k, v in node.items() if k != key}


def differences(schema: dict, cls: type, node: dict, where: str) -> list[str]:
    """How the dataclass ``cls`` differs from the schema object ``node``; empty when they agree."""
    node = resolve(schema, node)
    props, required = node.get("properties", {}), set(node.get("required", []))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    found = []
    if set(fields) != set(props):
        found.append(f"{where}: fields {sorted(fields)} != schema properties {sorted(props)}")
    hints = typing.get_type_hints(cls)
    for name in sorted(set(fields) & set(props)):
        field = fields[name]
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if (name in required) == has_default:
            found.append(f"{where}.{name}: required in schema: {name in required}; default in client: {has_default}")
        # A property that may be absent may be None in the client: left out of
        # a request, or not in the answer.
        found += type_differences(schema, hints[name], props[name], f"{where}.{name}", omittable=name not in required)
    return found


def type_differences(schema: dict, hint: Any, node: dict, where: str, *, omittable: bool = False) -> list[str]:
    node = resolve(schema, node)
    base, optional = _split_optional(hint)
    nullable = bool(node.get("nullable"))
    if optional != nullable and not (omittable and optional and not nullable):
        return [f"{where}: nullable in schema: {nullable}; Optional in client: {optional}"]
    if "enum" in node:
        values = set(node["enum"]) - {None}
        if typing.get_origin(base) is not Literal or set(typing.get_args(base)) != values:
            return [f"{where}: schema enum {sorted(values)}, client {base}"]
        return []
    kind = node.get("type")
    if kind == "object" and "properties" in node:
        if not dataclasses.is_dataclass(base):
            return [f"{where}: schema object, client {base}"]
        return differences(schema, base, node, where)
    if kind == "object":
        return [] if typing.get_origin(base) is dict else [f"{where}: schema free-form object, client {base}"]
    if kind == "array":
        if typing.get_origin(base) is not list:
            return [f"{where}: schema array, client {base}"]
        return type_differences(schema, typing.get_args(base)[0], node["items"], f"{where}[]")
    expected = SCALARS.get((kind, node.get("format")), SCALARS.get((kind, None)))
    return [] if base is expected else [f"{where}: schema {kind}/{node.get('format')}, client {base}"]


SCALARS = {
    ("string", None): str,
    ("string", "date-time"): dt.datetime,
    ("string", "uuid"): uuid.UUID,
    ("integer", None): int,
    ("number", None): float,
    ("number", "double"): float,
    ("boolean", None): bool,
}


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != len(typing.get_args(hint)):
            (base,) = args
            return base, True
    return hint, False


@pytest.mark.parametrize(("cls", "path", "where"), SHAPES, ids=[f"{c.__name__}@{p}:{w}" for c, p, w in SHAPES])
def test_client_type_agrees_with_the_server_schema(schema, cls, path, where):
    node = operation_schema(schema, path, where)
    assert differences(schema, cls, node, cls.__name__) == []


def test_the_comparison_notices_drift(schema):
    """The checker itself: a client type that drifted from the schema is reported."""

    @dataclasses.dataclass
    class DriftedCompleted:
        lease_id: str  # the schema says uuid
        account: str
        outcome: str
        session_bound: bool | None  # the schema says not nullable
        surplus: int = 0  # not in the schema

    found = differences(schema, DriftedCompleted, operation_schema(schema, COMPLETE, "200"), "D")
    assert any("fields" in f for f in found)
    assert any("D.lease_id" in f for f in found)
    assert any("D.session_bound" in f for f in found)


def test_every_gateway_operation_is_covered(schema):
    covered = {(path, where) for _, path, where in SHAPES}
    for path in (DISPATCH, EXPLAIN, COMPLETE):
        operation = schema["paths"][path]["post"]
        wanted = {"request"} | {status for status in operation["responses"]}
        assert {(path, w) for w in wanted} <= covered
