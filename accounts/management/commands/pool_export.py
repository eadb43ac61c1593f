"""Export the pool's routing identities, proxies, accounts and groups in the
shape ``pool_import`` takes back: operator-editable fields only, references by
name, never credentials nor the dispatcher's state.

    manage.py pool_export > pool.json
    manage.py pool_export --format csv --kind accounts > accounts.csv
    manage.py pool_export --format csv --output exported/      # one file per kind
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from accounts.onboarding.exporter import pool_export
from accounts.onboarding.files import csv_write, document_write
from accounts.onboarding.kinds import KINDS


class Command(BaseCommand):
    help = "Export the pool (no credentials) as one JSON document or CSV files, ready for pool_import."

    def add_arguments(self, parser):
        parser.add_argument("--format", choices=["json", "csv"], default="json")
        parser.add_argument("--kind", action="append", choices=list(KINDS), help="only these kinds (repeatable)")
        parser.add_argument(
            "--output", help="a file (JSON, or CSV of one kind), or for CSV a folder for one file per kind"
        )

    def handle(self, *args, format: str, kind: list[str] | None, output: str | None, **options):
        kinds = [k for k in KINDS if not kind or k in kind]
        batch = pool_export(kinds)
        if format == "json":
            self._emit(document_write(batch, exported_at=timezone.now()), output)
        elif len(kinds) == 1 and not (output and Path(output).is_dir()):
            self._emit(csv_write(KINDS[kinds[0]], batch[kinds[0]]), output)
        else:
            if not output:
                raise CommandError("CSV holds one kind per file: give one --kind, or --output FOLDER")
            folder = Path(output)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for key in kinds:
                    (folder / f"{key}.csv").write_text(csv_write(KINDS[key], batch[key]), encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"{output}: cannot write the CSV files there ({exc})") from None
            self.stderr.write(f"wrote {', '.join(f'{k}.csv' for k in kinds)} to {folder}")
        counts = ", ".join(f"{len(batch[k])} {k}" for k in kinds)
        self.stderr.write(f"exported {counts}")

    def _emit(self, text: str, output: str | None) -> None:
        if output:
            try:
                Path(output).write_text(text, encoding="utf-8")
            except OSError as exc:
                raise CommandError(f"{output}: cannot write it ({exc})") from None
        else:
            self.stdout.write(text, ending="")
