"""Import routing identities, proxies, accounts and groups from JSON or CSV
files, all or nothing (see ``accounts/onboarding``).

    manage.py pool_import pool.json
    manage.py pool_import identities.csv proxies.csv accounts.csv --dry-run
    manage.py pool_import - --format csv --kind accounts < accounts.csv

Every file given is one batch: one bad row anywhere rejects all of them, and
each error names the kind, the row and the field. Exit status 1 then."""

from __future__ import annotations

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from accounts.onboarding.errors import ImportRejected
from accounts.onboarding.files import csv_kind, csv_read, document_read
from accounts.onboarding.importer import pool_import
from accounts.onboarding.kinds import KINDS


class Command(BaseCommand):
    help = "Create and update the pool from JSON or CSV files by name, all or nothing; credentials stored encrypted."

    def add_arguments(self, parser):
        parser.add_argument("files", nargs="+", metavar="FILE", help="a JSON document, or CSV files; - reads stdin")
        parser.add_argument("--format", choices=["json", "csv"], help="default: from each file's extension")
        parser.add_argument("--kind", choices=list(KINDS), help="what a CSV file holds, when its name does not say")
        parser.add_argument("--dry-run", action="store_true", help="validate everything, write nothing")

    def handle(self, *args, files: list[str], format: str | None, kind: str | None, dry_run: bool, **options):
        try:
            batch = self._read(files, format, kind)
            report = pool_import(batch, dry_run=dry_run)
        except ImportRejected as rejected:
            for error in rejected.errors:
                self.stderr.write(f"  {error}")
            if rejected.total > len(rejected.errors):
                self.stderr.write(f"  … and {rejected.total - len(rejected.errors)} more")
            raise CommandError(f"import rejected, nothing was written: {rejected.total} error(s)") from None
        prefix = "dry run, nothing written: would import" if dry_run else "imported"
        self.stdout.write(self.style.SUCCESS(f"{prefix} {report.summary()}"))

    def _read(self, files: list[str], fmt: str | None, kind: str | None) -> dict[str, list]:
        batch: dict[str, list] = {}
        for name in files:
            file_format = fmt or (Path(name).suffix.lower().lstrip(".") if name != "-" else "")
            if file_format not in ("json", "csv"):
                raise CommandError(f"{name}: say --format json or csv (the name does not tell)")
            text = self._text(name)
            if file_format == "json":
                found = document_read(text)
            else:
                file_kind = kind or csv_kind(name)
                if file_kind is None:
                    raise CommandError(
                        f"{name}: which kind does it hold? Name it after one ({', '.join(KINDS)}) or give --kind"
                    )
                found = {file_kind: csv_read(text, KINDS[file_kind])}
            for key, rows in found.items():
                if key in batch:
                    raise CommandError(f"{key} come from two files; put them in one so rows are numbered once")
                batch[key] = rows
        return batch

    @staticmethod
    def _text(name: str) -> str:
        if name == "-":
            return sys.stdin.read()
        try:
            return Path(name).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"{name}: cannot read it ({exc})") from None
