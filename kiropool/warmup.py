"""A web worker's first requests cost what its later ones do.

Two things a worker did once, on its first requests, cost more than a
dispatch: importing the URLconf with every view module behind it
(drf-spectacular's among them, about 250 ms) and compiling the dispatcher's
statement shapes (about 12 ms each, ``routing/selectors/compiled.py``). A
server started under load had every worker do both at once, in its first
requests' time. The entry points (``kiropool/wsgi.py``, ``asgi.py``) run
:func:`worker_warm` in each worker before it serves. Nothing here touches the
database: a worker still starts while PostgreSQL is down.
"""

from __future__ import annotations

from django.urls import get_resolver

from routing.leases import dispatch_warm


def worker_warm() -> None:
    get_resolver().url_patterns  # noqa: B018 - imports the URLconf and every view module it names
    dispatch_warm()
