"""Who may do what in the operator API: a staff user holding the Django model
permission the admin asks for the same act. Staff alone is only the way in,
as in the admin: a staff user with no permissions may do nothing.

Each operator view names the model its permissions are taken from
(``permission_model``) and the verb each of its actions needs
(``action_verbs``). Reads need ``view`` or ``change``, as the admin's
``has_view_permission`` does. An action with no declared verb is refused to
everyone, superusers included, so a new action cannot slip through open."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from django.db import models
from rest_framework import exceptions
from rest_framework.permissions import BasePermission

from accounts.models import ApiKey

# Creating or changing an API key that hands account credentials to its
# gateway (ApiKey.credentials_access); declared in ApiKey.Meta.permissions.
GRANT_CREDENTIALS_ACCESS = "accounts.grant_credentials_access"


def credentials_keys_by_group(group_ids: Iterable[int]) -> dict[int, list[str]]:
    """The names of the API keys with credentials access that route over each
    of these groups. An account added to such a group hands its credentials
    to those keys' gateways: as re-pointing such a key does, that needs
    :data:`GRANT_CREDENTIALS_ACCESS` (removing accounts does not)."""
    keys = ApiKey.objects.filter(credentials_access=True, account_group_id__in=list(group_ids)).order_by("name")
    found: dict[int, list[str]] = defaultdict(list)
    for group_id, name in keys.values_list("account_group_id", "name"):
        found[group_id].append(name)
    return dict(found)


def credentials_reach_refusal(keys: list[str]) -> str:
    """Why adding accounts to a group used by ``keys`` is refused."""
    shown = ", ".join(repr(name) for name in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return (
        f"adding accounts to this group hands their credentials to the API keys with credentials access that "
        f"use it ({shown}): that needs the permission {GRANT_CREDENTIALS_ACCESS}"
    )


def group_widening_refusal(group, account_ids: Iterable[int]) -> str | None:
    """Why setting ``group``'s accounts to ``account_ids`` needs
    :data:`GRANT_CREDENTIALS_ACCESS`, or None: it adds no account, or no
    key with credentials access uses the group (taking accounts out never
    needs it). The admin's group form and the operator API both ask here."""
    added = set(account_ids) - set(group.accounts.values_list("pk", flat=True))
    keys = credentials_keys_by_group([group.pk]).get(group.pk) if added else None
    return credentials_reach_refusal(keys) if keys else None


CRUD_VERBS = {
    "list": "view",
    "retrieve": "view",
    "metadata": "view",  # OPTIONS describes the endpoint: a read
    "create": "add",
    "update": "change",
    "partial_update": "change",
    "destroy": "delete",
}


def model_permission(model: type[models.Model], verb: str) -> str:
    """``"<app>.<verb>_<model>"``: the name Django's auth gives the permission."""
    return f"{model._meta.app_label}.{verb}_{model._meta.model_name}"


def view_permissions(model: type[models.Model]) -> list[str]:
    """The permissions of which any one lets a user look at the model's rows:
    the admin's rule (``has_view_permission``), whoever may change a model may
    also look at it."""
    return [model_permission(model, "view"), model_permission(model, "change")]


def operator_permissions_required(view) -> list[str]:
    """The permissions of which any one lets the caller run the view's
    current action; empty when the action declared none."""
    verb = view.action_verbs.get(view.action)
    if verb is None:
        return []
    if verb == "view":
        return view_permissions(view.permission_model)
    return [model_permission(view.permission_model, verb)]


class OperatorPermission(BasePermission):
    """Staff, plus the model permission of the action. A caller with no (or
    bad) credentials is not judged here: DRF answers 401 for it first."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_staff):
            self.message = "staff only"
            return False
        if view.action is None:  # a method the view does not serve
            raise exceptions.MethodNotAllowed(request.method)
        required = operator_permissions_required(view)
        if not any(user.has_perm(permission) for permission in required):
            self.message = f"needs the permission {' or '.join(required) or '(none declared for this action)'}"
            return False
        return True
