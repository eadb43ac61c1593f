"""Bounded waiting: who may wait for a slot in this process, and in what order.

A dispatch that finds every candidate only locally throttled waits for a
slot (SPEC §2), holding a server thread while it does. Unbounded, a handful of
gateways waiting on one full identity would take every thread, and the
completions that free the slots would queue behind them. So:

- a process admits at most ``KIROPOOL_MAX_WAITERS`` waiting dispatches, and
  one API key at most ``KIROPOOL_MAX_WAITERS_PER_KEY`` of them; beyond that a
  dispatch is answered 429 at once with ``Retry-After``. The server's threads
  beyond the cap are kept for everything else: completions, probes, the
  admin, other keys (gunicorn.conf.py sizes the threads to match);
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
  older one go first. A dispatch that has not waited yet takes its turn after
  the waiters asking for one, not behind those still asleep: it may take a
  slot freed at that instant. Across processes and hosts there is no common
  order (that would cost a write per wait); each process serves its own
  waiters in order.
- a waiting dispatch hands its pooled database connection back for the wait
  (``KIROPOOL_DB_POOL_SIZE`` connections per process serve all its threads),
  so waiters never hold the connections the completions need.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import connection

from core.errors import RateLimited
from routing import wakeups
from routing.backend import backend


class WaitingRoom:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting = 0
        self._per_key: Counter[int] = Counter()
        self._seq = itertools.count()
        self._queues: dict[int, list[int]] = {}  # key id → seqs asking for a turn (a heap)
        self._busy: set[int] = set()  # keys whose waiter is taking its turn now
        self._sleepers: dict[int, dict[int, int]] = {}  # key id → {seq: wake-up token}
        self._claiming: dict[int, set[int]] = {}  # key id → identity ids its attempts are claiming on

    def visit(self, *, key_id: int) -> Visit:
        return Visit(self, key_id)

    def _admit(self, key_id: int) -> int:
        with self._cond:
            if self._waiting >= settings.KIROPOOL_MAX_WAITERS:
                raise RateLimited(
                    "too many dispatches are waiting for a slot on this server; retry shortly", retry_after=1
                )
            if self._per_key[key_id] >= settings.KIROPOOL_MAX_WAITERS_PER_KEY:
                raise RateLimited(
                    "too many dispatches of this API key are waiting for a slot; retry shortly", retry_after=1
                )
            self._waiting += 1
            self._per_key[key_id] += 1
            return next(self._seq)

    def _leave(self, key_id: int, seq: int) -> None:
        with self._cond:
            self._awake(key_id, seq)
            self._waiting -= 1
            self._per_key[key_id] -= 1
            if not self._per_key[key_id]:
                del self._per_key[key_id]

    def _asleep(self, key_id: int, seq: int, token: int) -> None:
        """A waiter goes to sleep until a release after ``token``. It counts as
        asleep until it asks for its turn or leaves, so a younger waiter woken
        first by the same release lets it go first."""
        with self._cond:
            self._sleepers.setdefault(key_id, {})[seq] = token

    def _awake(self, key_id: int, seq: int) -> None:
        sleepers = self._sleepers.get(key_id, {})
        sleepers.pop(seq, None)
        if not sleepers:
            self._sleepers.pop(key_id, None)
        self._cond.notify_all()

    def _older_due(self, key_id: int, seq: int) -> bool:
        """An older waiter of this key is asleep but already due to wake: a
        release moved past its token."""
        now = wakeups.current()
        return any(older < seq and token != now for older, token in self._sleepers.get(key_id, {}).items())

    @contextmanager
    def _turn(self, key_id: int, seq: int | None, lend: Callable[[], None]) -> Iterator[None]:
        """One claim attempt of the key at a time; ``lend`` runs once before
        this one has to wait for its turn."""
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
            return self._waiting if key_id is None else self._per_key[key_id]


room = WaitingRoom()


class Visit:
    """One dispatch's stay: admitted on its first wait, leaves on exit."""

    def __init__(self, room_: WaitingRoom, key_id: int) -> None:
        self.room, self.key_id = room_, key_id
        self.seq: int | None = None
        self.waited = 0.0  # seconds spent waiting

    def __enter__(self) -> Visit:
        return self

    def __exit__(self, *exc) -> None:
        if self.seq is not None:
            self.room._leave(self.key_id, self.seq)

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
        started = time.monotonic()
        self.room._asleep(self.key_id, self.seq, token)
        _connection_lend()
        wakeups.wait(token, timeout)
        self.waited += time.monotonic() - started

    @contextmanager
    def turn(self) -> Iterator[None]:
        """An attempt's read of the head: one at a time per key in this
        process, the key's waiters in waiting order first."""
        with self.room._turn(self.key_id, self.seq, _connection_lend):
            yield

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


def _connection_lend() -> None:
    """Hand this thread's pooled database connection back for a wait (for a
    slot, or for the key's turn): a slot may take seconds, and the
    completions that would free it, and the turn in progress, need
    connections from the same pool. The next query takes one again."""
    if backend.pooled and not connection.in_atomic_block:
        connection.close()
