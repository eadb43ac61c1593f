"""The columns of an onboarding file and what a cell may hold.

One set of rules for every source: a JSON document's values, a CSV cell (a
string) and a cell the admin's import read from either. A column absent from
a row keeps what is stored (or the model's default for a new row); a present
but empty cell (``""``, ``null``) means what an operator looking at a
spreadsheet would expect: no proxy, an empty region, no group members; numbers,
booleans, the pool and credentials cannot be empty, so an empty cell keeps
those too (an export, which never carries credentials, imports back without
wiping them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from accounts.proxy_urls import proxy_url_masked

# A cell that changes nothing.
KEEP = object()
# Group members in one CSV cell: a comma would need quoting in every row.
LIST_SEPARATOR = ";"
TRUE_WORDS = frozenset({"true", "1", "yes", "y", "t"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "f"})
# A whole number in a cell: ASCII digits, an optional minus. ``str.isdigit``
# also takes "²" and, after stripping minus signs, "--5", which ``int`` refuses.
WHOLE_NUMBER = re.compile(r"-?[0-9]+")


class CellError(ValueError):
    """A value the column cannot take; the message names no secret."""


def _blank(raw) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _text(raw) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise CellError("must be text")
    text = str(raw).strip()
    # PostgreSQL text cannot hold NUL, and the admin's forms refuse it.
    if "\x00" in text:
        raise CellError("must not contain NUL characters")
    return text


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its name in files, the model field it writes, and the
    lookup an export reads it from (``None``: never exported)."""

    name: str
    field: str
    export: str | None

    def parse(self, raw):
        raise NotImplementedError

    def render(self, value):
        return value


@dataclass(frozen=True, slots=True)
class Text(Column):
    """Text; empty means the empty string (which the model refuses where the
    field cannot be blank)."""

    def parse(self, raw):
        return "" if _blank(raw) else _text(raw)


@dataclass(frozen=True, slots=True)
class ProxyUrl(Text):
    """A proxy's URL: exported with its password masked (as credentials are
    never exported); imported back over the proxy it came from, the masked
    URL keeps the stored one (``accounts/proxy_urls.py``)."""

    def render(self, value):
        return proxy_url_masked(value) if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class Choice(Column):
    """One of the model field's choices (checked by the model); empty keeps."""

    def parse(self, raw):
        return KEEP if _blank(raw) else _text(raw)


@dataclass(frozen=True, slots=True)
class Integer(Column):
    def parse(self, raw):
        if _blank(raw):
            return KEEP
        if isinstance(raw, bool):
            raise CellError("must be a whole number")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str) and WHOLE_NUMBER.fullmatch(raw.strip()):
            return int(raw.strip())
        raise CellError("must be a whole number")


@dataclass(frozen=True, slots=True)
class Boolean(Column):
    def parse(self, raw):
        if _blank(raw):
            return KEEP
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower() if isinstance(raw, str | int) else None
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise CellError("must be true or false")


@dataclass(frozen=True, slots=True)
class Reference(Column):
    """Another pool object, by name; empty means none when ``nullable``."""

    nullable: bool = False

    def parse(self, raw):
        if _blank(raw):
            if self.nullable:
                return None
            raise CellError("is required")
        return _text(raw)


@dataclass(frozen=True, slots=True)
class Names(Column):
    """A list of names: a JSON list, or one cell of names separated by ``;``.
    Order and repeats do not matter: it is a set."""

    def parse(self, raw):
        if _blank(raw):
            return ()
        if isinstance(raw, str):
            items = raw.split(LIST_SEPARATOR)
        elif isinstance(raw, list | tuple):
            items = raw
        else:
            raise CellError(f"must be a list of names (in CSV: names separated by '{LIST_SEPARATOR}')")
        names = []
        for item in items:
            name = _text(item)
            if name and name not in names:
                names.append(name)
        return tuple(names)

    def render(self, value):
        return sorted(value)


@dataclass(frozen=True, slots=True)
class Credentials(Column):
    """A JSON object of upstream secrets (in CSV: its JSON text). Import only.

    Empty keeps what is stored, as the admin's form does. The value never
    appears in an error message."""

    def parse(self, raw):
        if _blank(raw):
            return KEEP
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raise CellError("must be a JSON object (the value is not shown)") from None
        if not isinstance(raw, dict):
            raise CellError("must be a JSON object (the value is not shown)")
        return raw or KEEP
