"""A shared serializer's compiled plan gives what DRF gives: the same
validated data, the same errors, the same rendering."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from unittest import mock

import pytest
from django.core.validators import MaxLengthValidator, MinValueValidator
from hypothesis import given, settings
from hypothesis import strategies as st
from rest_framework import serializers

from core.serializer_fields import (
    StrictBooleanField,
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictListField,
)
from core.shared_serializer import SharedSerializer
from routing.apis import DispatchApi, DispatchInputSerializer, LeaseCompleteApi
from routing.dispatch import Completed


def _one_field(name: str, field: serializers.Field) -> tuple[str, type[serializers.Serializer]]:
    return name, type(f"Only{name.title().replace('_', '')}Serializer", (serializers.Serializer,), {"value": field})


# One serializer a field kind and set of options the plan knows (or defers),
# so that a wrong answer shows whenever that one field's value is valid.
KINDS = dict(
    [
        _one_field("text", serializers.CharField(max_length=8, min_length=2)),
        _one_field(
            "text_raw", serializers.CharField(required=False, allow_blank=True, allow_null=True, trim_whitespace=False)
        ),
        _one_field("strict_text", StrictCharField(required=False, allow_blank=True)),
        _one_field("strict_int", StrictIntegerField(required=False, min_value=-3, max_value=3)),
        _one_field("int", serializers.IntegerField(required=False, default=lambda: 7)),
        _one_field("strict_float", StrictFloatField(required=False, allow_null=True, max_value=1e6)),
        _one_field("float", serializers.FloatField()),
        _one_field("strict_bool", StrictBooleanField(required=False, default=True)),
        _one_field("bool", serializers.BooleanField(required=False, allow_null=True)),
        _one_field("choice", serializers.ChoiceField(choices=["a", "b", ("c", "see")], allow_blank=True)),
        _one_field("int_choice", serializers.ChoiceField(choices=[(1, "one"), (2, "two")])),
        # Validators on kinds whose conversion needs no check of its own.
        _one_field("limited_choice", serializers.ChoiceField(choices=["a", "bb"], validators=[MaxLengthValidator(1)])),
        _one_field("true_only", serializers.BooleanField(validators=[MinValueValidator(True)])),
        _one_field(
            "strict_list", StrictListField(child=serializers.CharField(max_length=9), allow_empty=False, max_length=2)
        ),
        _one_field("list", serializers.ListField(child=serializers.IntegerField(allow_null=True), required=False)),
        _one_field("date", serializers.DateTimeField(allow_null=True)),
    ]
)


class HookedSerializer(serializers.Serializer):
    """A ``validate_<name>`` method and a ``validate`` that change and refuse."""

    name = serializers.CharField()
    count = StrictIntegerField(required=False)

    def validate_name(self, value):
        if value == "bad":
            raise serializers.ValidationError("not that one")
        return value.upper()

    def validate(self, attrs):
        if attrs.get("count") == -3:
            raise serializers.ValidationError("not -3")
        return {**attrs, "seen": True}


SERIALIZERS = [DispatchInputSerializer, LeaseCompleteApi.InputSerializer, HookedSerializer, *KINDS.values()]

ODD_STRINGS = ["", " ", "  ab ", "x\x00y", "\ud800", "é", "2", "1.5", "true", "abcdefghi", "2030-01-01T00:00:00Z"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=10),
)


def field_values(field) -> st.SearchStrategy:
    """Values a client might send a field, valid ones most of the time:
    anything the plan gets wrong then shows on an input DRF accepts."""
    if isinstance(field, serializers.ChoiceField):
        valid = st.sampled_from([*field.choice_strings_to_values, *field.choices])
    elif isinstance(field, serializers.ListField):
        valid = st.lists(field_values(field.child), max_size=5)
    elif isinstance(field, serializers.CharField):
        valid = st.one_of(
            st.sampled_from(["ab", " ab ", "abc", "b", "bad", "", "s-41", "\ud800", "x\x00"]), st.text(max_size=9)
        )
    elif isinstance(field, serializers.BooleanField):
        valid = st.sampled_from([True, False, "true", 1, 0, "off"])
    elif isinstance(field, serializers.IntegerField):
        valid = st.integers(min_value=-4, max_value=4)
    elif isinstance(field, serializers.FloatField):
        valid = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-4, 4))
    else:
        valid = st.sampled_from(["2030-01-01T00:00:00Z", "2027-01-01T00:00:00Z"])
    return st.one_of(valid, valid, valid, scalars)


def inputs(cls):
    """Objects of the serializer's own fields (each there or not) and one
    it does not have; now and then something else."""
    fields = {name: field_values(field) for name, field in cls().fields.items()}
    whole = st.fixed_dictionaries({}, optional={**fields, "unknown": scalars})
    return st.one_of(whole, whole, whole, st.lists(scalars, max_size=2), scalars)


def _drf(cls, data):
    """DRF's validation of ``data`` on a new instance: what the views ran
    before the plan."""
    try:
        return ("valid", cls().run_validation(data))
    except serializers.ValidationError as exc:
        return ("errors", exc.detail)


def _shared(shared, data):
    try:
        return ("valid", shared.validate(data))
    except serializers.ValidationError as exc:
        return ("errors", exc.detail)


@pytest.mark.parametrize("cls", SERIALIZERS, ids=lambda cls: cls.__qualname__)
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_the_plan_validates_as_drf_does(cls, data):
    sent = data.draw(inputs(cls))
    assert _shared(SharedSerializer(cls), sent) == _drf(cls, sent)


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (DispatchInputSerializer, {"session_id": "s-41"}),
        (DispatchInputSerializer, {"session_id": None, "model": "claude", "exclude_accounts": ["a"], "max_wait_ms": 0}),
        (DispatchInputSerializer, {}),
        (LeaseCompleteApi.InputSerializer, {"outcome": "success", "first_token_ms": 412.5}),
        (LeaseCompleteApi.InputSerializer, {"outcome": "rate_limited", "cooldown_seconds": 30, "proxy_failure": True}),
        (HookedSerializer, {"name": " ab ", "count": 2}),
        (KINDS["strict_list"], {"value": ["x", "y"]}),
        (KINDS["list"], {"value": [1, None]}),
        (KINDS["date"], {"value": None}),
    ],
)
def test_a_gateways_usual_input_is_settled_by_the_plan(cls, data):
    """What gateways send every time does not go through DRF's field walk
    (which the plan is there to save), and comes out as DRF's would."""
    shared = SharedSerializer(cls)
    serializer = shared._build()[0]
    expected = _drf(cls, data)
    with mock.patch.object(serializer, "run_validation", side_effect=AssertionError("DRF was asked")):
        assert ("valid", shared.validate(data)) == expected


