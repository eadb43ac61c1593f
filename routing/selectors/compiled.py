"""A queryset compiled once per shape and run again with new values.

Compiling the dispatcher's candidates queryset (joins, subqueries, a dozen
expressions) costs Django more than PostgreSQL needs to run it, and it runs on
every dispatch. The queryset stays the specification: it is built with
sentinel values, compiled by Django, and each SQL parameter that came from a
sentinel is remembered as a slot; later runs put the request's values in the
slots and reuse the SQL. A test compiles the same queryset afresh with real
values and checks the SQL and parameters are identical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.db.models import QuerySet


@dataclass(frozen=True, slots=True)
class Sentinel:
    """A value recognizable among a compiled query's parameters."""

    name: str
    value: object
    index: int | None = None  # for one element of a list parameter


def sentinel_values(names: Mapping[str, type], lists: Mapping[str, int]) -> dict[str, object]:
    """One distinct sentinel per named parameter and per list element.

    Strings start with a NUL (no real name or session id contains one),
    numbers are far outside any id or latency, datetimes lie in 1971."""
    values: dict[str, object] = {}
    for n, (name, kind) in enumerate(sorted(names.items()), start=1):
        if kind is str:
            values[name] = f"\x00sentinel:{name}"
        elif kind is int:
            values[name] = -7_000_000_000 - n
        elif kind is float:
            values[name] = -7.0e-300 * n
        elif kind is datetime:
            values[name] = datetime(1971, 1, 1, tzinfo=UTC) + timedelta(microseconds=n)
        else:
            raise TypeError(f"no sentinel for {kind}")
    for name, length in lists.items():
        values[name] = [f"\x00sentinel:{name}:{i}" for i in range(length)]
    return values


def adapt(value):
    """A value as the compiler puts it among the parameters."""
    if isinstance(value, datetime):
        return connection.ops.adapt_datetimefield_value(value)
    return value


class CompiledQuery:
    """``build(values)`` compiled once with sentinels; :meth:`params` fills in real values."""

    def __init__(
        self,
        build: Callable[[Mapping[str, object]], QuerySet],
        sentinels: Mapping[str, object],
        *,
        where_only: bool = False,
    ) -> None:
        queryset = build(sentinels)
        self.query = queryset.query
        compiler = queryset.query.get_compiler(connection=connection)
        # ``where_only``: just the WHERE condition, columns qualified by the
        # table name, for a hand-written statement on that table to reuse.
        self.sql, params = compiler.compile(self.query.where) if where_only else compiler.as_sql()
        lookup: dict[tuple[type, object], tuple[str, int | None]] = {}
        for name, value in sentinels.items():
            if isinstance(value, list):
                for i, item in enumerate(value):
                    lookup[(type(item), item)] = (name, i)
            else:
                adapted = adapt(value)
                lookup[(type(adapted), adapted)] = (name, None)
        # Each parameter is either a slot (name, list index) or a literal kept as compiled.
        self.slots: list[tuple[str, int | None] | None] = []
        self.literals: list[object] = []
        for param in params:
            self.slots.append(lookup.get((type(param), param)) if _hashable(param) else None)
            self.literals.append(param)
        # Column names in the order the SQL selects them, and Django's
        # converters for them (SQLite hands datetimes back as text, for one).
        self.columns = {alias: i for i, (_, _, alias) in enumerate(compiler.select or ())}
        self._converters = compiler.get_converters([col for col, _, _ in compiler.select or ()])
        self._compiler = compiler

    def params(self, values: Mapping[str, object]) -> list[object]:
        # A value fills several slots (``now`` a dozen): adapted once per call,
        # since asking the connection proxy for its ops each time cost more
        # than the rest of building the parameters.
        adapted: dict[str, object] = {}
        out = []
        for slot, literal in zip(self.slots, self.literals, strict=True):
            if slot is None:
                out.append(literal)
                continue
            name, index = slot
            if index is not None:
                out.append(values[name][index])
                continue
            if name not in adapted:
                adapted[name] = adapt(values[name])
            out.append(adapted[name])
        return out

    def fetch(self, values: Mapping[str, object]) -> list[tuple]:
        with connection.cursor() as cursor:
            cursor.execute(self.sql, self.params(values))
            rows = cursor.fetchall()
        if self._converters:
            rows = list(self._compiler.apply_converters(rows, self._converters))
        return rows

    def convert(self, row: tuple) -> tuple:
        """One row as fetched, with Django's converters applied."""
        if not self._converters:
            return tuple(row)
        return tuple(next(iter(self._compiler.apply_converters([row], self._converters))))


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
