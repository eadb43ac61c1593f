"""The session affinity store (SPEC §3) in simulated time."""

from __future__ import annotations

from collections import OrderedDict

from bench.simulate.state import Account


class Bindings:
    """(key, session id) -> account, with one TTL and a capacity. Each
    account counts the live bindings pointing at it (``Account.bound``)."""

    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.moved = 0  # bindings re-pointed to another account
        # Least recently updated first: with one TTL for all, that is also expiry order.
        self.rows: OrderedDict[tuple[str, str], tuple[Account, float]] = OrderedDict()

    def get(self, key: str, session: str | None) -> Account | None:
        if session is None:
            return None
        row = self.rows.get((key, session))
        return row[0] if row is not None else None

    def bind(self, key: str, session: str, account: Account, t: float) -> None:
        self.expire(t)  # an expired binding is not one the session moves away from
        old = self.rows.pop((key, session), None)
        if old is not None:
            old[0].bound -= 1
            if old[0] is not account:
                self.moved += 1
        self.rows[(key, session)] = (account, t + self.ttl_s)
        account.bound += 1
        while len(self.rows) > self.max_entries:
            _, (evicted, _) = self.rows.popitem(last=False)
            evicted.bound -= 1

    def expire(self, t: float) -> None:
        rows = self.rows
        while rows:
            key, (account, expires) = next(iter(rows.items()))
            if expires > t:
                return
            del rows[key]
            account.bound -= 1