def test_what_the_plan_cannot_settle_goes_to_drf():
    """A numeric string, a date, an error: DRF's own validation, with its
    coercion or its error."""
    for cls, data, expected in [
        (KINDS["int"], {"value": "5"}, {"value": 5}),
        (KINDS["date"], {"value": "2030-01-01T00:00:00Z"}, {"value": datetime(2030, 1, 1, tzinfo=UTC)}),
    ]:
        shared = SharedSerializer(cls)
        serializer = shared._build()[0]
        with mock.patch.object(serializer, "run_validation", wraps=serializer.run_validation) as drf:
            assert shared.validate(data) == expected
        assert drf.call_count == 1


def test_the_serializers_own_hooks_run_on_the_plans_result():
    shared = SharedSerializer(HookedSerializer)
    assert shared.validate({"name": " ab "}) == {"name": "AB", "seen": True}
    with pytest.raises(serializers.ValidationError) as refused:
        shared.validate({"name": "bad"})
    assert refused.value.detail == {"name": ["not that one"]}
    with pytest.raises(serializers.ValidationError) as refused:
        shared.validate({"name": "ab", "count": -3})
    assert refused.value.detail == {"non_field_errors": ["not -3"]}


class UnknownField(serializers.Field):
    def to_internal_value(self, data):
        return ("seen", data)

    def to_representation(self, value):
        return f"<{value}>"


class WithUnknownSerializer(serializers.Serializer):
    thing = UnknownField(required=False, allow_null=True)
    name = serializers.CharField()


def test_a_field_the_plan_cannot_convert_sends_its_values_to_drf():
    """Absent or null it is settled like any field; a value is DRF's."""
    shared = SharedSerializer(WithUnknownSerializer)
    serializer = shared._build()[0]
    with mock.patch.object(serializer, "run_validation", wraps=serializer.run_validation) as drf:
        assert shared.validate({"name": "a"}) == {"name": "a"}
        assert shared.validate({"name": "a", "thing": None}) == {"name": "a", "thing": None}
        assert drf.call_count == 0
        assert shared.validate({"name": "a", "thing": 3}) == {"name": "a", "thing": ("seen", 3)}
        assert drf.call_count == 1


class WithEmailSerializer(serializers.Serializer):
    email = serializers.EmailField()


def test_a_field_that_validates_in_its_own_way_leaves_the_serializer_to_drf():
    """A string field other than CharField itself (EmailField checks its
    value its own way): no plan for that serializer at all."""
    shared = SharedSerializer(WithEmailSerializer)
    assert shared._build()[1] is None
    with pytest.raises(serializers.ValidationError):
        shared.validate({"email": "not-an-address"})
    assert shared.validate({"email": "a@b.example"}) == {"email": "a@b.example"}


