"""A queryset compiled once per shape and run again with new values.

Compiling the dispatcher's candidates queryset (joins, subqueries, a dozen
expressions) costs Django more than PostgreSQL needs to run it, and it runs on
every dispatch. The queryset stays the specification: it is built with
sentinel values, compiled by Django, and each SQL parameter that came from a
sentinel is remembered as a slot; later runs put the request's values in the
slots and reuse the SQL. A test compiles the same queryset afresh with real
values and checks the SQL and parameters are identical.

On PostgreSQL with prepared statements, a query built with ``generic=True``
runs on a generic plan: planned once per connection, not on every run. The
values of its ``written`` parameters (integers) are written into the
statement instead of sent, so that plan knows them.
"""

from __future__ import annotations

import re
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
        generic: bool = False,
        written: frozenset[str] = frozenset(),
    ) -> None:
        self.generic = generic
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
                    lookup[_identity(item)] = (name, i)
            else:
                adapted = adapt(value)
                lookup[_identity(adapted)] = (name, None)
        # Each parameter is either a slot (name, list index) or a literal kept as compiled.
        self.slots: list[tuple[str, int | None] | None] = []
        self.literals: list[object] = []
        for param in params:
            self.slots.append(lookup.get(_identity(param)) if _hashable(param) else None)
            self.literals.append(param)
        # The parameters written into the statement, the SQL around them, and
        # the statements written so far (one per combination of values).
        self._written = [i for i, slot in enumerate(self.slots) if slot is not None and slot[0] in written]
        self._sent = [i for i in range(len(self.slots)) if i not in self._written]
        self._pieces = _cut_at_placeholders(self.sql)
        self._statements: dict[tuple[int, ...], str] = {}
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

    def named(self, prefix: str) -> tuple[str, dict[str, object]]:
        """``sql`` for a statement with named parameters, and the constants it
        needs. A value's placeholders become ``%(<name>)s``, filled in by the
        statement's own value of that name (as it is, unadapted: PostgreSQL
        takes datetimes as they are); a constant the compiler sent as a
        parameter becomes ``%(<prefix><i>)s``, and is returned by that name."""
        if self._written or any(slot is not None and slot[1] is not None for slot in self.slots):
            raise ValueError("only a query of single values, none written into its SQL, has a named form")
        names, constants = [], {}
        for i, (slot, literal) in enumerate(zip(self.slots, self.literals, strict=True)):
            if slot is None:
                names.append(f"{prefix}{i}")
                constants[names[-1]] = literal
            else:
                names.append(slot[0])
        *pieces, last = self._pieces
        return "".join(f"{piece}%({name})s" for piece, name in zip(pieces, names, strict=True)) + last, constants

    def statement(self, values: Mapping[str, object]) -> tuple[str, list[object]]:
        """The statement to run with ``values``, and its parameters: ``sql``
        and ``params(values)``, with the written parameters in the SQL."""
        params = self.params(values)
        if not self._written:
            return self.sql, params
        written = tuple(_integer(params[i]) for i in self._written)
        sql = self._statements.get(written)
        if sql is None:
            literal = dict(zip(self._written, written, strict=True))
            sql = "".join(
                piece + (str(literal[i]) if i in literal else "%s") for i, piece in enumerate(self._pieces[:-1])
            )
            sql += self._pieces[-1]
            if len(self._statements) >= MAX_WRITTEN_STATEMENTS:
                self._statements.clear()
            self._statements[written] = sql
        return sql, [params[i] for i in self._sent]

    def fetch(self, values: Mapping[str, object]) -> list[tuple]:
        sql, params = self.statement(values)
        rows = statement_run(sql, params, generic=self.generic)
        if self._converters:
            rows = list(self._compiler.apply_converters(rows, self._converters))
        return rows

    def convert(self, row: tuple) -> tuple:
        """One row as fetched, with Django's converters applied."""
        if not self._converters:
            return tuple(row)
        return tuple(next(iter(self._compiler.apply_converters([row], self._converters))))


def statement_run(sql: str, params, *, generic: bool) -> list[tuple]:
    """Run ``sql`` and return its rows. With ``generic`` (the candidates
    reads), on PostgreSQL with prepared statements, prepare it on its first
    run rather than on psycopg's sixth.

    Such a connection plans every prepared statement once, for any values
    (``plan_cache_mode=force_generic_plan``, kiropool/settings.py), and the
    read is written so that plan is as good as a fresh one (the group's id
    in the SQL, a floor under every expiry condition: ``candidates.py``,
    ``counts.py``). Planned for each run's values, the read spent 1.2-1.8 ms
    planning and 0.4 ms running on 10 accounts; left to psycopg's count, each
    of a fresh connection's first five runs planned it, 17-20 ms each on the
    bench's database. Without prepared statements
    (``DATABASE_PREPARE_THRESHOLD=0``) the statement runs as it is, planned
    on every run.

    The generic plan used to be asked for around each read, with a SET and
    a RESET sent in the read's round trip (psycopg's pipeline mode). As the
    connection's setting instead, a new session's dispatch answered a tenth
    sooner at the median, in four alternated pairs of ``make bench`` runs
    (bench/HISTORY.md, "Generic plans as the connection's setting")."""
    with connection.cursor() as cursor:
        if not generic or not prepares():
            cursor.execute(sql, params)
            return cursor.fetchall()
        client = connection.connection
        threshold, client.prepare_threshold = client.prepare_threshold, 0
        try:
            cursor.execute(sql, params)
        finally:
            client.prepare_threshold = threshold
        return cursor.fetchall()


def prepares() -> bool:
    """PostgreSQL, with prepared statements (``DATABASE_PREPARE_THRESHOLD`` not 0)."""
    return (
        connection.vendor == "postgresql" and connection.settings_dict["OPTIONS"].get("prepare_threshold") is not None
    )


# Statements a query keeps written out (one per group, for the dispatch read).
MAX_WRITTEN_STATEMENTS = 1024


def _cut_at_placeholders(sql: str) -> list[str]:
    """``sql`` cut at its parameter placeholders: n placeholders, n + 1
    pieces (an escaped ``%%`` stays in its piece)."""
    pieces, piece = [], []
    for token in re.split(r"(%%|%s)", sql):
        if token == "%s":
            pieces.append("".join(piece))
            piece = []
        else:
            piece.append(token)
    pieces.append("".join(piece))
    return pieces


def _integer(value: object) -> int:
    """A value to write into SQL: only an integer, never text."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"only an integer is written into a statement, not {type(value).__name__}")
    return value


def _identity(value) -> tuple[type, object]:
    """How a sentinel is recognized among the parameters: by type and value,
    an integer whatever wrapper the driver gave it (psycopg sends a
    ``BigIntegerField``'s value as an ``Int8``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int, int(value)
    return type(value), value


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
