"""Fault drills against real services that each drill starts for itself: a
private PostgreSQL cluster (initdb, spare port) and a private redis-server,
never the machine's own. The web server and Celery run as separate processes, as in
production, and the drill breaks what is under them:

(a) PostgreSQL restarted during a dispatch load, down for most of a minute, and
    its host silent for half a minute;
(b) Redis stopped while the gateway works, then started again;
(c) a gateway that never completes its leases;
(d) a Celery worker SIGKILLed while it reaps leases / purges bindings.

Each prints its figures past pytest's capture, so CI logs show them."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter

import pytest

from kiropool.health import READINESS_CACHE_SECONDS
from tests.drills.services import (
    CeleryWorker,
    PrivatePostgres,
    PrivateRedis,
    django_run,
    manage,
    postgres_missing,
    redis_missing,
    request,
    wait_for,
)
from tests.silent_link import silent_link
from tests.support import project_env, web_server

pytestmark = [pytest.mark.drill, pytest.mark.timeout(420)]

TEMPLATE = "drill_template"


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    why = postgres_missing()
    if why:
        pytest.skip(f"fault drills need a private PostgreSQL: {why}")
    cluster = PrivatePostgres()
    try:
        cluster.init()
        cluster.start()
        cluster.create_database(TEMPLATE)
        # Migrated once; every drill copies it (CREATE DATABASE ... TEMPLATE).
        manage(project_env(tmp_path_factory.mktemp("migrate"), DATABASE_URL=cluster.url(TEMPLATE)), "migrate")
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def redis():
    why = redis_missing()
    if why:
        pytest.skip(f"this drill needs a private Redis: {why}")
    server = PrivateRedis()
    server.start()
    yield server
    if server.proc is not None:
        server.stop()


@pytest.fixture
def database(pg, request) -> str:
    name = "drill_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    pg.create_database(name, template=TEMPLATE)
    return name


SEED = """
import json
from routing.pools import pool_seed, uniform_pool
seeded = pool_seed(prefix="drill-", identities=uniform_pool({identities}, max_concurrency={max_concurrency}))
print(json.dumps({{"key": seeded.key}}))
"""


def seed_pool(env, *, identities: int, max_concurrency: int) -> dict[str, str]:
    out = django_run(env, SEED.format(identities=identities, max_concurrency=max_concurrency))
    key = json.loads(out.strip().splitlines()[-1])["key"]
    return {"Authorization": f"Bearer {key}"}


def figures(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\ndrill: {text}", flush=True)


def identity_consistency(pg: PrivatePostgres, db: str) -> list[tuple]:
    """Per identity: (name, in_flight counter, live leases, max_concurrency)."""
    return pg.query(
        db,
        """SELECT i.name, i.in_flight,
                  (SELECT count(*) FROM routing_lease l
                    WHERE l.identity_id = i.id AND l.completed_at IS NULL),
                  i.max_concurrency
             FROM accounts_routingidentity i ORDER BY i.name""",
    )


class LimitWatch(threading.Thread):
    """Samples, every 50 ms while the database answers, each identity's
    counter and its uncompleted lease rows in one snapshot: a double-booked
    slot would show as more rows than the limit, or a counter that disagrees."""

    def __init__(self, pg: PrivatePostgres, db: str) -> None:
        super().__init__(daemon=True)
        self.pg, self.db = pg, db
        self.stop = threading.Event()
        self.samples = 0
        self.peak = 0
        self.violations: list[tuple] = []

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                rows = identity_consistency(self.pg, self.db)
            except Exception:  # noqa: BLE001 - the outage: nothing to sample
                continue
            self.samples += 1
            for name, in_flight, live, limit in rows:
                self.peak = max(self.peak, live)
                if live > limit or in_flight != live:
                    self.violations.append((name, in_flight, live, limit))


# --- (a) PostgreSQL restarted under load ------------------------------------------------------


def test_postgres_restart_during_dispatch_load(pg, database, tmp_path, capsys):
    env = project_env(tmp_path, DATABASE_URL=pg.url(database), CONN_MAX_AGE="60")
    auth = seed_pool(env, identities=4, max_concurrency=2)
    server = web_server(env, tmp_path, workers=2, threads=8).start()
    phase = ["before"]
    dispatches: list[tuple[str, int, dict | None]] = []
    completions: list[tuple[str, int]] = []
    granted: list[str] = []
    unfinished: list[str] = []
    stop = threading.Event()

    def gateway(n: int) -> None:
        while not stop.is_set():
            try:
                status, body, _ = request(server.bind, "POST", "/api/v1/dispatch", {"max_wait_ms": 2000}, auth, 20)
            except OSError as exc:
                dispatches.append((phase[0], -1, {"transport": repr(exc)}))
                continue
            dispatches.append((phase[0], status, body))
            if status != 200:
                time.sleep(0.05)
                continue
            lease = body["lease_id"]
            granted.append(lease)
            time.sleep(0.02)
            # A gateway retries its completion until the pool has heard it.
            for _ in range(300):
                status, _, _ = request(
                    server.bind, "POST", f"/api/v1/leases/{lease}/complete", {"outcome": "success"}, auth, 20
                )
                completions.append((phase[0], status))
                if status in (200, 409):
                    break
                time.sleep(0.1)
            else:
                unfinished.append(lease)

    workers_before = server.worker_pids()
    assert len(workers_before) == 2  # start() returned with both workers forked
    clients = [threading.Thread(target=gateway, args=(n,), daemon=True) for n in range(6)]
    watch = LimitWatch(pg, database)
    try:
        watch.start()
        for client in clients:
            client.start()
        time.sleep(3)
        phase[0] = "outage"
        pg.stop("immediate")  # a crash-restart: connections die mid-statement
        time.sleep(3)
        pg.start()
        phase[0] = "after"
        time.sleep(6)
    finally:
        stop.set()
        for client in clients:
            client.join(60)
        watch.stop.set()
        watch.join(10)
        workers_after = server.worker_pids()
        server.stop()

    by_phase = {p: Counter(status for ph, status, _ in dispatches if ph == p) for p in ("before", "outage", "after")}
    outage_errors = [body for ph, status, body in dispatches if status == 503]
    figures(
        capsys,
        f"postgres restart: dispatches {dict(by_phase['before'])} before, {dict(by_phase['outage'])} during, "
        f"{dict(by_phase['after'])} after; completions {dict(Counter(s for _, s in completions))}; "
        f"{len(granted)} leases granted",
    )
    # Before and after: served. During: a clean 503 in the one error shape,
    # nothing else. (Whether a client's first request after the crash is a
    # dispatch or the completion it was about to send is a matter of timing,
    # so the 503s are counted over both.)
    assert set(by_phase["before"]) == {200}
    outage_completions = Counter(status for ph, status in completions if ph == "outage")
    assert set(by_phase["outage"]) <= {200, 503} and set(outage_completions) <= {200, 409, 503}
    assert by_phase["outage"][503] + outage_completions[503] > 0
    assert all(body == {"error": {"type": "api_error", "message": body["error"]["message"]}} for body in outage_errors)
    assert set(by_phase["after"]) <= {200, 503} and by_phase["after"][200] >= 20
    tail = [status for ph, status, _ in dispatches if ph == "after"][-20:]
    assert set(tail) == {200}  # recovered, without restarting the app
    assert workers_after == workers_before  # no worker was replaced either
    assert set(Counter(s for _, s in completions)) <= {200, 409, 503}
    assert not unfinished
    assert all(status != 500 for status in server.statuses())

    # No lease lost: every lease a gateway was given is in the database, completed once.
    leases = dict(pg.query(database, "SELECT id::text, outcome FROM routing_lease"))
    assert len(granted) == len(set(granted))
    assert all(leases.get(lease) == "success" for lease in granted)
    # No lease double-booked: counters equal the live rows, and no identity ever held more than its limit.
    orphans = [lease for lease, outcome in leases.items() if outcome == "" and lease not in set(granted)]
    for name, in_flight, live, _limit in identity_consistency(pg, database):
        assert in_flight == live, name
    assert watch.samples > 50 and not watch.violations, watch.violations[:5]
    figures(
        capsys,
        f"postgres restart: {len(orphans)} lease(s) taken but never handed out (freed at their TTL); "
        f"{watch.samples} snapshots of the slots, peak {watch.peak} of 2 per identity, {len(watch.violations)} over",
    )


# Down for 40 s. psycopg_pool's own schedule, retrying a connection after 1,
# 2, 4, 8, 16 and 32 s (each ±10 %), would try next 57-69 s after its first
# failure: 17-29 s after the database is back. (Measured before the change:
# with each dispatch meanwhile waiting the pool's 10 s, the database was down
# 44 s and served again 14 s after.) A new attempt now starts with the next
# request, so 5 s is slack for a busy machine (measured: 0.1-0.2 s), and the
# 3 s allowed each answer meanwhile is slack over the milliseconds it takes.
OUTAGE_SECONDS = 40
BACK_WITHIN_SECONDS = 5
OUTAGE_ANSWER_SECONDS = 3


def dispatch_and_complete(server, auth) -> None:
    status, body, _ = request(server.bind, "POST", "/api/v1/dispatch", {}, auth, 20)
    assert status == 200
    complete = request(
        server.bind, "POST", f"/api/v1/leases/{body['lease_id']}/complete", {"outcome": "success"}, auth, 20
    )
    assert complete[0] == 200


def dispatches_for(server, auth, seconds: float) -> list[tuple[int, dict | None, float, float]]:
    """One dispatch every half second for ``seconds``, each as (status,
    body, sent this many seconds after the start, answered in seconds)."""
    start = time.monotonic()
    answers = []
    while time.monotonic() - start < seconds:
        sent = time.monotonic()
        status, body, _ = request(server.bind, "POST", "/api/v1/dispatch", {}, auth, 60)
        answers.append((status, body, sent - start, time.monotonic() - sent))
        time.sleep(0.5)
    return answers


def until_served(server, auth) -> tuple[float, list[int]]:
    """Seconds until a dispatch is served again, and the statuses on the way."""
    start = time.monotonic()
    statuses: list[int] = []
    while not statuses or statuses[-1] != 200:
        assert time.monotonic() - start < 60, f"not served again within a minute: {statuses}"
        status, _, _ = request(server.bind, "POST", "/api/v1/dispatch", {}, auth, 30)
        statuses.append(status)
        if status != 200:
            time.sleep(0.1)
    return time.monotonic() - start, statuses


def assert_refused(answers) -> None:
    """Every answer of :func:`dispatches_for` a 503 in the one error shape."""
    assert {status for status, *_ in answers} == {503}
    assert all(body["error"]["type"] == "api_error" for _, body, *_ in answers)


def test_postgres_down_for_most_of_a_minute(pg, database, tmp_path, capsys):
    env = project_env(tmp_path, DATABASE_URL=pg.url(database))
    auth = seed_pool(env, identities=2, max_concurrency=4)
    with web_server(env, tmp_path, workers=1, threads=8) as server:
        dispatch_and_complete(server, auth)
        pg.stop("fast")
        during = dispatches_for(server, auth, OUTAGE_SECONDS)
        pg.start()
        recovered, statuses = until_served(server, auth)

    slowest = max(seconds for *_, seconds in during)
    figures(
        capsys,
        f"postgres down {OUTAGE_SECONDS} s: {len(during)} dispatches meanwhile, "
        f"{dict(Counter(status for status, *_ in during))}, the slowest answered in {slowest:.2f} s; "
        f"served again {recovered:.1f} s after it was back ({len(statuses)} dispatches)",
    )
    assert_refused(during)
    assert slowest < OUTAGE_ANSWER_SECONDS
    assert recovered < BACK_WITHIN_SECONDS
    assert all(status != 500 for status in server.statuses())


# The database's host silent for 30 s: every packet to and from it dropped,
# nothing refused or reset (tests/silent_link.py), as in a failover that
# takes the host's address away. Shortened for the drill: a connection gives
# a silent host up after 3 s (the settings' 10) and a connection attempt
# after 2 s (5). A dispatch on a connection opened before the silence then
# fails after the 3 s, the pool's idle ones end by themselves as their
# keepalive probes go unanswered, and once the pool's attempt to reconnect
# has failed every dispatch answers at once; 3 s is slack on each answer for
# a busy machine. Before, a dispatch on such a connection waited for the
# kernel to give up retransmitting, about 15 minutes: checked, no answer
# within this drill's 60 s. Served again once the pool reconnects: the next
# request starts an attempt.
SILENT_SECONDS = 30
SILENT_ANSWER_SECONDS = 3 + 3
SILENT_BACK_WITHIN_SECONDS = 5
# By then the silence has ended a connection (3 s) and an attempt to open one
# has failed (2 s), failing with it any request queued for one; 3 s more is
# slack. From then on, each answers at once (within 1 s).
SILENT_KNOWN_AFTER_SECONDS = 3 + 2 + 3


def test_postgres_host_silent_for_half_a_minute(pg, database, tmp_path, capsys):
    with silent_link(("127.0.0.1", pg.port)) as link:
        env = project_env(
            tmp_path,
            DATABASE_URL=f"postgres://postgres@{link.host}:{link.port}/{database}",
            KIROPOOL_DB_SILENCE_TIMEOUT="3",
            KIROPOOL_DB_CONNECT_TIMEOUT="2",
        )
        auth = seed_pool(env, identities=2, max_concurrency=4)
        with web_server(env, tmp_path, workers=1, threads=8) as server:
            dispatch_and_complete(server, auth)
            link.silence()
            during = dispatches_for(server, auth, SILENT_SECONDS)
            link.restore()
            recovered, statuses = until_served(server, auth)
            served = server.statuses()

    slowest = max(seconds for *_, seconds in during)
    late = [seconds for _, _, sent, seconds in during if sent > SILENT_KNOWN_AFTER_SECONDS]
    figures(
        capsys,
        f"postgres host silent {SILENT_SECONDS} s: {len(during)} dispatches meanwhile, "
        f"{dict(Counter(status for status, *_ in during))}, answered in "
        f"{', '.join(f'{seconds:.2f}' for *_, seconds in during[:5])} ... s (the slowest {slowest:.2f} s, "
        f"after the first {SILENT_KNOWN_AFTER_SECONDS} s {max(late):.2f} s); "
        f"served again {recovered:.1f} s after it answered ({len(statuses)} dispatches)",
    )
    assert_refused(during)
    assert slowest < SILENT_ANSWER_SECONDS
    assert late and max(late) < 1
    assert recovered < SILENT_BACK_WITHIN_SECONDS
    assert all(status != 500 for status in served)
    # Nothing half-booked: the slots hold only the lease the last dispatch took.
    assert sum(in_flight for _, in_flight, _, _ in identity_consistency(pg, database)) == 1
    for name, in_flight, live, _limit in identity_consistency(pg, database):
        assert in_flight == live, name


# --- (b) Redis stopped -------------------------------------------------------------------------


REAPED = "SELECT count(*) FROM routing_lease WHERE outcome = 'expired'"


def expire_some_leases(pg: PrivatePostgres, db: str, count: int) -> None:
    pg.query(
        db,
        f"""INSERT INTO routing_lease (id, api_key_id, account_id, account_name, identity_id, proxy_url, session_id,
                 model, started_at, expires_at, completed_at, outcome, first_token_ms, waited_ms, error_message,
                 key_slot_id)
            SELECT gen_random_uuid(), NULL, a.id, a.name, a.identity_id, '', '', '', now() - interval '1 hour',
                   now() - interval '1 minute', NULL, '', NULL, 0, '', NULL
              FROM accounts_account a CROSS JOIN generate_series(1, {int(count)})""",
    )
    pg.query(
        db,
        """UPDATE accounts_routingidentity i SET in_flight = (
               SELECT count(*) FROM routing_lease l WHERE l.identity_id = i.id AND l.completed_at IS NULL)""",
    )


def send_task(env, name: str) -> None:
    django_run(env, f"from routing import tasks\ntasks.{name}.apply_async(retry=False)\n", timeout=60)


def test_redis_stopped_leaves_dispatch_alone_and_tasks_resume(pg, database, redis, tmp_path, capsys):
    env = project_env(tmp_path, DATABASE_URL=pg.url(database), REDIS_URL=redis.url(0))
    auth = seed_pool(env, identities=2, max_concurrency=50)
    server = web_server(env, tmp_path, workers=1, threads=8).start()
    worker = CeleryWorker(env, tmp_path).start()
    try:
        # All up: ready, serving, and a task sent now is run.
        assert request(server.bind, "GET", "/readyz")[0] == 200
        expire_some_leases(pg, database, 1)
        send_task(env, "lease_reap")
        wait_for(lambda: pg.query(database, REAPED)[0][0] == 2, timeout=30, what="the worker to reap")

        redis.stop()
        started = time.monotonic()
        statuses = []
        for _ in range(20):
            status, body, _ = request(server.bind, "POST", "/api/v1/dispatch", {"session_id": "s"}, auth)
            statuses.append(status)
            done = request(
                server.bind, "POST", f"/api/v1/leases/{body['lease_id']}/complete", {"outcome": "success"}, auth
            )
            statuses.append(done[0])
            statuses.append(
                request(server.bind, "POST", "/api/v1/dispatch/explain", {}, auth)[0]
            )  # rate limit fails open
        took = time.monotonic() - started

        def not_ready():
            status, body, _ = request(server.bind, "GET", "/readyz")
            return (status, body) if status != 200 else None

        # /readyz reuses its answer for up to READINESS_CACHE_SECONDS per process.
        ready_status, ready = wait_for(
            not_ready, timeout=READINESS_CACHE_SECONDS + 15, interval=0.5, what="readyz to report the broker down"
        )
        try:
            send_task(env, "lease_reap")  # the sender is told, it does not hang
            sent_while_down = "accepted"
        except RuntimeError:
            sent_while_down = "refused"

        redis.start()
        expire_some_leases(pg, database, 1)
        wait_for(lambda: request(server.bind, "GET", "/readyz")[0] == 200, timeout=30, what="readyz back to 200")
        resumed_at = time.monotonic()

        def reaped_again() -> bool:
            send_task(env, "lease_reap")
            return pg.query(database, REAPED)[0][0] == 4

        wait_for(reaped_again, timeout=90, interval=2, what="the worker to run tasks again")
        resumed = time.monotonic() - resumed_at
    finally:
        worker.stop()
        server.stop()

    figures(
        capsys,
        f"redis stopped: {len(statuses)} gateway calls all {set(statuses)} in {took:.1f} s; readyz {ready_status} "
        f"{ready['checks']}; task sent while down {sent_while_down}; tasks ran again {resumed:.1f} s after restart",
    )
    assert set(statuses) == {200}
    assert took < 20  # no call waited on the dead cache or broker
    assert ready_status == 503
    assert ready["error"]["type"] == "api_error" and "broker" in ready["error"]["message"]
    assert ready["checks"]["database"] == "ok" and ready["checks"]["broker"].startswith("down")


# --- (c) a gateway that never completes ----------------------------------------------------------


def test_leases_never_completed_come_back_after_the_ttl(pg, database, tmp_path, capsys):
    env = project_env(tmp_path, DATABASE_URL=pg.url(database), KIROPOOL_LEASE_TTL_SECONDS="2")
    auth = seed_pool(env, identities=1, max_concurrency=2)
    server = web_server(env, tmp_path, workers=1, threads=4).start()

    def dispatch(wait_ms: int = 0):
        return request(server.bind, "POST", "/api/v1/dispatch", {"max_wait_ms": wait_ms}, auth)

    try:
        assert [dispatch()[0] for _ in range(2)] == [200, 200]  # ... and never completed
        held_at = time.monotonic()  # both leases started by now, so both expire by held_at + 2 s
        full, body, headers = dispatch()
        assert full == 429 and body["error"]["type"] == "rate_limit_error" and int(headers["Retry-After"]) >= 1
        # A dispatch that may wait gets the first slot whose lease expires.
        started = time.monotonic()
        waited_status = dispatch(10_000)[0]
        waited_for = time.monotonic() - started
        # Once the other held lease expired too (on a busy machine the two
        # started some time apart): one slot free, then the pool is full again.
        time.sleep(max(0.0, held_at + 2.2 - time.monotonic()))
        rest = [dispatch()[0] for _ in range(2)]
        time.sleep(2.2)
        again = [dispatch()[0] for _ in range(3)]
    finally:
        server.stop()
    time.sleep(2.2)
    manage(env, "shell", "-c", "from routing.slots import lease_reap_expired; lease_reap_expired()")
    outcomes = Counter(dict(pg.query(database, "SELECT outcome, count(*) FROM routing_lease GROUP BY outcome")))
    figures(
        capsys,
        f"never-completed leases (TTL 2 s): full pool 429; a dispatch allowed to wait 10 s got {waited_status} "
        f"after {waited_for:.1f} s; then {rest}; after another TTL {again}; reaped {dict(outcomes)}",
    )
    assert waited_status == 200 and 1.0 < waited_for < 4.0  # woken by the expiry, not by the end of its budget
    assert rest == [200, 429] and again == [200, 200, 429]  # slots come back, never more than the limit
    assert outcomes == Counter({"expired": 6})
    for name, in_flight, live, _limit in identity_consistency(pg, database):
        assert in_flight == live == 0, name


# --- (d) a Celery task killed mid-run ---------------------------------------------------------


def seed_expired_bindings(pg: PrivatePostgres, db: str, per_account: int) -> None:
    with pg.connect(db) as conn:
        # Bulk-load with the binding-count triggers off (one row updated 40 000
        # times in one transaction is quadratic), then set the counters they keep.
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            f"""INSERT INTO routing_sessionbinding (api_key_id, session_id, account_id, created_at, updated_at,
                       expires_at)
                SELECT k.id, a.name || '-' || n, a.id, now() - interval '3 hours', now() - interval '2 hours',
                       now() - interval '1 hour'
                  FROM accounts_account a CROSS JOIN accounts_apikey k
                       CROSS JOIN generate_series(1, {int(per_account)}) n"""
        )
        conn.execute("RESET session_replication_role")
        conn.execute(
            """UPDATE accounts_account a SET binding_rows = (
                   SELECT count(*) FROM routing_sessionbinding b WHERE b.account_id = a.id)"""
        )


def binding_consistency(pg: PrivatePostgres, db: str) -> list[tuple]:
    return pg.query(
        db,
        """SELECT a.name, a.binding_rows, (SELECT count(*) FROM routing_sessionbinding b WHERE b.account_id = a.id)
             FROM accounts_account a ORDER BY a.name""",
    )


def kill_mid_run(worker: CeleryWorker, progress, total: int) -> int:
    """SIGKILL the pool process running the task once it has done part of it;
    returns the progress seen at the kill."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = progress()
        if 0 < done < total:
            for child in worker.children():
                os.kill(child, signal.SIGKILL)
            return done
        if done >= total:
            return done
        time.sleep(0.005)
    raise TimeoutError("the task made no progress")


