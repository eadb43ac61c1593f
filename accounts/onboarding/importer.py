"""Bulk import of the pool: create and update identities, proxies, accounts and
groups by name, all or nothing.

Three steps, so the import never holds a lock while it thinks. The first two,
**read** the rows the file names and **validate** every new or changed row in
memory, make a plan (``plans.py``): any error rejects the file before a single
write, and a dry run stops there, writing nothing and taking no lock. The
third is here:

3. **Write**, in one transaction, in batches of ``BATCH_SIZE``: inserts for
   new rows, and for existing rows an ``UPDATE`` of only the fields that
   changed (``bulk_update(fields=...)``), so the counters the dispatcher
   keeps on the same rows (in-flight, binding rows, last started) are never
   written, and unchanged rows are not touched at all.

If the pool changes between the plan and the write in a way the database
refuses (a name created meanwhile, a referenced row deleted), the transaction
rolls back and the import is rejected as a whole, asking to run it again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from django.db import DatabaseError, transaction
from django.db.models import Model

from accounts.models import Account, AccountGroup
from accounts.onboarding.errors import ImportRejected, RowError, RowErrors
from accounts.onboarding.kinds import KINDS
from accounts.onboarding.plans import RowPlan, batch_plan, chunks
from accounts.permissions import credentials_keys_by_group, credentials_reach_refusal
from accounts.signals import pool_changed

BATCH_SIZE = 500


@dataclass(slots=True)
class ImportReport:
    """What an import wrote, or on a dry run would write: one plan per row."""

    dry_run: bool
    rows: list[RowPlan]

    def counts(self, kind: str) -> dict[str, int]:
        counts = {"new": 0, "update": 0, "skip": 0}
        for plan in self.rows:
            if plan.kind.key == kind:
                counts[plan.action] += 1
        return counts

    def summary(self) -> str:
        parts = []
        for key in KINDS:
            c = self.counts(key)
            if sum(c.values()):
                parts.append(f"{key}: {c['new']} new, {c['update']} updated, {c['skip']} unchanged")
        return "; ".join(parts) or "nothing to import"


def pool_import(
    batch: Mapping[str, Sequence[Mapping]], *, dry_run: bool = False, may_grant_credentials: bool = True
) -> ImportReport:
    """Import ``{"identities": [...], "proxies": [...], "accounts": [...],
    "groups": [...]}`` (any subset); each row a mapping of column → value.
    Raises :class:`ImportRejected` with every error found; writes nothing
    then, and nothing either when ``dry_run``. Without
    ``may_grant_credentials`` (an admin user without
    ``accounts.grant_credentials_access``; the shell has it) a group row may
    not add accounts to a group that a key with credentials access uses."""
    plans, memberships = batch_plan(batch)
    if not may_grant_credentials:
        _credentials_reach_check(plans, memberships)
    report = ImportReport(dry_run=dry_run, rows=plans)
    if not dry_run and any(p.action != "skip" for p in plans):
        try:
            _write(plans, memberships)
        except DatabaseError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ImportRejected(
                [
                    RowError(
                        "pool",
                        None,
                        None,
                        f"the pool changed while the file was imported ({first_line}); "
                        "nothing was written, run the import again",
                    )
                ]
            ) from exc
    return report


def _credentials_reach_check(plans: list[RowPlan], memberships: dict[int, dict[int, int]]) -> None:
    widened = {
        p.instance.pk: p
        for p in plans
        if p.members is not None and not p.new and {m.pk for m in p.members} - set(memberships.get(p.instance.pk, {}))
    }
    errors = RowErrors()
    keys_by_group = credentials_keys_by_group(widened) if widened else {}
    for group_id, keys in keys_by_group.items():
        plan = widened[group_id]
        errors.add(plan.kind, plan.row, "accounts", credentials_reach_refusal(keys), plan.name)
    errors.raise_if_any()


# --- 3. write ----------------------------------------------------------------------------


def _write(plans: list[RowPlan], memberships: dict[int, dict[int, int]]) -> None:
    with transaction.atomic():
        for kind in KINDS.values():
            rows = [p for p in plans if p.kind is kind]
            kind.model.objects.bulk_create([p.instance for p in rows if p.new], batch_size=BATCH_SIZE)
            by_fields: dict[tuple[str, ...], list[Model]] = defaultdict(list)
            for p in rows:
                if not p.new and p.changed:
                    by_fields[tuple(sorted(p.changed))].append(p.instance)
            for fields, objects in by_fields.items():
                # Row locks in primary-key order, like every other writer.
                objects.sort(key=lambda o: o.pk)
                if kind.model.objects.bulk_update(objects, fields, batch_size=BATCH_SIZE) != len(objects):
                    raise DatabaseError(f"some {kind.label} were deleted meanwhile")
        _write_members([p for p in plans if p.members is not None and p.members_changed], memberships)
        if plans:
            # Bulk writes send no post_save: new accounts, raised limits.
            pool_changed.send(sender=Account)


def _write_members(plans: list[RowPlan], memberships: dict[int, dict[int, int]]) -> None:
    through = AccountGroup.accounts.through
    stale, added = [], []
    for p in plans:
        current = memberships.get(p.instance.pk, {})
        desired = {m.pk for m in p.members}
        stale.extend(link for account_id, link in current.items() if account_id not in desired)
        added.extend(
            through(accountgroup_id=p.instance.pk, account_id=account_id)
            for account_id in sorted(desired)
            if account_id not in current
        )
    for chunk in chunks(stale):
        through.objects.filter(id__in=chunk).delete()
    through.objects.bulk_create(added, batch_size=BATCH_SIZE)
