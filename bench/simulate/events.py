"""The kinds of event in the engine's queue.

The engine (``engine.py``) runs every kind; the dispatch calls
(``leases.py``) schedule some of them: a lease's completion, a wake, the end
of a wait budget or of sticky patience. Both import them from here, so
neither imports the other for them. The values only tell the kinds apart:
events at the same instant run in the order they were scheduled, never by
kind.
"""

ARRIVE, COMPLETE, TICK, WAKE, DEADLINE, RESET, CREDIT_RESET, PATIENCE_END = range(8)