@pytest.mark.parametrize(
    ("task", "seeded", "per_account"),
    [("lease_reap", "leases", 10_000), ("binding_purge", "bindings", 10_000)],
)
def test_a_task_killed_mid_run_then_run_again_leaves_a_correct_state(
    pg, database, redis, tmp_path, capsys, task, seeded, per_account
):
    env = project_env(tmp_path, DATABASE_URL=pg.url(database), REDIS_URL=redis.url(0))
    seed_pool(env, identities=4, max_concurrency=1)
    watch = pg.connect(database)  # one connection for every look: a new one a look is slow on a busy machine
    if seeded == "leases":
        total = 0

        def seed() -> int:
            expire_some_leases(pg, database, per_account)
            return total + 4 * per_account  # the reaped ones stay, counted

        def progress() -> int:
            return watch.execute(REAPED).fetchone()[0]
    else:
        total = 4 * per_account

        def seed() -> int:
            seed_expired_bindings(pg, database, per_account)
            return total  # the purged ones are gone

        def progress() -> int:
            return total - watch.execute("SELECT count(*) FROM routing_sessionbinding").fetchone()[0]

    total = seed()
    worker = CeleryWorker(env, tmp_path).start()
    try:
        for _attempt in range(3):
            send_task(env, task)
            at_kill = kill_mid_run(worker, progress, total)
            if at_kill < total:
                break
            # The run ended between two looks (a busy machine held this
            # process back): the same rows once more, and another try.
            total = seed()
        time.sleep(1)  # PostgreSQL rolls the killed transaction back
        after_kill = progress()
        consistent_after_kill = (
            identity_consistency(pg, database) if seeded == "leases" else binding_consistency(pg, database)
        )
        wait_for(lambda: len(worker.children()) == 1, timeout=30, what="the pool process to be replaced")
        send_task(env, task)
        wait_for(lambda: progress() == total, timeout=120, interval=0.5, what="the re-run to finish")
        log = worker.log.read_text(errors="replace")
    finally:
        worker.stop()
        watch.close()

    figures(
        capsys,
        f"{task} killed mid-run: {at_kill}/{total} {seeded} done at the SIGKILL, {after_kill} kept after it, "
        f"re-run finished all {total}; worker saw {'WorkerLostError' if 'WorkerLostError' in log else 'no error'}",
    )
    assert 0 < at_kill < total, "the kill did not land mid-run"
    # Killed mid-run: the finished batches stay, the interrupted one is rolled back whole.
    if seeded == "leases":
        for name, in_flight, live, _limit in consistent_after_kill:
            assert in_flight == live, name
        for name, in_flight, live, _limit in identity_consistency(pg, database):
            assert in_flight == live == 0, name
        assert pg.query(database, "SELECT count(*) FROM routing_lease WHERE completed_at IS NULL")[0][0] == 0
    else:
        for name, counter, rows in consistent_after_kill:
            assert counter == rows, name
        for name, counter, rows in binding_consistency(pg, database):
            assert counter == rows == 0, name
