"""The shortcut content negotiation chooses exactly what DRF's own does."""

from __future__ import annotations

import itertools

from django.http import Http404
from drf_orjson_renderer.renderers import ORJSONRenderer
from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BrowsableAPIRenderer
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from core.negotiation import ContentNegotiation

ACCEPTS = [
    None,
    "*/*",
    "application/json",
    "application/json; indent=4",
    "application/*",
    "text/html",
    "text/html, application/json;q=0.9",
    "application/xml",
    "*/*;q=0.1",
    "",
]
QUERIES = ["", "format=json", "format=api", "format=xml", "page=2"]
SUFFIXES = [None, "json", "api"]
RENDERER_LISTS = [
    (ORJSONRenderer,),
    (ORJSONRenderer, BrowsableAPIRenderer),
    (BrowsableAPIRenderer, ORJSONRenderer),
]


def _choice(negotiation, accept, query, renderers, suffix):
    headers = {} if accept is None else {"HTTP_ACCEPT": accept}
    request = Request(APIRequestFactory().post(f"/api/v1/dispatch?{query}" if query else "/api/v1/dispatch", **headers))
    try:
        renderer, media_type = negotiation.select_renderer(request, [cls() for cls in renderers], suffix)
    except NotAcceptable:
        return "406"
    except Http404:  # a format no renderer has
        return "404"
    return type(renderer), media_type


def test_the_shortcut_chooses_what_drf_chooses():
    """Over every combination of Accept header, query string, renderers and
    format suffix (450 of them): the same renderer and media type, or the
    same refusal."""
    differ = [
        (accept, query, [r.__name__ for r in renderers], suffix, ours, drfs)
        for accept, query, renderers, suffix in itertools.product(ACCEPTS, QUERIES, RENDERER_LISTS, SUFFIXES)
        if (ours := _choice(ContentNegotiation(), accept, query, renderers, suffix))
        != (drfs := _choice(DefaultContentNegotiation(), accept, query, renderers, suffix))
    ]
    assert differ == []


def test_a_gateway_request_is_answered_in_json_and_an_unacceptable_one_refused():
    """Through the settings: what every view negotiates with."""
    from rest_framework.settings import api_settings

    assert api_settings.DEFAULT_CONTENT_NEGOTIATION_CLASS is ContentNegotiation
    assert _choice(ContentNegotiation(), "*/*", "", (ORJSONRenderer,), None)[1] == "application/json"
    assert _choice(ContentNegotiation(), "application/xml", "", (ORJSONRenderer,), None) == "406"
