"""The first two steps of an import: a file becomes one plan per row, read
from the pool and validated in memory, holding no lock and writing nothing
(``importer.py`` writes the plan, or stops here on a dry run).

1. **Read.** The rows named by the file (and the rows it references) are
   loaded by name, a bounded number of queries (one per kind per
   ``LOAD_CHUNK`` names), never the credentials.
2. **Validate.** Each new or changed row goes through the model's own
   ``full_clean`` (field validators, choices, lengths) and its own check
   constraints; unique fields are checked for the whole file at once; a
   reference must name a row of the pool or of the file. Any error rejects
   the file, and every error names its kind, row and field.

Before either, each cell is parsed by its column (``columns.py``), so a value
the column cannot take is reported without a query.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db.models import CheckConstraint, Model, Q

from accounts.models import AccountGroup
from accounts.onboarding.columns import KEEP, CellError, Column, Credentials, Names, ProxyUrl, Reference
from accounts.onboarding.errors import RowErrors
from accounts.onboarding.kinds import GROUPS, KINDS, REFERENCED, STATE_FIELDS, Kind
from accounts.proxy_urls import proxy_url_unmasked

# Names (or ids) in one ``IN (...)`` list: the reads, the unique checks and
# the import's membership deletes all go by chunks of this size.
LOAD_CHUNK = 1000


@dataclass(slots=True)
class RowPlan:
    """One row of the file and what importing it does."""

    kind: Kind
    row: int
    name: str
    raw: Mapping
    instance: Model
    new: bool
    changed: list[str] = field(default_factory=list)  # model fields written on update
    members: list[Model] | None = None  # a group's accounts, when the row sets them
    members_changed: bool = False

    @property
    def action(self) -> str:
        if self.new:
            return "new"
        return "update" if self.changed or self.members_changed else "skip"


@dataclass(slots=True)
class _Parsed:
    row: int
    name: str
    raw: Mapping
    values: dict[str, object]
    bad: set[str]  # columns already reported


def batch_plan(batch: Mapping[str, Sequence[Mapping]]) -> tuple[list[RowPlan], dict[int, dict[int, int]]]:
    """The plan of every row of ``batch`` (see ``pool_import``), in the order
    the kinds are written, and the current members of the file's groups
    (group id → account id → link id), which the write compares against.
    Raises :class:`ImportRejected` with every error found."""
    errors = RowErrors()
    for key in batch:
        if key not in KINDS:
            errors.add(str(key), None, None, f"unknown kind; expected {', '.join(KINDS)}")
    parsed = {key: _parse_rows(kind, batch.get(key) or (), errors) for key, kind in KINDS.items()}
    index, memberships = _load(parsed)
    plans = _plan(parsed, index, memberships, errors)
    errors.raise_if_any()
    return plans, memberships


# --- parse ---------------------------------------------------------------------------


def _parse_rows(kind: Kind, rows, errors: RowErrors) -> list[_Parsed]:
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        errors.add(kind, None, None, "must be a list of rows")
        return []
    columns = kind.by_name
    seen: dict[str, int] = {}
    parsed = []
    for number, raw in enumerate(rows, start=1):
        if not isinstance(raw, Mapping):
            errors.add(kind, number, None, "must be an object of column: value")
            continue
        label = raw.get("name") if isinstance(raw.get("name"), str) else ""
        values, bad = {}, set()
        for column_name, cell in raw.items():
            column = columns.get(column_name)
            if column is None:
                if column_name in STATE_FIELDS:
                    message = "is state the pool keeps itself and is never imported; leave it out"
                else:
                    message = f"is not a column of {kind.key} (columns: {', '.join(columns)})"
                errors.add(kind, number, str(column_name), message, label)
                continue
            try:
                values[column_name] = column.parse(cell)
            except CellError as exc:
                errors.add(kind, number, column_name, str(exc), label)
                bad.add(column_name)
        if "name" not in raw:
            errors.add(kind, number, "name", "is required: rows are matched by name")
            continue
        name = values.get("name")
        if not isinstance(name, str):
            continue
        if name in seen:
            errors.add(kind, number, "name", f"appears twice in the file (first in row {seen[name]})", name)
            continue
        seen[name] = number
        parsed.append(_Parsed(number, name, raw, values, bad))
    return parsed


# --- read ----------------------------------------------------------------------------


def chunks(items: Iterable, size: int = LOAD_CHUNK):
    """``items`` sorted, in lists of at most ``size``, one ``IN (...)`` each:
    sorted, so a file makes the same queries whatever its order, and ids go
    in primary-key order."""
    items = sorted(items)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _loaded_fields(kind: Kind) -> list[str]:
    # Credentials are write-only here too: never decrypted by an import.
    return ["id", *(c.field for c in kind.columns if not isinstance(c, Names | Credentials))]


def _load(parsed: dict[str, list[_Parsed]]) -> tuple[dict[str, dict[str, Model]], dict[int, dict[int, int]]]:
    """The pool rows the file names or references, by kind and name, and the
    current members of the file's groups (group id → account id → link id)."""
    wanted: dict[str, set[str]] = {key: {p.name for p in rows} for key, rows in parsed.items()}
    for key, rows in parsed.items():
        for column in KINDS[key].columns:
            if isinstance(column, Reference | Names):
                target = REFERENCED[column.name].key
                for p in rows:
                    value = p.values.get(column.name)
                    if isinstance(value, str):
                        wanted[target].add(value)
                    elif isinstance(value, tuple):
                        wanted[target].update(value)
    index = {}
    for key, kind in KINDS.items():
        found = {}
        for chunk in chunks(wanted[key]):
            for obj in kind.model.objects.filter(name__in=chunk).only(*_loaded_fields(kind)):
                found[obj.name] = obj
        index[key] = found
    through = AccountGroup.accounts.through
    memberships: dict[int, dict[int, int]] = defaultdict(dict)
    group_ids = [index[GROUPS.key][p.name].pk for p in parsed[GROUPS.key] if p.name in index[GROUPS.key]]
    for chunk in chunks(group_ids):
        for link_id, group_id, account_id in through.objects.filter(accountgroup_id__in=chunk).values_list(
            "id", "accountgroup_id", "account_id"
        ):
            memberships[group_id][account_id] = link_id
    return index, memberships


