"""Refuse hostile requests before any view sees them, in the one error shape.

- A body over ``KIROPOOL_MAX_BODY_BYTES`` is a 413, judged by its declared
  length before a byte of it is read. Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE``
  guards ``request.body`` and forms, but DRF's JSON parser reads the stream
  itself and never looks at it. (A body without ``Content-Length`` is never
  read by Django's WSGI request: it is empty to every view, nothing to cap.)
- A NUL character in the path or the query string is a 400: no name or
  filter value can contain one, and PostgreSQL text cannot hold one, so the
  query built from it would fail with a server error instead of "not found".

And Django's ``CommonMiddleware`` keeps its ``APPEND_SLASH`` redirect away
from the API (``CommonMiddleware`` below).
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.http import JsonResponse
from django.middleware import common

from core.errors import error_body


class RequestGuardMiddleware:
    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        limit = settings.KIROPOOL_MAX_BODY_BYTES
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0  # Django reads an unparsable length as an empty body too
        if limit and length > limit:
            return JsonResponse(
                error_body(413, f"request body of {length} bytes is over the limit of {limit} bytes"), status=413
            )
        if "\x00" in request.path or b"\x00" in unquote_to_bytes(request.META.get("QUERY_STRING", "")):
            return JsonResponse(error_body(400, "NUL characters are not allowed in the URL"), status=400)
        return self.get_response(request)


class MachineLane:
    """A browser middleware that requests of machine clients skip: gateways
    and probes (``KIROPOOL_MACHINE_PATHS``) carry no session cookie, log in
    with a key or not at all, and get JSON, never a page, so logins and
    messages are only work for them."""

    def __call__(self, request):
        if request.path_info.startswith(settings.KIROPOOL_MACHINE_PATHS):
            return self.get_response(request)
        return super().__call__(request)


class AuthenticationMiddleware(MachineLane, auth.AuthenticationMiddleware):
    pass


class MessageMiddleware(MachineLane, messages.MessageMiddleware):
    pass


class CommonMiddleware(common.CommonMiddleware):
    """Django's, without the ``APPEND_SLASH`` redirect under ``/api/``: a 301
    with an empty HTML body, which a client following it resends without the
    POST's body (under ``DEBUG`` Django raised for a POST instead). There the
    404 in the error shape names the path with (or without) its slash."""

    def should_redirect_with_slash(self, request):
        return not request.path_info.startswith("/api/") and super().should_redirect_with_slash(request)
