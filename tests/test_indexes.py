"""The schema: the migrations say what the models say, and no index repeats
another's leading column (every write pays for an index, and a redundant one
can lead the planner astray)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from routing.dispatch import DispatchRequest
from routing.models import SessionBinding
from routing.selectors import dispatch as reads
from tests.factories import AccountFactory, ApiKeyFactory

pytestmark = pytest.mark.django_db

OWN_APPS = ("accounts", "routing")


def test_the_migrations_are_what_the_models_say():
    # Exits non-zero (SystemExit) when a model change has no migration.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def _full_indexes(model, constraints: dict) -> dict[str, list[str]]:
    """The table's unconditional indexes and unique constraints: name → columns.

    Django's introspection does not report a partial index's condition, so
    the model's conditional indexes are left out by name: they cover only
    some rows, and a full index on their leading column is not redundant."""
    partial = {index.name for index in model._meta.indexes if index.condition is not None}
    partial |= {c.name for c in model._meta.constraints if getattr(c, "condition", None) is not None}
    return {
        name: c["columns"]
        for name, c in constraints.items()
        if (c["index"] or c["unique"]) and not c["primary_key"] and name not in partial and c["columns"]
    }


def test_no_index_is_the_leading_column_of_another():
    redundant = []
    with connection.cursor() as cursor:
        for app in OWN_APPS:
            for model in apps.get_app_config(app).get_models(include_auto_created=False):
                constraints = connection.introspection.get_constraints(cursor, model._meta.db_table)
                indexes = _full_indexes(model, constraints)
                for name, columns in indexes.items():
                    if len(columns) != 1 or constraints[name]["unique"]:
                        continue
                    covering = [
                        other
                        for other, cols in indexes.items()
                        if other != name and len(cols) > 1 and cols[0] == columns[0]
                    ]
                    if covering:
                        redundant.append(f"{model._meta.db_table}.{name} (covered by {', '.join(covering)})")
    assert redundant == []


def test_a_new_sessions_binding_lookup_uses_the_key_and_session_id_index(postgres_only):
    """Statistics taken before a key's sessions arrived (the normal state of
    a busy key between two ANALYZE runs) must not turn the (key, session id)
    lookup of every new-session dispatch into a scan of the key's bindings:
    with a one-column index on the key beside the unique (key, session id)
    one, PostgreSQL chose the former and filtered 3,000 rows on a bench key."""
    busy, quiet = ApiKeyFactory(), ApiKeyFactory()
    accounts = AccountFactory.create_batch(4)
    now = timezone.now()

    def bind(key, count):
        SessionBinding.objects.bulk_create(
            SessionBinding(
                api_key=key,
                session_id=f"{key.pk}-{i}",
                account=accounts[i % len(accounts)],
                created_at=now,
                updated_at=now,
                expires_at=now + timedelta(hours=1),
            )
            for i in range(count)
        )

    bind(quiet, 2_000)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {SessionBinding._meta.db_table}")
    bind(busy, 3_000)  # after the statistics: the planner believes it has none

    shape, values = reads.request_shape(
        key=busy, request=DispatchRequest(session_id="a-new-one"), now=now, snapshot=None, spread=True, head=True
    )
    query = reads.compiled(shape)
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + query.sql, query.params(values))
        (plan,) = cursor.fetchone()
    plan = plan if isinstance(plan, list) else json.loads(plan)

    lookups = [
        node
        for node in _nodes(plan[0]["Plan"])
        if node.get("Relation Name") == SessionBinding._meta.db_table and "session_id" in json.dumps(node)
    ]
    assert lookups, "the read looks the session's binding up"
    for node in lookups:
        assert "session_id" in node.get("Index Cond", ""), node
        assert "session_id" not in node.get("Filter", ""), node
    assert len(query.fetch(values)) == 4


def _nodes(node: dict):
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)