# --- validate ------------------------------------------------------------------------


class _ConstraintCheck:
    """The models' own check constraints, asked of the database once per
    distinct set of values they read (a check is a query, and a file of 500
    accounts holds two pool values, not 500)."""

    def __init__(self):
        self.seen: dict[tuple, ValidationError | None] = {}

    def errors(self, instance: Model, exclude: set[str]) -> list[tuple[str | None, str]]:
        model = type(instance)
        found = []
        for constraint in model._meta.constraints:
            if isinstance(constraint, CheckConstraint):
                reads = sorted(Q(constraint.condition).referenced_base_fields)
                if exclude.intersection(reads):
                    continue
                key = (model, constraint.name, *(getattr(instance, model._meta.get_field(f).attname) for f in reads))
                if key not in self.seen:
                    self.seen[key] = self._check(constraint, model, instance, exclude)
                error = self.seen[key]
                subject = reads[0] if len(reads) == 1 else None
            else:  # a unique constraint reads other rows: checked row by row
                error = self._check(constraint, model, instance, exclude)
                subject = None
            if error is not None:
                found.extend((subject, message) for message in error.messages)
        return found

    @staticmethod
    def _check(constraint, model, instance, exclude) -> ValidationError | None:
        try:
            constraint.validate(model, instance, exclude=exclude)
        except ValidationError as exc:
            return exc
        return None


def _resolve(index, column: Column, name: str, errors: RowErrors, plan: RowPlan) -> Model | None:
    target = REFERENCED[column.name]
    found = index[target.key].get(name)
    if found is None:
        message = f"no {target.singular} named {name!r} in the pool or the file"
        errors.add(plan.kind, plan.row, column.name, message, plan.name)
    return found


