"""The gateway API (SPEC §5): dispatch, complete, explain. Thin views:
validate, call one service or selector, serialize with the output serializer."""

from __future__ import annotations

import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field, extend_schema_serializer, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import ApiKeyAuthentication, HasApiKey
from accounts.fields import CredentialsKeyError
from accounts.proxy_urls import passwords_masked
from accounts.throttling import DispatchRateThrottle, ExplainRateThrottle
from core.errors import RULE_ERROR, AllAccountsFailed, NoUsableAccount, RateLimited
from core.schema import error_responses
from core.serializer_fields import StrictCharField
from core.shared_serializer import SharedSerializer
from routing import completions, leases, metrics, readiness, selection
from routing.dispatch import Acquired, Completion, DispatchRequest, SessionState
from routing.models import LeaseOutcome
from routing.selectors import explain, key_accounts

MAX_SESSION_ID_LENGTH = 512
# Bounds on what one request can make the server do: every excluded name is
# a comparison in the walk, and nobody has a pool this size per request.
MAX_EXCLUDED_ACCOUNTS = 256
MAX_WAIT_MS = 300_000
DEFAULT_WAIT_MS = 30_000


class GatewayApi(APIView):
    """Base of the gateway endpoints: a gateway's API key, nothing else."""

    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [HasApiKey]


class DispatchInputSerializer(serializers.Serializer):
    session_id = StrictCharField(
        required=False, allow_null=True, allow_blank=True, trim_whitespace=True, max_length=MAX_SESSION_ID_LENGTH
    )
    model = StrictCharField(required=False, allow_null=True, allow_blank=True, max_length=200)
    exclude_accounts = serializers.ListField(
        # A blank name is just a name no account has: nothing to reject.
        child=StrictCharField(allow_blank=True, max_length=200),
        required=False,
        max_length=MAX_EXCLUDED_ACCOUNTS,
    )
    max_wait_ms = serializers.IntegerField(required=False, min_value=0, max_value=MAX_WAIT_MS, default=DEFAULT_WAIT_MS)

    def validate_session_id(self, value):
        if value and len(value) > MAX_SESSION_ID_LENGTH:
            raise serializers.ValidationError(f"must be at most {MAX_SESSION_ID_LENGTH} characters")
        return value or None

    @staticmethod
    def to_request(data: dict) -> DispatchRequest:
        return DispatchRequest(
            session_id=data.get("session_id"),
            model=data.get("model") or None,
            exclude_accounts=frozenset(data.get("exclude_accounts", [])),
            max_wait_ms=data["max_wait_ms"],
        )


@extend_schema_field(OpenApiTypes.OBJECT)
class CredentialsField(serializers.Field):
    """The decrypted credentials, left in their redacting type
    (``accounts.fields.SecretDict``) until the renderer writes the response:
    no traceback, log line or error report of ``response.data`` shows them."""

    def to_representation(self, value):
        return value


class AccountOutputSerializer(serializers.Serializer):
    name = serializers.CharField()
    routing_identity = serializers.CharField()
    pool = serializers.CharField()
    proxy_url = serializers.CharField(allow_null=True)
    region = serializers.CharField()
    profile_arn = serializers.CharField()
    credentials = CredentialsField(
        required=False,
        help_text="The account's upstream secrets; present only for keys an operator gave credentials access.",
    )


