"""Import and export buttons on the pool's admin pages, through
django-import-export, with the rules of ``accounts/onboarding``: the admin's
import is the same all-or-nothing import as ``manage.py pool_import`` (one
kind per file, CSV or JSON), its preview is that import's dry run, and its
export is ``pool_export``'s, without credentials.

The library supplies the pages (upload, preview, confirm, export); the
resources below hand every row to the onboarding import instead of the
library's row-by-row saves, so both ways in validate and write alike.
"""

from __future__ import annotations

import os
import tempfile

from cryptography.fernet import InvalidToken
from django.contrib import messages
from django.core.exceptions import NON_FIELD_ERRORS, SuspiciousOperation, ValidationError
from django.http import HttpResponseRedirect
from django.urls import reverse
from import_export.admin import ImportExportMixin
from import_export.fields import Field
from import_export.formats import base_formats
from import_export.forms import ExportForm
from import_export.resources import Resource
from import_export.results import Error, Result, RowResult
from import_export.tmp_storages import TempFolderStorage
from tablib import Dataset

from accounts.fields import fernet
from accounts.onboarding.columns import Credentials, Names, ProxyUrl
from accounts.onboarding.errors import ImportRejected
from accounts.onboarding.exporter import kind_export
from accounts.onboarding.importer import pool_import
from accounts.onboarding.kinds import KIND_BY_MODEL, Kind
from accounts.onboarding.plans import RowPlan
from accounts.permissions import GRANT_CREDENTIALS_ACCESS

# Errors listed in the admin's message after a failed confirm step.
SHOWN_ERRORS = 10


class SealedTempStorage(TempFolderStorage):
    """The uploaded file waits between the preview and the confirm step
    encrypted with the credentials key, since it may hold credentials.
    Only a file this storage wrote can be read back."""

    def save(self, data):
        payload = data if isinstance(data, bytes) else data.encode(self.encoding or "utf-8")
        handle, path = tempfile.mkstemp(prefix="kiropool-import-")  # mode 0600
        with os.fdopen(handle, "wb") as file:
            file.write(fernet().encrypt(payload))
        self.name = os.path.basename(path)

    def read(self):
        try:
            with open(self.get_full_path(), "rb") as file:
                payload = fernet().decrypt(file.read())
        except (OSError, InvalidToken) as exc:
            raise SuspiciousOperation("The uploaded file is gone or was not stored here; upload it again.") from exc
        return payload if "b" in self.read_mode else payload.decode(self.encoding or "utf-8-sig")


def _display(plan: RowPlan, column) -> str:
    """A preview cell: the value the row will have. Never credentials, nor a
    proxy's password."""
    if isinstance(column, Names):
        return "; ".join(m.name for m in plan.members or ())
    value = getattr(plan.instance, column.field, "")
    return "" if value is None else column.render(str(value))


class PoolResource(Resource):
    """One kind of ``accounts/onboarding``; the subclasses below set ``kind``."""

    kind: Kind
    exporting: bool = False

    @classmethod
    def get_display_name(cls):
        return cls.kind.label

    def get_user_visible_fields(self):
        # What the upload page says a file may hold, or what the export writes.
        columns = self.kind.exported if self.exporting else self.kind.columns
        return [Field(attribute=c.field, column_name=c.name) for c in columns]

    @classmethod
    def shown_columns(cls):
        return [c for c in cls.kind.columns if not isinstance(c, Credentials)]

    def get_diff_headers(self):
        return [c.name for c in self.shown_columns()]

    def import_data(self, dataset, dry_run=False, raise_errors=False, use_transactions=None, **kwargs):
        rows = [
            {header: value for header, value in zip(dataset.headers or (), values, strict=False) if header}
            for values in dataset
        ]
        result = Result()
        result.diff_headers = self.get_diff_headers()
        result.total_rows = len(rows)
        user = kwargs.get("user")
        may_grant = user is not None and user.has_perm(GRANT_CREDENTIALS_ACCESS)
        try:
            report = pool_import({self.kind.key: rows}, dry_run=dry_run, may_grant_credentials=may_grant)
        except ImportRejected as rejected:
            self._rejected(result, [_masked(self.kind, row) for row in rows], rejected)
            return result
        for plan in report.rows:
            row_result = RowResult()
            row_result.import_type = plan.action
            row_result.diff = [_display(plan, c) for c in self.shown_columns()]
            row_result.instance = plan.instance
            row_result.add_instance_info(plan.instance)
            result.increment_row_result_total(row_result)
            result.append_row_result(row_result)
        return result

    @staticmethod
    def _rejected(result: Result, rows: list[dict], rejected: ImportRejected) -> None:
        by_row: dict[int, dict[str, list[str]]] = {}
        for error in rejected.errors:
            if error.row is None:
                result.append_base_error(Error(ImportRejected([error])))
                continue
            by_row.setdefault(error.row, {}).setdefault(error.field or NON_FIELD_ERRORS, []).append(error.message)
        for number, fields in sorted(by_row.items()):
            result.append_invalid_row(number, rows[number - 1] if number <= len(rows) else {}, ValidationError(fields))
            result.totals[RowResult.IMPORT_TYPE_INVALID] += 1

    def export(self, queryset=None, **kwargs):
        columns = [c for c in self.kind.exported]
        dataset = Dataset(headers=[c.name for c in columns])
        for record in kind_export(self.kind, queryset):
            dataset.append([_cell(record[c.name]) for c in columns])
        return dataset


def _masked(kind: Kind, row: dict) -> dict:
    # A refused row is shown back with its cells: a proxy's password masked
    # (credentials are no column of the table).
    columns = kind.by_name
    return {
        name: columns[name].render(value) if isinstance(columns.get(name), ProxyUrl) else value
        for name, value in row.items()
    }


def _cell(value):
    # One cell in every format: a group's accounts as the CSV list the import reads back.
    return "; ".join(value) if isinstance(value, list) else value


class PoolImportExportMixin(ImportExportMixin):
    """Import and export buttons for a pool admin (identities, proxies,
    accounts, groups): ``class AccountAdmin(PoolImportExportMixin, admin.ModelAdmin)``."""

    formats = [base_formats.CSV, base_formats.JSON]
    export_form_class = ExportForm
    tmp_storage_class = SealedTempStorage

    def _pool_resource(self, *, exporting: bool) -> type[PoolResource]:
        kind = KIND_BY_MODEL[self.model]
        name = f"{kind.model.__name__}{'Export' if exporting else 'Import'}Resource"
        return type(name, (PoolResource,), {"kind": kind, "exporting": exporting})

    def get_import_resource_classes(self, request):
        return [self._pool_resource(exporting=False)]

    def get_export_resource_classes(self, request):
        return [self._pool_resource(exporting=True)]

    def has_import_permission(self, request):
        # An import adds and changes rows: it needs both rights.
        return self.has_add_permission(request) and self.has_change_permission(request)

    def has_export_permission(self, request):
        return self.has_view_permission(request)

    def process_result(self, result, request):
        # The confirm step imports for real; if the pool changed since the
        # preview and the import was rejected, say so rather than "0 new".
        if result.has_errors() or result.has_validation_errors():
            lines = [str(e.error) for e in result.base_errors]
            lines += [f"row {row.number}: {row.error_dict}" for row in result.invalid_rows]
            messages.error(request, "Import rejected, nothing was written: " + " · ".join(lines[:SHOWN_ERRORS]))
            return HttpResponseRedirect(reverse("admin:{}_{}_changelist".format(*self.get_model_info())))
        return super().process_result(result, request)