def _plan(parsed, index, memberships, errors: RowErrors) -> list[RowPlan]:
    plans = []
    constraints = _ConstraintCheck()
    for key, kind in KINDS.items():
        model = kind.model
        validated = {"name", *(c.field for c in kind.columns if not isinstance(c, Reference | Names))}
        exclude = {f.name for f in model._meta.concrete_fields if f.name not in validated}
        kind_plans = []
        for p in parsed[key]:
            instance = index[key].get(p.name)
            plan = RowPlan(kind, p.row, p.name, p.raw, instance or model(name=p.name), new=instance is None)
            for column in kind.columns[1:]:
                if column.name in p.bad:
                    continue
                if column.name in p.values:
                    value = p.values[column.name]
                elif plan.new:
                    try:  # a new row: an absent column is an empty cell
                        value = column.parse(None)
                    except CellError as exc:
                        errors.add(kind, p.row, column.name, str(exc), p.name)
                        continue
                else:
                    continue
                if value is not KEEP:
                    _assign(plan, column, value, index, memberships, errors)
            if plan.action == "skip":
                kind_plans.append(plan)
                continue
            # Deferred (stored credentials not given again) stays unread.
            row_exclude = exclude | plan.instance.get_deferred_fields()
            invalid = set()
            try:
                plan.instance.full_clean(exclude=row_exclude, validate_unique=False, validate_constraints=False)
            except ValidationError as exc:
                for field_name, messages in exc.message_dict.items():
                    invalid.add(field_name)
                    for message in messages:
                        errors.add(kind, p.row, None if field_name == NON_FIELD_ERRORS else field_name, message, p.name)
            # A field already refused is not reported again by the constraint that guards it.
            for field_name, message in constraints.errors(plan.instance, row_exclude | invalid):
                errors.add(kind, p.row, field_name, message, p.name)
            kind_plans.append(plan)
            # Rows later in the file may reference this one.
            index[key][p.name] = plan.instance
        _check_unique(kind, kind_plans, validated, errors)
        plans.extend(kind_plans)
    return plans


def _assign(plan: RowPlan, column: Column, value, index, memberships, errors: RowErrors) -> None:
    instance = plan.instance
    if isinstance(column, Names):
        members = [m for m in (_resolve(index, column, n, errors, plan) for n in value) if m is not None]
        current = set(memberships.get(instance.pk, {})) if instance.pk else set()
        plan.members = members
        plan.members_changed = plan.new or any(m.pk is None for m in members) or {m.pk for m in members} != current
        return
    if isinstance(column, Reference):
        target = None if value is None else _resolve(index, column, value, errors, plan)
        if value is not None and target is None:
            return
        current = getattr(instance, instance._meta.get_field(column.field).attname)
        target_pk = target.pk if target is not None else None
        if plan.new or (target is not None and target_pk is None) or target_pk != current:
            setattr(instance, column.field, target)
            plan.changed.append(column.field)
        return
    if isinstance(column, ProxyUrl):  # an exported (masked) URL imported back keeps the stored one
        value = proxy_url_unmasked(value, stored=None if plan.new else instance.url)
    if isinstance(column, Credentials) or plan.new or getattr(instance, column.field) != value:
        # Credentials are never read back to compare: given means written.
        setattr(instance, column.field, value)
        plan.changed.append(column.field)


def _check_unique(kind: Kind, plans: list[RowPlan], validated: set[str], errors: RowErrors) -> None:
    """Unique fields other than the name (the name is the key), for the whole
    file at once: against each other, and against the rows the file does not name."""
    model = kind.model
    for model_field in model._meta.concrete_fields:
        if not model_field.unique or model_field.primary_key or model_field.name == "name":
            continue
        if model_field.name not in validated:
            continue
        final = {p.name: getattr(p.instance, model_field.attname) for p in plans}
        touched = [p for p in plans if p.action != "skip" and model_field.name in p.changed]
        changing = {p.name for p in touched}
        # Who keeps a value: a row that does not change it, else the first row that sets it.
        holders: dict[object, str] = {}
        for p in sorted(plans, key=lambda p: p.name in changing):
            holders.setdefault(final[p.name], p.name)
        taken = {}
        for chunk in chunks({final[p.name] for p in touched}):
            taken.update(
                model.objects.filter(**{f"{model_field.name}__in": chunk})
                .exclude(name__in=list(final))
                .values_list(model_field.name, "name")
            )
        for p in touched:
            value = final[p.name]
            if holders[value] != p.name or value in taken:
                message = p.instance.unique_error_message(model, (model_field.name,)).messages[0]
                errors.add(kind, p.row, model_field.name, message, p.name)
