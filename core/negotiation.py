"""Content negotiation that skips the negotiating when there is nothing to
choose between."""

from __future__ import annotations

from rest_framework.negotiation import DefaultContentNegotiation


class ContentNegotiation(DefaultContentNegotiation):
    """DRF's negotiation, with its common case answered at once.

    A request that names no format in its URL and accepts anything (no
    ``Accept`` header, or ``*/*``) or exactly the first renderer's media type
    gets the first renderer, as DRF would choose it. Every gateway request is
    such a one, and DRF's parsing of the ``Accept`` header and the query
    string for it took about 5 % of a web worker's Python time under load
    (py-spy, new-session dispatches and completions). Any other request is
    negotiated by DRF, refusals (406) included."""

    def select_renderer(self, request, renderers, format_suffix=None):
        first = renderers[0]
        meta = request.META
        anything = meta.get("HTTP_ACCEPT", "*/*") in ("*/*", first.media_type)
        if anything and format_suffix is None and not meta.get("QUERY_STRING"):
            return first, first.media_type
        return super().select_renderer(request, renderers, format_suffix)
