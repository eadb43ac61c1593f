"""The schema: the migrations say what the models say, and no index repeats
another's leading column (every write pays for an index, and a redundant one
can lead the planner astray)."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connection

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
            # Not the many-to-many tables Django creates itself (a group's
            # accounts): their indexes are Django's, not declared here.
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
