"""Bounded waiting: who may wait for a slot in this process, and in what order.

A dispatch that finds every candidate only locally throttled waits for a
slot (SPEC §2), holding a server thread while it does. Unbounded, a handful of
gateways waiting on one full identity would take every thread, and the
completions that free the slots would queue behind them. So:

- a process admits at most ``KIROPOOL_MAX_WAITERS`` waiting dispatches, and
  one API key at most ``KIROPOOL_MAX_WAITERS_PER_KEY`` of them; beyond that a
  dispatch is answered 429 at once with ``Retry-After``. The server's threads
  beyond the cap are kept for everything else: completions, probes, the
  admin, other keys (``kiropool/serve.py`` sizes the threads to match);
- a key's attempts read the head of the order in turns, one at a time in a
  process (:meth:`Visit.turn`), and then claim side by side, each on an
  identity no other attempt of the key here is claiming on
  (:class:`Claims`); the first it takes is taken before the turn passes
  on. Concurrent attempts that read the same head
  fought over the same identity rows: in a burst of new sessions (the
  open-loop benchmark after a hiccup) that cost 1.5 head reads and 3.2
  claim statements per lease granted, and the extra work kept the queue
  from draining. Claiming in turns too stopped that, but then a dispatch
  waited for every claim before it: 37 % of the time of dispatches slower
  than 30 ms in the open loop went to that wait. An identity another
  attempt is claiming on is starting a lease, and the order puts a fresh
  start behind identities that started earlier; when every ready row of
  the head is one, the attempt reads again once those claims are through;
- waiting dispatches of one key re-try in the order they started waiting:
  when a release wakes them, the oldest looks first, then the next. A waiter
  woken a moment before an older one (threads wake in no set order) lets the
  older one go first, and so does one woken while an older one is still in
  an attempt that read the pool before the release (it will find the slot
  taken and ask for its turn again). A dispatch that has not waited yet takes its turn after
  the waiters asking for one, not behind those still asleep: it may take a
  slot freed at that instant;
- across processes and hosts, on PostgreSQL, a waiting dispatch holds a
  ticket (``WaitTicket``, an unlogged row taken when it starts waiting and
  deleted when it stops), whose id is its place in the key's one queue.
  When a release wakes them, a process's oldest waiter of the key that
  finds an older ticket in another process gives that one
  ``KIROPOOL_WAIT_ORDER_GRACE_MS`` to take the slot before it looks
  itself. Every process's waiters wake at once, so without it the slot
  went to whichever looked first. A head start, not a lock: an older
  waiter that cannot use the slot (it waits for its bound account, or
  excludes this one), or whose process died, costs the younger ones that
  grace per release, never the slot;
- a waiting dispatch hands its pooled database connection back for the wait
  (``KIROPOOL_DB_POOL_SIZE`` connections per process serve all its threads),
  so waiters never hold the connections the completions need.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from core.errors import RateLimited
from routing import wakeups
from routing.backend import backend
from routing.models import WaitTicket

logger = logging.getLogger(__name__)

# A ticket outlives the longest wait it stands for by this much before it
# stops counting (a process that died with it never deletes it).
TICKET_MARGIN = timedelta(seconds=10)


class WaitingRoom:
    """``across_processes``: its waiters hold wait tickets (the server's
    room; a room built for a test orders its own threads only)."""

    def __init__(self, *, across_processes: bool = False) -> None:
        self.across_processes = across_processes
        self._cond = threading.Condition()
        self._waiting = 0
        self._seq = itertools.count()
        self._queues: dict[int, list[int]] = {}  # key id → seqs asking for a turn (a heap)
        self._busy: set[int] = set()  # keys whose waiter is taking its turn now
        self._sleepers: dict[int, dict[int, int]] = {}  # key id → {seq: token} of waiters asleep or past their turn
        self._claiming: dict[int, set[int]] = {}  # key id → identity ids its attempts are claiming on
        self._admitted: dict[int, set[int]] = {}  # key id → seqs of its waiters here

    def visit(self, *, key_id: int, max_wait_ms: int = 300_000) -> Visit:
        return Visit(self, key_id, max_wait_ms=max_wait_ms)

    def _admit(self, key_id: int) -> int:
        with self._cond:
            if self._waiting >= settings.KIROPOOL_MAX_WAITERS:
                raise RateLimited(
                    "too many dispatches are waiting for a slot on this server; retry shortly", retry_after=1
                )
            admitted = self._admitted.setdefault(key_id, set())
            if len(admitted) >= settings.KIROPOOL_MAX_WAITERS_PER_KEY:
                raise RateLimited(
                    "too many dispatches of this API key are waiting for a slot; retry shortly", retry_after=1
                )
            self._waiting += 1
            seq = next(self._seq)
            admitted.add(seq)
            return seq

    def _leave(self, key_id: int, seq: int) -> None:
        with self._cond:
            self._awake(key_id, seq)
            self._waiting -= 1
            admitted = self._admitted[key_id]
            admitted.discard(seq)
            if not admitted:
                del self._admitted[key_id]

    def _oldest_here(self, key_id: int, seq: int) -> bool:
        """Whether ``seq`` is the oldest of the key's waiters in this process."""
        with self._cond:
            return min(self._admitted.get(key_id, (seq,))) == seq

    def _asleep(self, key_id: int, seq: int, token: int) -> None:
        """A waiter goes to sleep until a release after ``token``, or its turn
        ended and the rest of its attempt began at ``token``. It counts as
        asleep until it asks for its turn or leaves, so a younger waiter woken
        first by a release after ``token`` lets it go first: one woken first,
        and one still in an attempt that read the pool before the release
        (it will find the slot taken and look again)."""
        with self._cond:
            self._sleepers.setdefault(key_id, {})[seq] = token

    def _awake(self, key_id: int, seq: int) -> None:
        sleepers = self._sleepers.get(key_id, {})
        sleepers.pop(seq, None)
        if not sleepers:
            self._sleepers.pop(key_id, None)
        self._cond.notify_all()

    def _older_due(self, key_id: int, seq: int) -> bool:
        """An older waiter of this key, asleep or past its turn, is already
        due to look again: a release moved past its token."""
        now = wakeups.current()
        return any(older < seq and token != now for older, token in self._sleepers.get(key_id, {}).items())

    @contextmanager
    def _turn(self, key_id: int, seq: int | None, lend: Callable[[], None], token: int | None) -> Iterator[None]:
        """One claim attempt of the key at a time; ``lend`` runs once before
        this one has to wait for its turn. A waiter's attempt that took
        ``token`` before its read counts as asleep at it once its turn is
        over (:meth:`_asleep`)."""
        with self._cond:
            if seq is None:
                # Not a waiter: after the turn in progress and the waiters
                # asking for one, not behind waiters still asleep.
                def blocked() -> bool:
                    return key_id in self._busy or bool(self._queues.get(key_id))
            else:
                queue = self._queues.setdefault(key_id, [])
                heapq.heappush(queue, seq)
                self._awake(key_id, seq)

                def blocked() -> bool:
                    return queue[0] != seq or key_id in self._busy or self._older_due(key_id, seq)

            if blocked():
                lend()
            while blocked():
                self._cond.wait()
            if seq is not None:
                heapq.heappop(queue)
                if not queue:
                    del self._queues[key_id]
            self._busy.add(key_id)
        try:
            yield
        finally:
            with self._cond:
                self._busy.discard(key_id)
                if seq is not None and token is not None:
                    self._sleepers.setdefault(key_id, {})[seq] = token
                self._cond.notify_all()

    def _claim_start(self, key_id: int, identity_id: int) -> bool:
        with self._cond:
            claiming = self._claiming.setdefault(key_id, set())
            if identity_id in claiming:
                return False
            claiming.add(identity_id)
            return True

    def _claim_end(self, key_id: int, identity_id: int) -> None:
        with self._cond:
            claiming = self._claiming[key_id]
            claiming.discard(identity_id)
            if not claiming:
                del self._claiming[key_id]
            self._cond.notify_all()

    def _claims_wait(self, key_id: int, identity_ids: set[int], lend: Callable[[], None]) -> None:
        """Until none of ``identity_ids`` is being claimed on by the key's
        attempts here; ``lend`` runs once before this has to wait."""
        with self._cond:

            def busy() -> bool:
                return not identity_ids.isdisjoint(self._claiming.get(key_id, ()))

            if busy():
                lend()
            while busy():
                self._cond.wait()

    def waiting(self, key_id: int | None = None) -> int:
        with self._cond:
            return self._waiting if key_id is None else len(self._admitted.get(key_id, ()))