class DispatchApi(GatewayApi):
    throttle_classes = [DispatchRateThrottle]

    @extend_schema_serializer(component_name="Dispatched")
    class OutputSerializer(serializers.Serializer):
        lease_id = serializers.UUIDField(source="lease.id")
        account = AccountOutputSerializer(source="*")
        session = serializers.ChoiceField(choices=[s.value for s in SessionState])
        expires_at = serializers.DateTimeField(source="lease.expires_at")
        waited_ms = serializers.IntegerField()

    @extend_schema(
        operation_id="dispatch",
        summary="Choose an account for one upstream request and lease it",
        request=DispatchInputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 429, 502, 503)},
        tags=["gateway"],
    )
    def post(self, request):
        dispatch_request = DispatchInputSerializer.to_request(_dispatch_input.validate(request.data))
        started = time.monotonic()
        try:
            acquired = leases.lease_acquire(key=request.auth, request=dispatch_request)
        except (RateLimited, AllAccountsFailed, NoUsableAccount) as refusal:
            metrics.dispatch_observe(_REFUSALS[type(refusal)], time.monotonic() - started, 0.0)
            raise
        metrics.dispatch_observe(_result(acquired), time.monotonic() - started, acquired.waited_ms / 1000)
        credentials = _credentials_or_release(request.auth, acquired) if request.auth.credentials_access else None
        return Response(_dispatch_output.render(DispatchAnswer(acquired, credentials)))


class DispatchAnswer:
    """What the dispatch response shows of an acquisition (read by the output
    serializer). Credentials stay in their redacting type to the renderer."""

    def __init__(self, acquired: Acquired, credentials) -> None:
        candidate = acquired.row.candidate
        self.lease = acquired.lease
        self.session = acquired.session.value
        self.waited_ms = acquired.waited_ms
        self.name = candidate.account
        self.routing_identity = candidate.routing_identity
        self.pool = candidate.pool
        self.proxy_url = candidate.proxy_url
        self.region = acquired.row.region
        self.profile_arn = acquired.row.profile_arn
        if credentials is not None:
            self.credentials = credentials


def _credentials_or_release(key, acquired: Acquired):
    """The account's secrets, decrypted for this response only. When they
    cannot be decrypted the gateway gets a 503 and no account, so the lease it
    will never use is released at once rather than held until its TTL."""
    try:
        return key_accounts.account_credentials(account_id=acquired.row.account_id)
    except CredentialsKeyError:
        completion = Completion(outcome="fatal", error_message="credentials cannot be decrypted", abandoned=True)
        completions.lease_complete(key=key, lease_id=acquired.lease.id, completion=completion)
        raise


_REFUSALS = {RateLimited: "rate_limited", AllAccountsFailed: "all_failed", NoUsableAccount: "unavailable"}


def _result(acquired: Acquired) -> str:
    if acquired.sticky is not None:
        return f"sticky_{acquired.sticky}"
    return "new_session" if acquired.session is SessionState.NEW else "acquired"


