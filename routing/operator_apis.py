"""The operator API for the decision's state (SPEC §5): session bindings
(list, unbind) and the latency snapshot (read, rebuild now). Staff only."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response

from accounts.apis import OperatorApi
from accounts.permissions import CRUD_VERBS
from accounts.proxy_urls import proxy_url_masked
from core.schema import operator_error_responses
from core.serializer_fields import QueryIntegerField, StrictCharField, query_params_single
from routing import maintenance, sessions
from routing.models import LatencySnapshot, SessionBinding
from routing.selectors import operator as selectors
from routing.selectors.latency import StoredSnapshot, latency_snapshot_latest, snapshot_load


class BindingPagination(LimitOffsetPagination):
    """``limit`` and ``offset`` validated as the schema states them. DRF's
    would read ``offset=abc`` as 0 and ``limit=5000`` as the maximum."""

    # There may be a million live bindings: never all in one response.
    default_limit = 100
    max_limit = 1000

    def get_limit(self, request):
        return self._integer(request, self.limit_query_param, self.default_limit, minimum=1, maximum=self.max_limit)

    def get_offset(self, request):
        return self._integer(request, self.offset_query_param, 0, minimum=0)

    def _integer(self, request, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        query_params_single(request.query_params, [name])
        if name not in request.query_params:
            return default
        field = QueryIntegerField(min_value=minimum, max_value=maximum)
        try:
            return field.run_validation(request.query_params[name])
        except serializers.ValidationError as exc:
            raise serializers.ValidationError({name: exc.detail}) from exc

    def get_schema_operation_parameters(self, view):
        bounds = {self.limit_query_param: {"minimum": 1, "maximum": self.max_limit, "default": self.default_limit}}
        bounds[self.offset_query_param] = {"minimum": 0, "default": 0}
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"].update(bounds.get(parameter["name"], {}))
        return parameters


class SessionBindingSerializer(serializers.ModelSerializer):
    key = serializers.IntegerField(source="api_key_id", read_only=True, help_text="API key id.")
    key_name = serializers.CharField(source="api_key.name", read_only=True)
    account = serializers.CharField(source="account.name", read_only=True)

    class Meta:
        model = SessionBinding
        fields = ["id", "key", "key_name", "session_id", "account", "created_at", "updated_at", "expires_at"]
        read_only_fields = fields


class BindingFilterSerializer(serializers.Serializer):
    account = StrictCharField(
        required=False, trim_whitespace=False, max_length=200, help_text="Only bindings to this account (name)."
    )
    key = QueryIntegerField(required=False, min_value=1, help_text="Only bindings of this API key (id).")


@extend_schema(tags=["operator: bindings"])
@extend_schema_view(
    list=extend_schema(
        summary="List live session bindings, most recently used first",
        parameters=[BindingFilterSerializer],
        responses={200: SessionBindingSerializer(many=True), **operator_error_responses(400)},
    ),
    destroy=extend_schema(
        summary="Unbind a session (its next dispatch is a new session)",
        responses={204: OpenApiResponse(description="Unbound."), **operator_error_responses(404)},
    ),
)
class SessionBindingViewSet(OperatorApi, mixins.ListModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Live session affinities: (API key, session id) → account."""

    serializer_class = SessionBindingSerializer
    permission_model = SessionBinding
    pagination_class = BindingPagination

    def get_queryset(self):
        filters = {}
        if self.action == "list":
            query_params_single(self.request.query_params, BindingFilterSerializer().fields)
            # A plain dict: given a QueryDict, DRF reads "?account=" as "not given".
            params = BindingFilterSerializer(data=self.request.query_params.dict())
            params.is_valid(raise_exception=True)
            filters = {"account": params.validated_data.get("account"), "key_id": params.validated_data.get("key")}
        return selectors.binding_operator_list(now=timezone.now(), **filters)

    def perform_destroy(self, instance):
        sessions.session_unbind(bindings=SessionBinding.objects.filter(pk=instance.pk))


class AccountLatencySerializer(serializers.Serializer):
    account = serializers.CharField()
    samples = serializers.IntegerField()
    avg_first_token_ms = serializers.FloatField()


class ProxyLatencySerializer(serializers.Serializer):
    proxy_url = serializers.CharField(help_text="The URL the samples went through, its password masked.")
    samples = serializers.IntegerField()
    avg_first_token_ms = serializers.FloatField()


class LatencySnapshotSerializer(serializers.Serializer):
    generated_at = serializers.DateTimeField(allow_null=True, help_text="Null when no snapshot was built yet.")
    window_seconds = serializers.IntegerField(allow_null=True, help_text="How far back the samples go.")
    samples = serializers.IntegerField(help_text="Samples in the window.")
    global_avg_first_token_ms = serializers.FloatField(
        allow_null=True, help_text="Sample-weighted mean first-token latency; null without samples."
    )
    accounts = AccountLatencySerializer(many=True)
    proxies = ProxyLatencySerializer(many=True)


def snapshot_payload(stored: StoredSnapshot | None) -> dict:
    if stored is None:
        return {
            "generated_at": None,
            "window_seconds": None,
            "samples": 0,
            "global_avg_first_token_ms": None,
            "accounts": [],
            "proxies": [],
        }
    snapshot = stored.snapshot
    return {
        "generated_at": snapshot.generated_at,
        "window_seconds": stored.window_seconds,
        "samples": stored.sample_count,
        "global_avg_first_token_ms": snapshot.global_avg_ms,
        "accounts": [
            {"account": name, "samples": stats.samples, "avg_first_token_ms": stats.avg_ms}
            for name, stats in sorted(snapshot.accounts.items())
        ],
        "proxies": [
            {"proxy_url": proxy_url_masked(url), "samples": stats.samples, "avg_first_token_ms": stats.avg_ms}
            for url, stats in sorted(snapshot.proxies.items())
        ],
    }


class OneObjectSchema(AutoSchema):
    """The snapshot is one object, though DRF's router serves it as ``list``:
    without this, drf-spectacular documents an array (found by the fuzz run)."""

    def _is_list_view(self, serializer=None) -> bool:
        return False


@extend_schema(tags=["operator: latency"])
class LatencySnapshotViewSet(OperatorApi, viewsets.ViewSet):
    """The latency snapshot the selector ranks by: the last hour of
    first-token latencies, rebuilt every 60 s by a periodic task."""

    schema = OneObjectSchema()
    permission_model = LatencySnapshot
    # A rebuild writes a new snapshot row, as "add" says.
    action_verbs = {**CRUD_VERBS, "refresh": "add"}

    @extend_schema(
        summary="The current latency snapshot",
        description="All nulls and empty lists until the first snapshot is built.",
        responses={200: LatencySnapshotSerializer, **operator_error_responses()},
    )
    def list(self, request):
        return Response(LatencySnapshotSerializer(snapshot_payload(latency_snapshot_latest())).data)

    @extend_schema(
        summary="Rebuild the latency snapshot now and return it",
        request=None,
        responses={200: LatencySnapshotSerializer, **operator_error_responses()},
    )
    @action(detail=False, methods=["post"])
    def refresh(self, request):
        fresh = snapshot_load(maintenance.latency_snapshot_refresh())
        return Response(LatencySnapshotSerializer(snapshot_payload(fresh)).data)
