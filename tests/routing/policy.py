"""Builders of the pure policy's inputs (``routing/selection.py``,
``routing/readiness.py``) for the table tests."""

from __future__ import annotations

from datetime import UTC, datetime

from routing.selection import POOL_BALANCED, Candidate, SelectionContext

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def cand(account: str, **fields: object) -> Candidate:
    fields.setdefault("routing_identity", f"id-{account}")
    fields.setdefault("pool", POOL_BALANCED)
    return Candidate(account=account, **fields)  # type: ignore[arg-type]


def ctx(**fields: object) -> SelectionContext:
    fields.setdefault("now", NOW)
    return SelectionContext(**fields)  # type: ignore[arg-type]
