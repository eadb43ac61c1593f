"""The operator API for the pool (SPEC §5): routing identities, accounts,
proxies and groups looked up by name, API keys by id, and the reset-quota and
clear-cooldown actions. Staff only. Thin: validate, call one service or
selector, serialize."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError, RestrictedError
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, serializers, status, viewsets
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.decorators import action
from rest_framework.response import Response

from accounts import services
from accounts.models import Account, AccountGroup, ApiKey, KeySlot, Proxy, RoutingIdentity
from accounts.permissions import (
    CRUD_VERBS,
    GRANT_CREDENTIALS_ACCESS,
    OperatorPermission,
    group_widening_refusal,
)
from accounts.serializers import (
    AccountGroupSerializer,
    AccountSerializer,
    ApiKeyCreatedSerializer,
    ApiKeySerializer,
    ProxySerializer,
    RoutingIdentitySerializer,
)
from core.errors import Conflict
from core.schema import operator_error_responses
from routing.selectors import operator as selectors


class OperatorApi:
    """Staff with the model permission of the action (accounts/permissions.py),
    by DRF token (``Authorization: Token ...``) or Django session. Token
    authentication comes first so that a caller with no (or a gateway's)
    credentials gets 401 with ``WWW-Authenticate: Token``, and a logged-in user
    who may not do this 403."""

    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [OperatorPermission]
    permission_model: type
    # action -> the verb of the model permission it needs (add, change, delete, view)
    action_verbs = CRUD_VERBS


def operator_crud_schema(serializer, *, noun: str, plural: str, created=None):
    """``extend_schema_view`` arguments for a ModelViewSet of the operator API."""
    return {
        "list": extend_schema(
            summary=f"List {plural}", responses={200: serializer(many=True), **operator_error_responses()}
        ),
        "create": extend_schema(
            summary=f"Create {noun}",
            request=serializer,
            responses={201: created or serializer, **operator_error_responses(400, 409, 422)},
        ),
        "retrieve": extend_schema(summary=f"Get {noun}", responses={200: serializer, **operator_error_responses(404)}),
        "update": extend_schema(
            summary=f"Replace {noun}", responses={200: serializer, **operator_error_responses(400, 404, 409, 422)}
        ),
        "partial_update": extend_schema(
            summary=f"Change some fields of {noun}",
            responses={200: serializer, **operator_error_responses(400, 404, 409, 422)},
        ),
        "destroy": extend_schema(
            summary=f"Delete {noun}",
            responses={204: OpenApiResponse(description="Deleted."), **operator_error_responses(404, 409)},
        ),
    }


class OperatorModelViewSet(OperatorApi, viewsets.ModelViewSet):
    # CRUD in the one error shape: constraint races and protected deletes are
    # 409s, and every write answers with the object as the list shows it.

    lookup_field = "name"
    # Any name but "/" (it ends the segment) and NUL (refused in every URL).
    lookup_value_regex = r"[^/\x00]+"

    def get_success_headers(self, data):
        # DRF would send the object's "url" field as Location: a proxy's egress
        # URL (any text, control characters included) is no resource address.
        return {}

    def perform_create(self, serializer):
        self._save(serializer)

    def perform_update(self, serializer):
        self._save(serializer)

    def _save(self, serializer):
        try:
            with transaction.atomic():
                instance = serializer.save()
        except IntegrityError as exc:  # lost a uniqueness race with another write
            raise Conflict(f"conflicts with an existing object: {exc}") from exc
        serializer.instance = self.get_queryset().get(pk=instance.pk)

    def perform_destroy(self, instance):
        try:
            with transaction.atomic():
                instance.delete()
        except (ProtectedError, RestrictedError) as exc:
            users = sorted(f"{obj._meta.verbose_name} {obj}" for obj in exc.args[1])
            shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
            raise Conflict(f"{instance._meta.verbose_name} {instance} is still used by {shown}") from exc
        except IntegrityError as exc:
            raise Conflict(f"{instance._meta.verbose_name} {instance} is still in use: {exc}") from exc


@extend_schema(tags=["operator: identities"])
@extend_schema_view(
    **operator_crud_schema(RoutingIdentitySerializer, noun="routing identity", plural="routing identities")
)
class RoutingIdentityViewSet(OperatorModelViewSet):
    """Routing identities: one upstream Kiro user each. Concurrency, pacing,
    cooldowns and load are tracked per identity, shared by its accounts."""

    serializer_class = RoutingIdentitySerializer
    permission_model = RoutingIdentity
    action_verbs = {**CRUD_VERBS, "clear_cooldown": "change"}

    def get_queryset(self):
        return selectors.identity_operator_list(now=timezone.now())

    @extend_schema(
        summary="Clear the identity's cooldown",
        request=None,
        responses={200: RoutingIdentitySerializer, **operator_error_responses(404)},
    )
    @action(detail=True, methods=["post"], url_path="clear-cooldown")
    def clear_cooldown(self, request, name=None):
        identity = self.get_object()
        services.identity_cooldown_clear(identities=RoutingIdentity.objects.filter(pk=identity.pk))
        return Response(self.get_serializer(self.get_queryset().get(pk=identity.pk)).data)


@extend_schema(tags=["operator: accounts"])
@extend_schema_view(**operator_crud_schema(AccountSerializer, noun="account", plural="accounts"))
class AccountViewSet(OperatorModelViewSet):
    """Accounts: credentials for a routing identity. `credentials` can be
    written but is never read back."""

    serializer_class = AccountSerializer
    permission_model = Account
    action_verbs = {**CRUD_VERBS, "reset_quota": "change"}

    def get_queryset(self):
        return selectors.account_operator_list(now=timezone.now())

    @extend_schema(
        summary="Put a quota-exhausted account back into selection",
        request=None,
        responses={200: AccountSerializer, **operator_error_responses(404)},
    )
    @action(detail=True, methods=["post"], url_path="reset-quota")
    def reset_quota(self, request, name=None):
        account = self.get_object()
        services.account_quota_reset(accounts=Account.objects.filter(pk=account.pk))
        return Response(self.get_serializer(self.get_queryset().get(pk=account.pk)).data)


@extend_schema(tags=["operator: proxies"])
@extend_schema_view(**operator_crud_schema(ProxySerializer, noun="proxy", plural="proxies"))
class ProxyViewSet(OperatorModelViewSet):
    """Egress proxies that account traffic goes through."""

    serializer_class = ProxySerializer
    permission_model = Proxy
    action_verbs = {**CRUD_VERBS, "clear_cooldown": "change"}

    def get_queryset(self):
        return Proxy.objects.order_by("name")

    @extend_schema(
        summary="Clear the proxy's cooldown",
        request=None,
        responses={200: ProxySerializer, **operator_error_responses(404)},
    )
    @action(detail=True, methods=["post"], url_path="clear-cooldown")
    def clear_cooldown(self, request, name=None):
        proxy = self.get_object()
        services.proxy_cooldown_clear(proxies=Proxy.objects.filter(pk=proxy.pk))
        return Response(self.get_serializer(self.get_queryset().get(pk=proxy.pk)).data)


@extend_schema(tags=["operator: groups"])
@extend_schema_view(**operator_crud_schema(AccountGroupSerializer, noun="account group", plural="account groups"))
class AccountGroupViewSet(OperatorModelViewSet):
    """Named sets of accounts an API key can be limited to."""

    serializer_class = AccountGroupSerializer
    permission_model = AccountGroup

    def get_queryset(self):
        return selectors.group_operator_list()

    def perform_update(self, serializer):
        # A new group is used by no key yet: only an update can add accounts to one that is.
        accounts = serializer.validated_data.get("accounts")
        if accounts is not None and not self.request.user.has_perm(GRANT_CREDENTIALS_ACCESS):
            refusal = group_widening_refusal(serializer.instance, [account.pk for account in accounts])
            if refusal:
                raise exceptions.PermissionDenied(refusal)
        super().perform_update(serializer)


@extend_schema(tags=["operator: keys"])
@extend_schema_view(
    **operator_crud_schema(ApiKeySerializer, noun="API key", plural="API keys", created=ApiKeyCreatedSerializer)
)
class ApiKeyViewSet(OperatorModelViewSet):
    """API keys that gateways authenticate with, looked up by id. The
    plaintext key is in the create response and nowhere else, ever."""

    serializer_class = ApiKeySerializer
    permission_model = ApiKey
    lookup_field = "pk"
    lookup_url_kwarg = "id"
    lookup_value_regex = "[0-9]+"

    def get_queryset(self):
        # The fixed account is shown by name: its credentials are neither read
        # nor decrypted (a row no configured key decrypts would fail the list).
        keys = ApiKey.objects.select_related("account_group", "fixed_account").defer("fixed_account__credentials")
        return keys.order_by("name").annotate(held_slots=KeySlot.held())

    def credentials_access_check(self, serializer) -> None:
        """A key that will carry credentials access after this write needs the
        grant permission: switching it on, and any change to a key that keeps
        it, since re-pointing such a key (group, fixed account, enabled,
        expiry) chooses whose secrets it receives. Switching it off does not."""
        current = serializer.instance.credentials_access if serializer.instance is not None else False
        if serializer.validated_data.get("credentials_access", current) and not self.request.user.has_perm(
            GRANT_CREDENTIALS_ACCESS
        ):
            raise exceptions.PermissionDenied(
                f"a key with credentials access can only be created or changed with the permission "
                f"{GRANT_CREDENTIALS_ACCESS}"
            )

    def perform_update(self, serializer):
        self.credentials_access_check(serializer)
        super().perform_update(serializer)

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        self.credentials_access_check(serializer)
        try:
            key, plaintext = services.api_key_create(**serializer.validated_data)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(serializers.as_serializer_error(exc)) from exc
        except IntegrityError as exc:
            raise Conflict(f"conflicts with an existing key: {exc}") from exc
        data = {"key": plaintext, **ApiKeySerializer(self.get_queryset().get(pk=key.pk)).data}
        return Response(data, status=status.HTTP_201_CREATED)