class LeaseCompleteApi(GatewayApi):
    @extend_schema_serializer(component_name="LeaseCompleteRequest")
    class InputSerializer(serializers.Serializer):
        outcome = serializers.ChoiceField(choices=[o for o in LeaseOutcome.values if o != LeaseOutcome.EXPIRED])
        first_token_ms = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=3_600_000)
        cooldown_seconds = serializers.IntegerField(required=False, allow_null=True, min_value=0)
        proxy_failure = serializers.BooleanField(required=False, default=False)
        remaining_credits = serializers.FloatField(required=False, allow_null=True)
        quota_resets_at = serializers.DateTimeField(
            required=False,
            allow_null=True,
            help_text="When the account's upstream credits reset, if the upstream said; it returns to selection "
            "then. Must lie in the future, within a year.",
        )
        error_message = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=2000)
        abandoned = serializers.BooleanField(
            required=False,
            default=False,
            help_text="With retry_next or fatal: the gateway gave the request up itself (its caller went away, a "
            "fault of its own) or never sent it. The lease is released and the account is not blamed: the "
            "failure counts toward no ejection.",
        )

        def validate_quota_resets_at(self, value):
            now = timezone.now()
            if value is not None and not now < value <= now + timedelta(days=366):
                # A rule the schema cannot state (it depends on the clock): 422.
                raise serializers.ValidationError("must lie in the future, within a year", code=RULE_ERROR)
            return value

        def validate(self, data):
            if data["abandoned"] and data["outcome"] not in completions.FAILURES:
                message = "only a retry_next or fatal outcome can be abandoned"
                raise serializers.ValidationError({"abandoned": [message]}, code=RULE_ERROR)
            return data

    @extend_schema_serializer(component_name="LeaseCompleted")
    class OutputSerializer(serializers.Serializer):
        lease_id = serializers.UUIDField()
        account = serializers.CharField(source="account_name")
        outcome = serializers.CharField()
        session_bound = serializers.BooleanField()
        report_applied = serializers.BooleanField(
            help_text="False when the key sent more capacity-taking reports (rate limits, proxy failures, "
            "exhausted quotas) than KIROPOOL_CAPACITY_REPORT_RATE: the lease was released, the report not applied."
        )

    @extend_schema(
        operation_id="lease_complete",
        summary="Report how the upstream call went and release the lease",
        request=InputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 404, 409, 422, 503)},
        tags=["gateway"],
    )
    def post(self, request, lease_id):
        data = _complete_input.validate(request.data)
        completed = completions.lease_complete(
            key=request.auth,
            lease_id=lease_id,
            completion=Completion(
                outcome=data["outcome"],
                first_token_ms=data.get("first_token_ms"),
                cooldown_seconds=data.get("cooldown_seconds"),
                proxy_failure=data["proxy_failure"],
                remaining_credits=data.get("remaining_credits"),
                quota_resets_at=data.get("quota_resets_at"),
                error_message=passwords_masked(data.get("error_message") or ""),
                abandoned=data["abandoned"],
            ),
        )
        metrics.completion_observe(data["outcome"])
        return Response(_complete_output.render(completed))


@extend_schema_serializer(component_name="ExplainCandidate")
class ExplainCandidateSerializer(serializers.Serializer):
    account = serializers.CharField()
    routing_identity = serializers.CharField()
    pool = serializers.CharField()
    proxy_in_cooldown = serializers.BooleanField()
    model_preferred = serializers.BooleanField()
    session_count = serializers.IntegerField(allow_null=True)
    pool_rank = serializers.IntegerField()
    latency_band = serializers.IntegerField(allow_null=True)
    latency_score_ms = serializers.FloatField(allow_null=True)
    last_started_at = serializers.DateTimeField(allow_null=True)
    remaining_credits_sort = serializers.FloatField()
    credit_burn_per_hour = serializers.FloatField(
        allow_null=True, help_text="Credit pacing (credit_first): credits an hour to use the balance before its reset."
    )
    quota_resets_at = serializers.DateTimeField(allow_null=True)
    quota_probe = serializers.BooleanField(help_text="Quota spent: one lease may go through to see if it came back.")
    cooldown_remaining_s = serializers.IntegerField()
    ejected_remaining_s = serializers.IntegerField(help_text="Outlier ejection of the identity left, in seconds.")
    in_flight = serializers.IntegerField()
    held_for_sticky = serializers.IntegerField(help_text="Slots held for sticky sessions waiting on the identity.")
    effective_concurrency = serializers.IntegerField(
        help_text="The limit now: lower while it ramps up after an ejection."
    )
    max_concurrency = serializers.IntegerField()
    can_start = serializers.BooleanField(help_text="Whether a lease could start on it right now.")


class ExplainUnselectableSerializer(serializers.Serializer):
    account = serializers.CharField()
    reason = serializers.ChoiceField(choices=["disabled", "quota_exhausted", "credits_at_or_below_minimum", "excluded"])


