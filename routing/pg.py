"""PostgreSQL one-statement speedups of the hottest writes.

The ORM services in ``routing/slots.py`` and ``completions.py`` are the specification; these do
the same work in one round trip, and the parity suite runs every dispatch,
completion, affinity and concurrency test with them on and off. Each statement
is built from the models' ``_meta`` (table and column names) and from the
same ORM conditions the services use, compiled once:

- :meth:`Statements.claim`: claim a slot on an identity and insert the lease.
- :meth:`Statements.sticky_claim`: the sticky fast path, reading the bound
  account, claiming its identity's slot and inserting the lease.
- :meth:`Statements.complete`: a plain completion: close the lease, release
  the slot, record the latency sample, bind the session, notify waiters.

A statement answers None (or False) when its case does not apply, and the
caller then runs the ORM service, which answers every case.

They run as plain statements, on the connection's generic plans
(``plan_cache_mode=force_generic_plan``, kiropool/settings.py): psycopg
prepares each on its sixth run, and from then on it runs on one plan (a
test checks it does). Before that setting they settled on that plan by
themselves, after five plans made for the values. Asking for it around
each of them instead, with a SET and a RESET, had cost the steady state a
quarter of its dispatch rate: alternating closed-loop runs served 358-390
dispatches and completions a second that way, and 465-570 without
(bench/HISTORY.md).
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, Error, connection, connections
from django.db.models import Model

from accounts.models import ApiKey, KeySlot, RoutingIdentity
from routing import wakeups
from routing.backend import backend
from routing.dispatch import CandidateRow
from routing.models import LatencySample, LatencySnapshot, Lease, LeaseOutcome, SessionBinding
from routing.selectors import candidates, rules
from routing.selectors import dispatch as reads
from routing.selectors.compiled import CompiledQuery, sentinel_values


def table(model: type[Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def column(model: type[Model], field: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(field).column)


@dataclass(frozen=True, slots=True)
class Claim:
    key_full: bool  # the key counts its leases and had no free slot
    leased: bool  # the identity's slot (and the key's) was claimed and the lease inserted


@dataclass(frozen=True, slots=True)
class PlainCompletion:
    account_name: str
    session_bound: bool


class Statements:
    """The statements, built on first use, or by :meth:`warm` before it."""

    def warm(self) -> None:
        """Compile the claims' conditions now rather than on the first claim
        (``routing.leases.dispatch_warm``); touches no database."""
        for reserved in (True, False):
            _claimable(reserved=reserved)
        _complete_sql()

    def claim(self, lease: Lease, *, key_cap: int | None, reserved: bool = True) -> Claim:
        """Claim a slot on ``lease.identity_id`` (counting the slots held for
        waiting sticky sessions, unless not ``reserved``: a bound session's
        own turn) and a free slot of the key (when ``key_cap`` counts its
        leases), and insert ``lease`` holding both; nothing when the identity
        cannot start a lease right now, and then no slot of the key is
        touched (:func:`_claim_sql`)."""
        where = _claimable(reserved=reserved)
        now = lease.started_at
        counted = key_cap is not None
        key = _key_slot_params(lease.api_key_id, key_cap) if counted else []
        skip = _KEY_SLOT_FIELD if counted else frozenset()
        params = [lease.identity_id, *where.params(_claim_values(now)), *key, now, *_lease_values(lease, skip=skip)]
        with connection.cursor() as cursor:
            cursor.execute(_claim_sql(where.sql, key_counted=counted), params)
            *claim, startable = cursor.fetchone()
        # An identity that could not start locked no slot: the key is not full for it.
        return _claim_read(lease, claim, counted=counted and startable)

    def sticky_claim(
        self, *, shape: candidates.Shape, values: Mapping[str, object], lease: Lease, key_cap: int | None
    ) -> tuple[CandidateRow | None, Claim]:
        """The sticky fast path: when the bound account is a candidate, not
        excluded nor a quota probe, its proxy not cooling and its identity
        able to start now, claim the slot (and the key's, when ``key_cap``
        counts them) and insert ``lease`` (its account fields are filled in
        from the bound row). Returns the bound row (None when the session has
        no live binding to a candidate) and what was claimed."""
        bound = reads.compiled(shape)
        bound_sql, bound_params = bound.statement(values)
        where = _claimable(reserved=False)
        now = lease.started_at
        counted = key_cap is not None
        params = [
            *bound_params,
            *where.params(_claim_values(now)),
            *(_key_slot_params(lease.api_key_id, key_cap) if counted else []),
            now,
            *_lease_values(lease, skip=_BOUND_LEASE_FIELDS | (_KEY_SLOT_FIELD if counted else frozenset())),
        ]
        with connection.cursor() as cursor:
            cursor.execute(_sticky_claim_sql(bound_sql, where.sql, key_counted=counted), params)
            row = cursor.fetchone()
        if row is None:
            return None, Claim(key_full=False, leased=False)
        startable, claimed = row[-3], row[-2:]
        # A row that may not be served, or an identity that could not start,
        # locked no slot: the key is not full for it.
        return reads.row_from(row[:-3], bound), _claim_read(lease, claimed, counted=counted and startable)

    def complete(
        self,
        *,
        key: ApiKey,
        lease_id: uuid.UUID,
        outcome: str,
        first_token_ms: float | None,
        error_message: str,
        now: datetime,
        binding_expires_at: datetime,
    ) -> PlainCompletion | None:
        """A success that only releases (the identity's slot and the key's),
        records its sample and binds its session, of a lease of ``key`` that
        is not a quota probe. None when it does not apply (unknown, foreign,
        completed or probe lease): the ORM service then answers."""
        success = outcome == LeaseOutcome.SUCCESS
        values = {
            **_claim_values(now),
            **_slot_freed()[1],
            "outcome": outcome,
            "first_token_ms": first_token_ms,
            "error_message": error_message,
            "lease_id": lease_id,
            "key_id": key.pk,
            "record_sample": success and first_token_ms is not None,
            "bind": success,
            "binding_expires_at": binding_expires_at,
        }
        with connection.cursor() as cursor:
            cursor.execute(_complete_sql(), values)
            row = cursor.fetchone()
        if row is None:
            return None
        return PlainCompletion(account_name=row[0], session_bound=bool(row[1]))


# --- building the statements -----------------------------------------------------


@functools.cache
def _claimable(*, reserved: bool) -> CompiledQuery:
    """``rules.identity_claimable`` as the WHERE condition on the identity table."""
    return CompiledQuery(
        lambda values: RoutingIdentity.objects.filter(
            rules.identity_claimable(values["now"], values["slow_start_seconds"], reserved=reserved)
        ),
        sentinel_values({"now": datetime, "slow_start_seconds": float}, {}),
        where_only=True,
    )


@functools.cache
def _slot_free(*, reserved: bool, plus_leases: int) -> CompiledQuery:
    """``rules.slot_free`` as a condition on the identity table."""
    return CompiledQuery(
        lambda values: RoutingIdentity.objects.filter(
            rules.slot_free(values["now"], values["slow_start_seconds"], reserved=reserved, plus_leases=plus_leases)
        ),
        sentinel_values({"now": datetime, "slow_start_seconds": float}, {}),
        where_only=True,
    )


@functools.cache
def _slot_freed() -> tuple[str, dict[str, object]]:
    """Whether a release freed a slot someone may be waiting for, as SQL on
    the row after the release (the completion's ``RETURNING``), and the
    constants it needs: with the released lease still in flight no slot was
    free for a new session, and now one is, for a new session or a
    returning turn whose slot is held for it. Its values are the
    completion's own ``now`` and ``slow_start_seconds``."""
    full_before, before = _slot_free(reserved=True, plus_leases=1).named("full_before_")
    free_now, after = _slot_free(reserved=False, plus_leases=0).named("free_now_")
    return f"NOT ({full_before}) AND ({free_now})", {**before, **after}


def _claim_values(now: datetime) -> dict[str, object]:
    return {"now": now, "slow_start_seconds": settings.KIROPOOL_SLOW_START_SECONDS}


def _lease_values(lease: Lease, *, skip: frozenset[str] = frozenset()) -> list:
    # The thread's connection itself, not the proxy ``connection``: each
    # attribute the fields ask of the proxy is a thread-local lookup.
    db = connections[DEFAULT_DB_ALIAS]
    return [
        f.get_db_prep_save(getattr(lease, f.attname), db) for f in Lease._meta.concrete_fields if f.name not in skip
    ]


def _lease_columns() -> list[str]:
    return [connection.ops.quote_name(f.column) for f in Lease._meta.concrete_fields]


def _lease_selects(taken: Mapping[str, str]) -> str:
    """The inserted lease's values: ``taken`` (field → SQL) from the
    statement's other parts, a parameter for every other field."""
    return ", ".join(taken.get(f.name, "%s") for f in Lease._meta.concrete_fields)


# The lease column a counted claim fills from the slot it took.
_KEY_SLOT_FIELD = frozenset({"key_slot"})
_KEY_SLOT_TAKEN = {"key_slot": "(SELECT id FROM free_slot)"}


def _claim_read(lease: Lease, row, *, counted: bool) -> Claim:
    slot_id, leased = row
    if leased:
        lease.key_slot_id = slot_id
    return Claim(key_full=counted and slot_id is None, leased=bool(leased))


def _key_slot_params(key_id: int, cap: int) -> list:
    return [key_id, cap, key_id, cap]


def _free_slot_cte() -> str:
    """Lock a free slot of the key numbered below its cap (key id and cap
    are parameters, twice), skipping any another transaction holds locked:
    one key's claims and completions never queue on one row, and a claim
    never waits on a slot, so the identity's row is the only lock it queues
    for. None while a slot at or above the cap is still held (the cap was
    lowered under it), so the key's count never passes the new cap. The
    slot is marked taken only once the identity is claimed
    (:func:`_key_slot_cte`).

    None either unless the statement's ``startable`` found the identity
    able to start, and locked it (:func:`_claim_sql`): the key slot's
    ``UPDATE`` runs whether or not anything is claimed, and would lock a
    slot for a claim that cannot happen (a row lock is a write: the
    statement's commit then waits for a WAL flush, and a concurrent claim
    skips the slot)."""
    slot, pk = table(KeySlot), column(KeySlot, "id")
    key, number, taken = (column(KeySlot, f) for f in ("api_key", "number", "taken"))
    return f"""free_slot AS (
    SELECT {pk} AS id FROM {slot}
     WHERE {key} = %s AND NOT {taken} AND {number} < %s
       AND NOT EXISTS (SELECT FROM {slot} WHERE {key} = %s AND {taken} AND {number} >= %s)
       AND EXISTS (SELECT FROM startable)
     ORDER BY {number} LIMIT 1 FOR UPDATE SKIP LOCKED
)"""


def _key_slot_cte() -> str:
    """Mark the locked free slot taken, once the identity was claimed."""
    slot, pk, taken = table(KeySlot), column(KeySlot, "id"), column(KeySlot, "taken")
    return f"""key_slot AS (
    UPDATE {slot} SET {taken} = true FROM claimed, free_slot WHERE {slot}.{pk} = free_slot.id
)"""


def _claim_ctes(*, key_counted: bool) -> str:
    """What both claim statements run after their ``startable`` (the
    identity's row, locked if it can start): the key's free slot when it
    counts its leases (:func:`_free_slot_cte`), the claim on the identity,
    and the slot marked taken; ends with the comma before the next CTE."""
    identity = table(RoutingIdentity)
    in_flight, last_started, pk = (column(RoutingIdentity, f) for f in ("in_flight", "last_started_at", "id"))
    return f"""{f"{_free_slot_cte()}, " if key_counted else ""}claimed AS (
    UPDATE {identity} SET {in_flight} = {identity}.{in_flight} + 1, {last_started} = %s
      FROM startable{", free_slot" if key_counted else ""}
     WHERE {identity}.{pk} = startable.id
 RETURNING {identity}.{pk} AS id
), {f"{_key_slot_cte()}, " if key_counted else ""}"""


def _slot_taken(*, key_counted: bool) -> str:
    """The key slot a claim took, as the statement's result column."""
    return "(SELECT id FROM free_slot)" if key_counted else "NULL::bigint"


@functools.cache
def _claim_sql(claimable: str, *, key_counted: bool) -> str:
    """Lock the identity's row if it can start a lease (waiting for a
    transaction that holds it, then checking the row as that one left it),
    then take a slot of the key, then claim the identity and insert the
    lease. The identity comes first: a claim that lost its identity to
    another dispatch since the walk read it locks no slot (a concurrent
    dispatch would find the key's last slot taken and get a 429), and a
    claim queued on the identity's row holds none while it waits. Its
    condition is sent once: the row is locked from the check to the
    update."""
    identity, lease, pk = table(RoutingIdentity), table(Lease), column(RoutingIdentity, "id")
    values = _lease_selects(_KEY_SLOT_TAKEN if key_counted else {})
    return f"""
WITH startable AS MATERIALIZED (
    SELECT {identity}.{pk} AS id FROM {identity}
     WHERE {identity}.{pk} = %s AND {claimable}
       FOR NO KEY UPDATE
), {_claim_ctes(key_counted=key_counted)}leased AS (
    INSERT INTO {lease} ({", ".join(_lease_columns())})
    SELECT {values} FROM claimed
 RETURNING 1
)
SELECT {_slot_taken(key_counted=key_counted)}, EXISTS (SELECT FROM leased), EXISTS (SELECT FROM startable)"""


# The lease columns the sticky statement takes from the bound row.
_BOUND_LEASE_FIELDS = frozenset({"account", "account_name", "identity", "proxy_url"})

# Whether the bound row may be served at all (the identity's own state is
# checked on its row as locked, by the claim condition).
_BOUND_SERVABLE = 'NOT bound."excluded" AND NOT bound."proxy_cooling" AND NOT bound."quota_probe"'


@functools.lru_cache(maxsize=1024)  # one per group and shape
def _sticky_claim_sql(bound_sql: str, claimable: str, *, key_counted: bool) -> str:
    """The bound account's row, then as :func:`_claim_sql`: its identity's
    row locked if the bound row may be served and the identity can start,
    a slot of the key only then, the claim and the lease."""
    identity, lease, pk = table(RoutingIdentity), table(Lease), column(RoutingIdentity, "id")
    from_bound = {
        "account": 'bound."id"',
        "account_name": 'bound."name"',
        "identity": "claimed.id",
        "proxy_url": "COALESCE(bound.\"proxy__url\", '')",
    }
    selects = _lease_selects({**from_bound, **(_KEY_SLOT_TAKEN if key_counted else {})})
    return f"""
WITH bound AS ({bound_sql}
), startable AS MATERIALIZED (
    SELECT {identity}.{pk} AS id FROM {identity}, bound
     WHERE {identity}.{pk} = bound."identity_id" AND {_BOUND_SERVABLE} AND {claimable}
       FOR NO KEY UPDATE OF {identity}
), {_claim_ctes(key_counted=key_counted)}leased AS (
    INSERT INTO {lease} ({", ".join(_lease_columns())})
    SELECT {selects}
      FROM claimed JOIN bound ON bound."identity_id" = claimed.id
 RETURNING 1
)
SELECT bound.*, EXISTS (SELECT FROM startable), {_slot_taken(key_counted=key_counted)}, EXISTS (SELECT FROM leased)
  FROM bound"""


@functools.cache
def _complete_sql() -> str:
    lease, identity = table(Lease), table(RoutingIdentity)
    sample, binding = table(LatencySample), table(SessionBinding)
    slot = table(KeySlot)
    k = functools.partial(column, KeySlot)
    L = functools.partial(column, Lease)  # noqa: N806 - short column helpers read like SQL
    i = functools.partial(column, RoutingIdentity)
    s = functools.partial(column, LatencySample)
    b = functools.partial(column, SessionBinding)
    return f"""
WITH done AS (
    UPDATE {lease}
       SET {L("completed_at")} = %(now)s, {L("outcome")} = %(outcome)s,
           {L("first_token_ms")} = %(first_token_ms)s, {L("error_message")} = %(error_message)s
     WHERE {L("id")} = %(lease_id)s AND {L("api_key")} = %(key_id)s
       AND {L("outcome")} = '' AND NOT {L("quota_probe")}  -- open (models.LEASE_OPEN)
 RETURNING {L("identity")} AS identity_id, {L("account")} AS account_id, {L("account_name")} AS account_name,
           {L("proxy_url")} AS proxy_url, {L("session_id")} AS session_id, {L("key_slot")} AS key_slot
), key_released AS (
    UPDATE {slot} SET {k("taken")} = false
      FROM done
     WHERE {slot}.{k("id")} = done.key_slot
 RETURNING 1
), released AS (
    -- The lease, its key slot (key_released is read here), then the
    -- identity: the lock order of every completion and of the reaper. A
    -- success also ends the identity's failure streak (outlier ejection).
    UPDATE {identity} SET {i("in_flight")} = {identity}.{i("in_flight")} - 1,
           {i("failure_streak")} = 0, {i("ejections")} = 0
      FROM done, (SELECT count(*) FROM key_released) AS key
     WHERE {identity}.{i("id")} = done.identity_id
 RETURNING {_slot_freed()[0]} AS slot_freed
), notified AS (
    -- Only a release that frees a slot can wake a dispatch waiting for
    -- one: none was free before it for a new session, counting the slots
    -- held for waiting sticky sessions and the slow start after an ejection
    -- (rules.slot_free), and one is now, for a new session or for a
    -- returning turn whose slot is held. Skipping the rest spares every
    -- process's listener a wake-up.
    SELECT pg_notify('{wakeups.CHANNEL}', '') FROM released WHERE released.slot_freed
), sampled AS (
    INSERT INTO {sample} ({s("account")}, {s("proxy_url")}, {s("first_token_ms")}, {s("recorded_at")})
    SELECT done.account_id, done.proxy_url, %(first_token_ms)s, %(now)s
      FROM done
     WHERE %(record_sample)s AND done.account_id IS NOT NULL
), bound AS (
    INSERT INTO {binding} ({b("api_key")}, {b("session_id")}, {b("account")}, {b("created_at")},
                           {b("updated_at")}, {b("expires_at")})
    SELECT %(key_id)s, done.session_id, done.account_id, %(now)s, %(now)s, %(binding_expires_at)s
      FROM done
     WHERE %(bind)s AND done.session_id <> '' AND done.account_id IS NOT NULL
        ON CONFLICT ({b("api_key")}, {b("session_id")}) DO UPDATE
       SET {b("account")} = EXCLUDED.{b("account")}, {b("updated_at")} = EXCLUDED.{b("updated_at")},
           {b("expires_at")} = EXCLUDED.{b("expires_at")}
 RETURNING 1
)
SELECT done.account_name, (SELECT count(*) FROM bound) > 0, (SELECT count(*) FROM notified)
  FROM done, released"""


def latency_snapshots_lock() -> None:
    """Hold the latency snapshots' table against writers until the current
    transaction ends, waiting for any other: a refresh takes it before it
    reads its samples (``maintenance.latency_snapshot_refresh``), so the next
    one reads only once its snapshot has committed. It holds up no reader,
    and no write of another table (the stats rows, the order table); an
    earlier refresh marking its snapshot's bands whole, or dropping old
    snapshots, waits for it (for the read of the samples: under a second)."""
    with connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLE {table(LatencySnapshot)} IN SHARE ROW EXCLUSIVE MODE")


def lock_timeout_set(timeout: str) -> None:
    """Give up on a row lock after ``timeout`` in the current transaction."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [timeout])


@contextlib.contextmanager
def custom_plans() -> Iterator[None]:
    """Plan the statements run inside for their values (nothing off PostgreSQL).

    kiropool's connections plan a prepared statement once, for any values
    (kiropool/settings.py): right for the dispatcher's statements, written
    for it. Work that reads ranges of big tables, run once a minute, is
    better planned for its values: on a generic plan the latency refresh
    read its hour of samples (360,000 rows, most of the table) through the
    index on their time, in 82-125 ms, against 50 ms for the scan planned
    for the hour's values.

    Outside a transaction the setting lasts until the block ends, even when
    it ends in an error (the block's own error is the one raised). In a
    transaction it is the transaction's, and ends with it."""
    if not backend.postgres:
        yield
        return
    local = connection.in_atomic_block
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('plan_cache_mode', 'force_custom_plan', %s)", [local])
    if local:
        yield
        return
    try:
        yield
    except BaseException:
        with contextlib.suppress(Error), connection.cursor() as cursor:
            cursor.execute("RESET plan_cache_mode")
        raise
    with connection.cursor() as cursor:
        cursor.execute("RESET plan_cache_mode")


# The dispatcher's statements are few and fixed (one per compiled shape), but
# longer than psycopg converts once and caches (4 KB, 50 parameters: a limit
# meant for ORM queries of ever-changing shape, psycopg discussion #628), so
# psycopg would re-parse 7-9 KB of SQL on every dispatch.
STATEMENT_CACHE_LENGTH = 32_768
STATEMENT_CACHE_PARAMS = 512


def statement_cache_widen() -> None:
    """Let psycopg cache the conversion of the dispatcher's long statements."""
    from psycopg import _queries

    if hasattr(_queries, "MAX_CACHED_STATEMENT_LENGTH") and hasattr(_queries, "MAX_CACHED_STATEMENT_PARAMS"):
        _queries.MAX_CACHED_STATEMENT_LENGTH = max(_queries.MAX_CACHED_STATEMENT_LENGTH, STATEMENT_CACHE_LENGTH)
        _queries.MAX_CACHED_STATEMENT_PARAMS = max(_queries.MAX_CACHED_STATEMENT_PARAMS, STATEMENT_CACHE_PARAMS)