# --- rendering ---------------------------------------------------------------------------------


def _answer(*, proxy_url, credentials, waited_ms):
    answer = SimpleNamespace(
        lease=SimpleNamespace(id=uuid.uuid4(), expires_at=datetime(2026, 12, 6, 12, 0, 5, 123456, tzinfo=UTC)),
        session="new",
        waited_ms=waited_ms,
        name="kiro-001",
        routing_identity="kiro",
        pool="balanced",
        proxy_url=proxy_url,
        region="us-east-1",
        profile_arn="arn:aws:codewhisperer:us-east-1:0:profile/X",
    )
    if credentials is not None:
        answer.credentials = credentials
    return answer


@settings(max_examples=60, deadline=None)
@given(
    proxy_url=st.one_of(st.none(), st.just("http://egress:3128")),
    credentials=st.one_of(st.none(), st.just({"refresh_token": "t"})),
    waited_ms=st.integers(0, 300_000),
)
def test_the_dispatch_answer_renders_as_drf_renders_it(proxy_url, credentials, waited_ms):
    answer = _answer(proxy_url=proxy_url, credentials=credentials, waited_ms=waited_ms)
    rendered = SharedSerializer(DispatchApi.OutputSerializer).render(answer)
    assert rendered == DispatchApi.OutputSerializer(answer).data
    assert ("credentials" in rendered["account"]) is (credentials is not None)


def test_a_completion_renders_as_drf_renders_it():
    completed = Completed(lease_id=uuid.uuid4(), account_name="kiro-001", outcome="success", session_bound=True)
    serializer = LeaseCompleteApi.OutputSerializer
    assert SharedSerializer(serializer).render(completed) == serializer(completed).data


class Source:
    """Attributes DRF reads in its own ways: a method it calls, a missing
    one with a default, a missing one it may leave out, a mapping."""

    label = "x"
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    nested = {"inner": {"deep": 4}}
    items = [SimpleNamespace(label="a"), SimpleNamespace(label="b")]

    def shout(self):
        return "LOUD"


class ItemSerializer(serializers.Serializer):
    label = serializers.CharField()


class EveryLookUpSerializer(serializers.Serializer):
    label = serializers.CharField()
    shout = serializers.CharField()
    when = serializers.DateTimeField()
    late = serializers.DateTimeField(source="when", format="%Y")
    deep = serializers.IntegerField(source="nested.inner.deep")
    missing_default = serializers.CharField(default="d")
    missing_null = serializers.CharField(allow_null=True)
    missing_optional = serializers.CharField(required=False)
    items = ItemSerializer(many=True)
    me = ItemSerializer(source="*")
    gap = serializers.DurationField(default=timedelta(seconds=3))


def test_every_way_drf_reads_an_attribute_renders_alike():
    shared = SharedSerializer(EveryLookUpSerializer)
    assert shared.render(Source()) == EveryLookUpSerializer(Source()).data


def test_a_missing_required_attribute_fails_as_in_drf():
    class Needy(serializers.Serializer):
        absent = serializers.CharField()

    with pytest.raises(AttributeError) as ours:
        SharedSerializer(Needy).render(SimpleNamespace())
    with pytest.raises(AttributeError) as drfs:
        Needy(SimpleNamespace()).data  # noqa: B018 - the property raises
    assert str(ours.value) == str(drfs.value)


class Trimmed(serializers.Serializer):
    """Validates and renders its own way on top of DRF's."""

    name = serializers.CharField()

    def to_internal_value(self, data):
        return {**super().to_internal_value(data), "trimmed": True}

    def to_representation(self, instance):
        return {**super().to_representation(instance), "shown": True}


class WithTrimmed(serializers.Serializer):
    inner = Trimmed(source="*")


class Doubled(serializers.IntegerField):
    """Reads its value its own way."""

    def get_attribute(self, instance):
        return 2 * super().get_attribute(instance)


class WithDoubled(serializers.Serializer):
    count = Doubled()


def test_a_serializer_with_its_own_validation_or_rendering_keeps_it():
    """A serializer or field replacing a step the plan stands in for is
    run as DRF runs it, its own code included."""
    shared = SharedSerializer(Trimmed)
    assert shared.validate({"name": "a"}) == {"name": "a", "trimmed": True}
    assert shared.render(SimpleNamespace(name="a")) == {"name": "a", "shown": True}
    assert SharedSerializer(WithTrimmed).render(SimpleNamespace(name="a")) == {"inner": {"name": "a", "shown": True}}
    assert SharedSerializer(WithDoubled).render(SimpleNamespace(count=2)) == {"count": 4}
