"""The dispatcher behaviours issue 12 added, each on or off.

The six policies of the fairness comparison differ only in how they order
candidates; these variants keep kiropool's ordering and differ in what the
dispatcher does around it:

- ``ejection``: outlier ejection after repeated failures, and slow start
  when the identity comes back (``routing/completions.py``);
- ``credit_pacing``: the credit_first pool ranks by the credits an account
  must burn per hour before its reset (the sort key in
  ``routing/selection.py``; off, the ordering never sees a reset time);
- ``sticky_patience_ms``: how long a returning turn waits for its busy
  bound account before it moves (``routing/leases.py``).

Everything else is the same in every run, the six policies included: SPEC
§2's walk and waiting, cooldowns, quota exhaustion, the empty-balance rule,
accounts coming back at a known reset time or through a probe.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bench.simulate.scenario import Knobs

# The sweep of issue 12 §7: no patience, then a few seconds up to ten; and
# 500 ms, to see below the 1 s default (whose p95 wait at peak is over +10 %).
PATIENCE_SWEEP_MS = (0, 500, 1000, 2000, 3000, 5000, 10_000)


@dataclass(frozen=True, slots=True)
class Dispatcher:
    name: str = ""
    ejection: bool = False
    credit_pacing: bool = False
    sticky_patience_ms: int = 0

    def features(self) -> tuple[bool, bool, int]:
        """What the run does, whatever it is called: equal features, equal runs."""
        return (self.ejection, self.credit_pacing, self.sticky_patience_ms)


# The previous kiropool: no ejection, no credit pacing, no patience.
TODAY = Dispatcher("today")
# The same, unnamed: a run with it is named after its policy (the fairness comparison).
PLAIN = Dispatcher()


def dispatcher_variants(knobs: Knobs) -> list[Dispatcher]:
    """Today's dispatcher, each new behaviour added alone, and all of them (new)."""
    patience = knobs.sticky_patience_ms
    return [
        TODAY,
        Dispatcher("+ejection", ejection=True),
        Dispatcher("+pacing", credit_pacing=True),
        Dispatcher("+patience", sticky_patience_ms=patience),
        Dispatcher("new", ejection=True, credit_pacing=True, sticky_patience_ms=patience),
    ]


def patience_sweep(values_ms: Iterable[int] = PATIENCE_SWEEP_MS) -> list[Dispatcher]:
    """The new dispatcher at each patience."""
    return [
        Dispatcher(f"patience {ms / 1000:g} s", ejection=True, credit_pacing=True, sticky_patience_ms=ms)
        for ms in values_ms
    ]