room = WaitingRoom(across_processes=True)


class Visit:
    """One dispatch's stay: admitted on its first wait, leaves on exit."""

    def __init__(self, room_: WaitingRoom, key_id: int, *, max_wait_ms: int) -> None:
        self.room, self.key_id, self.max_wait_ms = room_, key_id, max_wait_ms
        self.seq: int | None = None
        self.ticket: int | None = None  # its place in the key's queue across processes
        self.waited = 0.0  # seconds spent waiting
        self.key_read_at = 0.0  # when the key's row was last read for it (``slots.key_limits_recheck``)

    def __enter__(self) -> Visit:
        return self

    def __exit__(self, *exc) -> None:
        if self.seq is not None:
            self.room._leave(self.key_id, self.seq)
        if self.ticket is not None:
            wait_ticket_drop(self.ticket)

    @property
    def admitted(self) -> bool:
        """Whether this dispatch has waited (and so was admitted) already."""
        return self.seq is not None

    @property
    def waited_ms(self) -> int:
        return int(self.waited * 1000)

    def wait(self, token: int, timeout: float) -> None:
        """Wait for a release after ``token`` (or ``timeout`` seconds); the
        first wait asks for admission, which may answer 429 at once."""
        if self.seq is None:
            self.seq = self.room._admit(self.key_id)
            if self.room.across_processes:
                self.ticket = wait_ticket_take(self.key_id, self.max_wait_ms)
        started = time.monotonic()
        self.room._asleep(self.key_id, self.seq, token)
        _connection_lend()
        if wakeups.wait(token, timeout):
            self._older_first()
        self.waited += time.monotonic() - started

    def _older_first(self) -> None:
        """After a release: when this is the key's oldest waiter here and an
        older one waits in another process, give that one the grace to take
        the slot first. Still asleep meanwhile, for the younger waiters here
        to let this one go first after it."""
        grace = settings.KIROPOOL_WAIT_ORDER_GRACE_MS / 1000
        if grace <= 0 or self.ticket is None or not self.room._oldest_here(self.key_id, self.seq):
            return
        if wait_ticket_older_exists(self.key_id, self.ticket):
            _connection_lend()
            time.sleep(grace)

    @contextmanager
    def turn(self, token: int | None = None) -> Iterator[None]:
        """An attempt's read of the head: one at a time per key in this
        process, the key's waiters in waiting order first. ``token``: the
        one the attempt took before its read."""
        with self.room._turn(self.key_id, self.seq, _connection_lend, token):
            yield

    def older_due(self) -> bool:
        """Whether an older waiter of the key here is due to look again (a
        release came after its token): this attempt, a waiter's, read the
        pool after that release, and leaves what it found to that one."""
        if self.seq is None:
            return False
        with self.room._cond:
            return self.room._older_due(self.key_id, self.seq)

    @contextmanager
    def claims(self) -> Iterator[Claims]:
        """An attempt's claims on identities (:class:`Claims`); the one it
        still holds is given back at the end."""
        claims = Claims(self.room, self.key_id)
        try:
            yield claims
        finally:
            claims.give_back()

    def claims_wait(self, identity_ids: set[int]) -> None:
        """Until the key's other attempts here are done claiming on these identities."""
        self.room._claims_wait(self.key_id, identity_ids, _connection_lend)


