"""A web worker's first requests cost what its later ones do.

Two things a worker did once, on its first requests, cost more than a
dispatch: importing the URLconf with every view module behind it
(drf-spectacular's among them, about 250 ms) and compiling the dispatcher's
statement shapes (about 12 ms each, ``routing/selectors/compiled.py``). A
server started under load had every worker do both at once, in its first
requests' time. The entry points (``kiropool/wsgi.py``, ``asgi.py``) run
:func:`worker_start` in each worker before it serves. Nothing here touches the
database: a worker still starts while PostgreSQL is down.
"""

from __future__ import annotations

import gc

from django.urls import get_resolver

from routing.leases import dispatch_warm


def worker_start() -> None:
    """What an entry point runs once, before its worker serves: warm up,
    then put what starting built out of the garbage collector's reach."""
    worker_warm()
    startup_freeze()


def worker_warm() -> None:
    get_resolver().url_patterns  # noqa: B018 - imports the URLconf and every view module it names
    dispatch_warm()


def startup_freeze() -> None:
    """Move every object the start built (modules, classes, the URLconf,
    compiled statements: about 170,000 of them) to the collector's permanent
    generation, after collecting the start's garbage.

    Python's full collection walks every tracked object. A worker's first one
    came some 30 s into serving and held the interpreter lock for 130-210 ms
    (seen under the benchmark's open loop), stalling all the threads of the
    worker at once; with the start's objects frozen it walks only what
    serving created (2-6 ms). Frozen objects are never collected: the start's
    objects live as long as the worker anyway."""
    gc.collect()
    gc.freeze()
