"""The periodic tasks that write the rows a dispatch moves, timed as a
Celery worker runs them (in this process), each over a minute's worth of
work at 100 new sessions a second: the latency refresh (an hour of
samples) and the binding purge (a minute's expired bindings).

Each run reports its wall time, this process's CPU and PostgreSQL's (read
from ``/proc``: None without it), and the longest a lease start waited
meanwhile: another process moves an identity's last start every 2 ms, as a
lease start does, which moves its accounts' order rows, the rows both tasks
write. The figures are the medians of the runs, the wait their longest."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable

from bench.load import cpu, seed

RUNS = 3
REFRESH_SAMPLES = 360_000  # the refresh's hour-long window at 100 completions a second
PURGE_EXPIRED = 6_000  # a minute of sessions at 100 a second, expired since the last purge


def refresh_measure(*, database_url: str, samples: int = REFRESH_SAMPLES, runs: int = RUNS) -> dict:
    """``maintenance.latency_snapshot_refresh`` over ``samples`` samples on
    the history pool, while a lease start moves one of its identities; with
    the order rows each run wrote a band into (``bands_written``). The first
    run finds the averages moved from the seeding's snapshot to the hour's
    samples; the next ones find them where the run before left them."""
    from routing.maintenance import latency_snapshot_refresh  # Django is set up by now
    from routing.models import PoolOrder

    seed.samples_seed(samples)
    timed = _measure(
        latency_snapshot_refresh,
        runs=runs,
        database_url=database_url,
        pool=seed.HISTORY_PREFIX,
        then=lambda snapshot: PoolOrder.objects.filter(band_snapshot_id=snapshot.pk).count(),
    )
    bands_written = timed.pop("outcomes")
    return {"samples": samples, "runs": runs, **timed, "bands_written": bands_written}


def purge_measure(
    *, key_id: int, database_url: str, expired: int = PURGE_EXPIRED, runs: int = RUNS, pool: str = seed.MAIN_PREFIX
) -> dict:
    """``sessions.binding_purge`` after ``expired`` of the key's live
    bindings have expired, while a lease start moves an identity of the
    pool they bind to (named ``pool``...)."""
    from routing.sessions import binding_purge  # Django is set up by now

    timed = _measure(
        binding_purge,
        runs=runs,
        database_url=database_url,
        pool=pool,
        prepare=lambda: seed.bindings_expire(key_id=key_id, count=expired),
    )
    timed.pop("outcomes")
    return {"expired": expired, "runs": runs, **timed}


def _measure(
    work: Callable[[], object],
    *,
    runs: int,
    database_url: str,
    pool: str,
    prepare: Callable[[], object] | None = None,
    then: Callable[[object], object] | None = None,
) -> dict:
    """Time ``runs`` runs of ``work``, each after ``prepare``; ``outcomes``
    holds ``then`` of each run's result, taken once the run's timers stopped."""
    from django.db import connection

    from accounts.models import RoutingIdentity

    identity = RoutingIdentity.objects.filter(name__startswith=pool).order_by("pk").first()
    table = connection.ops.quote_name(RoutingIdentity._meta.db_table)
    start = f"UPDATE {table} SET last_started_at = now() WHERE id = {identity.pk}"
    walls, own, postgres, starts, outcomes = [], [], [], [], []
    # Spawned, not forked: a fork would share this process's pooled connections.
    context = multiprocessing.get_context("spawn")
    for _ in range(runs):
        if prepare is not None:
            prepare()
        done, answers = context.Event(), context.Queue()
        starter = context.Process(target=_lease_starts, args=(database_url, start, done, answers))
        starter.start()
        backend = answers.get(timeout=60)  # its connection's: PostgreSQL's figure leaves it out
        before, cpu_started, started = cpu.processes(), time.process_time(), time.perf_counter()
        result = work()
        walls.append(time.perf_counter() - started)
        own.append(time.process_time() - cpu_started)
        after = cpu.processes()
        if then is not None:
            outcomes.append(then(result))
        done.set()
        starts.append(answers.get(timeout=60))
        starter.join()
        whose = {pid: "postgres" for pid, process in after.items() if process.name == cpu.POSTGRES and pid != backend}
        postgres.append(cpu.spent(before, after, whose)["postgres"] if after else None)
    connection.close()

    def ms(values: list) -> float | None:
        return None if None in values else round(1000 * statistics.median(values), 1)

    return {
        "wall_ms": ms(walls),
        "cpu_ms": ms(own),
        "postgres_cpu_ms": ms(postgres),
        "lease_start_max_ms": round(1000 * max(starts), 1),
        "outcomes": outcomes,
    }


def _lease_starts(url: str, statement: str, done, answers) -> None:
    """Put this connection's backend pid on ``answers``, then run
    ``statement`` (an identity's last start moved) every 2 ms, each in its
    own transaction, until ``done`` is set; then put the longest any took."""
    import psycopg

    longest = 0.0
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)
        answers.put(connection.info.backend_pid)
        while not done.is_set():
            started = time.perf_counter()
            connection.execute(statement)
            longest = max(longest, time.perf_counter() - started)
            time.sleep(0.002)
    answers.put(longest)
