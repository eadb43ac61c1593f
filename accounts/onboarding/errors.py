"""What a rejected import says: each error names its kind, row and field, and
the rejection carries every error found (up to ``MAX_ERRORS``, the rest
counted), in the order the kinds are written.

The import's plan (``plans.py``) collects its errors here, and a file that
cannot be read at all (``files.py``) is rejected in the same shape, so the
management command and the admin report every rejection the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from accounts.onboarding.kinds import KINDS, Kind

# Past this many, the rest of the errors are only counted: the first ones
# are what an operator fixes first.
MAX_ERRORS = 100


@dataclass(frozen=True, slots=True)
class RowError:
    """What is wrong, and where: ``row`` counts the kind's records from 1 (in
    a CSV file, the line after the header is row 1)."""

    kind: str
    row: int | None
    field: str | None
    message: str
    name: str = ""

    def __str__(self) -> str:
        where = self.kind if self.row is None else f"{self.kind} row {self.row}"
        if self.name:
            where += f" ({self.name!r})"
        return f"{where}, field {self.field!r}: {self.message}" if self.field else f"{where}: {self.message}"


class ImportRejected(Exception):
    """The file was not imported; nothing was written."""

    def __init__(self, errors: Sequence[RowError], *, total: int | None = None):
        self.errors = list(errors)
        self.total = total if total is not None else len(self.errors)
        super().__init__(f"import rejected, nothing was written: {self.total} error(s); first: {self.errors[0]}")


class RowErrors:
    """The errors of one import as they are found: every one is counted, the
    first ``MAX_ERRORS`` are kept, and ``raise_if_any`` rejects the file with
    them in kind order (errors that name no kind first), then row order."""

    def __init__(self):
        self.errors: list[RowError] = []
        self.total = 0

    def add(self, kind: Kind | str, row: int | None, field_name: str | None, message: str, name: str = "") -> None:
        self.total += 1
        if len(self.errors) < MAX_ERRORS:
            key = kind if isinstance(kind, str) else kind.key
            self.errors.append(RowError(key, row, field_name, str(message), name))

    def raise_if_any(self) -> None:
        if self.errors:
            order = list(KINDS)
            self.errors.sort(key=lambda e: (order.index(e.kind) if e.kind in order else -1, e.row or 0))
            raise ImportRejected(self.errors, total=self.total)