class Claims:
    """The identity one attempt of a key is claiming on, held from
    :meth:`take` until :meth:`give_back` (at most one at a time), and the
    identities it found another attempt of the key in this process
    claiming on (``skipped``)."""

    def __init__(self, room_: WaitingRoom, key_id: int) -> None:
        self.room, self.key_id = room_, key_id
        self.held: int | None = None
        self.skipped: set[int] = set()

    def take(self, identity_id: int) -> bool:
        """Whether this attempt may claim on the identity now: it holds it
        already, or no other attempt of the key here is claiming on it (it
        then holds it, and gives back the one it held)."""
        if self.held == identity_id:
            return True
        self.give_back()
        if self.room._claim_start(self.key_id, identity_id):
            self.held = identity_id
            return True
        self.skipped.add(identity_id)
        return False

    def give_back(self) -> None:
        if self.held is not None:
            self.room._claim_end(self.key_id, self.held)
            self.held = None


def wait_ticket_take(key_id: int, max_wait_ms: int) -> int | None:
    """A place in the key's queue across processes (PostgreSQL only: the
    embedded SQLite serves one host, and its one writer is better spared).
    None when the database refuses: the wait then keeps only this
    process's order."""
    if not backend.postgres:
        return None
    expires_at = timezone.now() + timedelta(milliseconds=max_wait_ms) + TICKET_MARGIN
    try:
        return WaitTicket.objects.create(key_id=key_id, expires_at=expires_at).pk
    except DatabaseError:
        logger.warning("could not take a wait ticket for key %s; its waiters keep this process's order", key_id)
        return None


def wait_ticket_drop(ticket: int) -> None:
    """Give the place up. A ticket that could not be deleted stops counting
    at its expiry."""
    try:
        WaitTicket.objects.filter(pk=ticket).delete()
    except DatabaseError:
        logger.warning("could not delete wait ticket %s; it stops counting at its expiry", ticket)


def wait_ticket_older_exists(key_id: int, ticket: int) -> bool:
    """Whether a live ticket of the key older than ``ticket`` is held. The
    caller is its process's oldest waiter of the key, so any such ticket is
    another process's."""
    try:
        older = WaitTicket.objects.filter(key_id=key_id, pk__lt=ticket, expires_at__gt=timezone.now())
        return older.exists()
    except DatabaseError:
        return False


def _connection_lend() -> None:
    """Hand this thread's pooled database connection back for a wait (for a
    slot, or for the key's turn): a slot may take seconds, and the
    completions that would free it, and the turn in progress, need
    connections from the same pool. The next query takes one again."""
    if backend.pooled and not connection.in_atomic_block:
        connection.close()
