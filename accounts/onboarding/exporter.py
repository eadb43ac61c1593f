"""Export of the pool in the shape the import takes back: the operator-editable
columns only (see ``kinds.py``), references by name, never credentials, and
proxy URLs with their passwords masked.

One query per kind (two for groups: the groups, then their members), whatever
the pool's size; credentials are not even selected.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import QuerySet

from accounts.models import AccountGroup
from accounts.onboarding.columns import Names
from accounts.onboarding.kinds import GROUPS, KINDS, Kind


def kind_export(kind: Kind, queryset: QuerySet | None = None) -> list[dict]:
    """The rows of one kind (all of them, or those of ``queryset``), by name."""
    rows = kind.model.objects.order_by("name")
    if queryset is not None:
        rows = rows.filter(pk__in=queryset.values("pk"))
    scalar = [c for c in kind.exported if not isinstance(c, Names)]
    records = {
        pk: {c.name: c.render(values[i]) for i, c in enumerate(scalar)}
        for pk, *values in rows.values_list("pk", *(c.export for c in scalar))
    }
    if kind is GROUPS:
        for record in records.values():
            record["accounts"] = []
        members = (
            AccountGroup.accounts.through.objects.filter(accountgroup_id__in=rows.values("pk"))
            .order_by("account__name")
            .values_list("accountgroup_id", "account__name")
        )
        for group_id, account_name in members:
            records[group_id]["accounts"].append(account_name)
    return list(records.values())


def pool_export(kinds: Iterable[str] | None = None) -> dict[str, list[dict]]:
    """``{"identities": [...], "proxies": [...], "accounts": [...], "groups": [...]}``."""
    return {key: kind_export(KINDS[key]) for key in (kinds or KINDS)}
