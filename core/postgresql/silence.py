"""libpq's TCP options that give up a connection whose database host went
silent (gone in a failover, the network split): no refusal, no reset, no
answer.

Without them a query sent on such a connection waits for the kernel to give
up retransmitting it, about 15 minutes on Linux, and one already waiting for
its answer waits on, since TCP's own keepalives start after two hours: each
holds its server thread all that while. With them the connection ends after
``seconds`` without a word from the host, and the request answers 503. A
host that is up answers both from its kernel, however long a query runs on
it.
"""

from __future__ import annotations


def silence_options(seconds: int) -> dict[str, int]:
    """The connection options (libpq's names) ending a connection after
    ``seconds`` of silence; none for 0, leaving the system's."""
    if seconds <= 0:
        return {}
    probe_after = max(1, seconds // 2)
    return {
        # Data sent and not acknowledged for this long ends the connection;
        # with keepalives on, so does a probe unanswered for as long (Linux).
        "tcp_user_timeout": seconds * 1000,
        "keepalives": 1,
        "keepalives_idle": probe_after,
        "keepalives_interval": 1,
        # Where tcp_user_timeout does not govern the probes, their count ends
        # the connection at about the same time.
        "keepalives_count": max(1, seconds - probe_after),
    }
