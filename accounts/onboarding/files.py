"""The two file shapes.

**JSON**: one document holds any of the four kinds::

    {"version": 1,
     "identities": [{"name": "kiro-alice", "max_concurrency": 2}],
     "proxies":    [{"name": "egress-eu", "url": "http://10.0.0.5:3128"}],
     "accounts":   [{"name": "alice-1", "identity": "kiro-alice", "proxy": "egress-eu",
                     "credentials": {"refresh_token": "..."}}],
     "groups":     [{"name": "team-a", "accounts": ["alice-1"]}]}

**CSV**: one file per kind, a header row of column names, the kind named by
the file (``accounts.csv``, ``accounts-2024-06.csv``) or by ``--kind``. A
group's accounts are one cell of names separated by ``;``; credentials are the
JSON text of the object.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime

from accounts.onboarding.columns import LIST_SEPARATOR
from accounts.onboarding.errors import ImportRejected, RowError
from accounts.onboarding.kinds import KINDS, Kind

VERSION = 1
DOCUMENT_KEYS = frozenset({"version", "exported_at", *KINDS})
# The kind a CSV file holds, from the first word of its name (plural or singular).
FILE_WORDS = {
    **{key: key for key in KINDS},
    "identity": "identities",
    "proxy": "proxies",
    "account": "accounts",
    "group": "groups",
}


def _reject(kind: str, message: str, row: int | None = None) -> ImportRejected:
    return ImportRejected([RowError(kind, row, None, message)])


def document_read(text: str) -> dict[str, list]:
    """A JSON document as ``{kind: rows}``; a malformed document is rejected
    as a whole before any row is looked at."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise _reject("file", f"is not valid JSON: {exc}") from None
    if not isinstance(document, Mapping):
        raise _reject("file", f"must be a JSON object with any of: {', '.join(KINDS)}")
    unknown = sorted(str(k) for k in document if k not in DOCUMENT_KEYS)
    if unknown:
        expected = ", ".join(sorted(DOCUMENT_KEYS))
        raise _reject("file", f"unknown key(s) {', '.join(unknown)}; expected any of: {expected}")
    if document.get("version", VERSION) != VERSION:
        raise _reject("file", f"version {document.get('version')!r} is not supported (this kiropool reads {VERSION})")
    return {key: document[key] for key in KINDS if key in document}


def document_write(batch: Mapping[str, Sequence[Mapping]], *, exported_at: datetime) -> str:
    document = {"version": VERSION, "exported_at": exported_at.isoformat(timespec="seconds"), **batch}
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def csv_read(text: str, kind: Kind) -> list[dict]:
    """The rows of one CSV file; every cell a string, typed by the import."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    if not reader.fieldnames:
        raise _reject(kind.key, "the CSV file is empty: it needs a header row of column names")
    blank = [i + 1 for i, name in enumerate(reader.fieldnames) if not name.strip()]
    if blank:
        raise _reject(kind.key, f"header column(s) {blank} have no name")
    rows = []
    for number, row in enumerate(reader, start=1):
        if None in row:
            raise _reject(kind.key, "has more cells than the header has columns", row=number)
        rows.append({name.strip(): value for name, value in row.items() if value is not None})
    return rows


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return f"{LIST_SEPARATOR} ".join(value)
    return str(value)


def csv_write(kind: Kind, rows: Sequence[Mapping]) -> str:
    out = io.StringIO()
    columns = [c.name for c in kind.exported]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    return out.getvalue()


def csv_kind(file_name: str) -> str | None:
    """``accounts.csv``, ``Accounts-2024.csv``, ``proxy_list.csv`` → the kind; else None."""
    stem = re.split(r"[/\\]", file_name)[-1]
    first = re.split(r"[^a-z]+", stem.lower(), maxsplit=1)[0]
    return FILE_WORDS.get(first)