class DispatchExplainApi(GatewayApi):
    throttle_classes = [ExplainRateThrottle]

    @extend_schema_serializer(component_name="DispatchExplanation")
    class OutputSerializer(serializers.Serializer):
        session = serializers.ChoiceField(choices=[s.value for s in SessionState])
        bound_account = serializers.CharField(allow_null=True)
        latency = inline_serializer(
            name="ExplainLatency",
            fields={
                "generated_at": serializers.DateTimeField(allow_null=True),
                "global_avg_ms": serializers.FloatField(allow_null=True),
                "usable": serializers.BooleanField(),
            },
        )
        candidates = serializers.ListField(child=ExplainCandidateSerializer())
        sticky_patience_ms = serializers.IntegerField(
            help_text="How long a returning turn would wait for its busy bound account before moving."
        )
        sticky_would_wait = serializers.BooleanField(
            help_text="A bound session's account is busy, and a dispatch would wait for it (sticky patience)."
        )
        unselectable = serializers.ListField(
            child=ExplainUnselectableSerializer(), help_text="The key's accounts that are not candidates, and why."
        )

    @extend_schema(
        operation_id="dispatch_explain",
        summary="Show the selection order a dispatch would walk; acquires nothing",
        request=DispatchInputSerializer,
        responses={200: OutputSerializer, **error_responses(400, 401, 429, 503)},
        tags=["gateway"],
    )
    def post(self, request):
        dispatch_request = DispatchInputSerializer.to_request(_dispatch_input.validate(request.data))
        now = timezone.now()
        explained = explain.dispatch_explain(key=request.auth, request=dispatch_request, now=now)
        snapshot = explained.snapshot
        output = {
            "session": explained.session.value,
            "bound_account": explained.bound_account,
            "latency": {
                "generated_at": snapshot.generated_at if snapshot else None,
                "global_avg_ms": snapshot.global_avg_ms if snapshot else None,
                "usable": any(r.latency_band is not None for r in explained.ranked),
            },
            "candidates": [_explain_candidate(ranked, now) for ranked in explained.ranked],
            "sticky_patience_ms": explained.sticky_patience_ms,
            "sticky_would_wait": explained.sticky_would_wait,
            "unselectable": [{"account": name, "reason": reason} for name, reason in explained.unselectable],
        }
        return Response(self.OutputSerializer(output).data)


def _explain_candidate(ranked: selection.Ranked, now) -> dict:
    c = ranked.candidate
    left = readiness.cooldown_remaining(c.identity_cooldown_until, now)
    ejected = readiness.cooldown_remaining(c.ejected_until, now)
    slow_start = timedelta(seconds=settings.KIROPOOL_SLOW_START_SECONDS)
    return {
        "account": c.account,
        "routing_identity": c.routing_identity,
        "pool": c.pool,
        "proxy_in_cooldown": ranked.proxy_in_cooldown,
        "model_preferred": ranked.model_preferred,
        "session_count": ranked.session_count,
        "pool_rank": ranked.pool_rank,
        "latency_band": ranked.latency_band,
        "latency_score_ms": ranked.latency_score_ms,
        "last_started_at": c.last_started_at,
        "remaining_credits_sort": ranked.remaining_credits_sort,
        "credit_burn_per_hour": ranked.credit_burn_per_hour,
        "quota_resets_at": c.quota_resets_at,
        "quota_probe": c.quota_probe,
        "cooldown_remaining_s": readiness.retry_after_seconds(left) if left else 0,
        "ejected_remaining_s": readiness.retry_after_seconds(ejected) if ejected else 0,
        "in_flight": c.in_flight,
        "held_for_sticky": c.reserved,
        "effective_concurrency": readiness.effective_concurrency(c, now, slow_start),
        "max_concurrency": c.max_concurrency,
        "can_start": readiness.throttle_state(c, now, slow_start=slow_start) == "ready",
    }


# Built once per process, shared by the threads (core/shared_serializer.py).
_dispatch_input = SharedSerializer(DispatchInputSerializer)
_dispatch_output = SharedSerializer(DispatchApi.OutputSerializer)
_complete_input = SharedSerializer(LeaseCompleteApi.InputSerializer)
_complete_output = SharedSerializer(LeaseCompleteApi.OutputSerializer)
