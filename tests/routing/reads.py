"""The dispatcher's reads as the tests run them by hand."""

from __future__ import annotations

from django.utils import timezone

from accounts.models import ApiKey
from routing.dispatch import DispatchRequest
from routing.selectors import dispatch as reads
from routing.selectors.compiled import CompiledQuery


def head_read(key: ApiKey) -> tuple[CompiledQuery, dict[str, object]]:
    """The new-session head read of ``key``: its compiled query and values."""
    shape, values = reads.request_shape(
        key=key,
        request=DispatchRequest(session_id="a-new-one"),
        now=timezone.now(),
        snapshot=None,
        spread=True,
        head=True,
    )
    return reads.compiled(shape), values
