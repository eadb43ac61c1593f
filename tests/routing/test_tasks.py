"""Background maintenance (SPEC §4): the services, then the Celery tasks run by
a real worker consuming the real Redis broker (not eager mode)."""

import subprocess
import threading
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from celery import signals
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import Account, ApiKey, KeySlot, RoutingIdentity
from kiropool.celery import app as celery_app
from routing import batches, maintenance, sessions, tasks
from routing.latency import SNAPSHOT_WINDOW
from routing.models import (
    CooldownEvent,
    LatencySample,
    LatencySnapshot,
    Lease,
    LeaseOutcome,
    SessionBinding,
    WaitTicket,
)
from routing.selection import LatencyStats
from routing.selectors.latency import latency_snapshot_current, latency_snapshot_latest, snapshot_load
from tests.factories import (
    AccountFactory,
    ApiKeyFactory,
    LatencySampleFactory,
    LeaseFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
)
from tests.support import run_queued_behind, test_database_url


def binding(account, *, updated_ago: timedelta, expires_in: timedelta, **fields) -> SessionBinding:
    now = timezone.now()
    updated_at = now - updated_ago
    return SessionBindingFactory(
        account=account, created_at=updated_at, updated_at=updated_at, expires_at=now + expires_in, **fields
    )


def assert_binding_rows_exact():
    for account in Account.objects.all():
        assert account.binding_rows == SessionBinding.objects.filter(account=account).count(), account.name


# --- the schedule -------------------------------------------------------------------------------


def test_beat_schedule_runs_every_task_and_expires_each_before_its_next_run():
    schedule = settings.CELERY_BEAT_SCHEDULE
    periods = {entry["task"]: entry["schedule"] for entry in schedule.values()}
    assert periods == {
        "routing.tasks.latency_snapshot_refresh": 60.0,
        "routing.tasks.binding_purge": 60.0,
        "routing.tasks.lease_reap": 60.0,
        "routing.tasks.latency_sample_prune": 3600.0,
        "routing.tasks.history_prune": 3600.0,
        "routing.tasks.counters_reconcile": 300.0,
        "routing.tasks.quota_resets_apply": 60.0,
    }
    for entry in schedule.values():
        assert entry["task"] in celery_app.tasks
        assert 0 < entry["options"]["expires"] < entry["schedule"]


def time_limits(task) -> tuple[float, float]:
    """(soft, hard) as the worker applies them: the task's own, else the defaults."""
    conf = celery_app.conf
    return task.soft_time_limit or conf.task_soft_time_limit, task.time_limit or conf.task_time_limit


def test_every_task_has_time_limits_and_a_hung_run_ends_before_the_next_is_due():
    celery_app.loader.import_default_modules()
    ours = [task for name, task in celery_app.tasks.items() if not name.startswith("celery.")]
    assert ours
    for task in ours:
        soft, hard = time_limits(task)
        assert soft and hard and 0 < soft < hard, task.name
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        soft, hard = time_limits(celery_app.tasks[entry["task"]])
        assert hard < entry["schedule"], entry["task"]
    # The minute tasks have their own, tighter limits.
    assert time_limits(tasks.lease_reap)[1] < 60 and time_limits(tasks.binding_purge)[1] < 60


# --- the services ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_snapshot_refresh_aggregates_the_window():
    proxy = ProxyFactory(url="http://p:1")
    a, b = AccountFactory(name="a", proxy=proxy), AccountFactory(name="b")
    now = timezone.now()
    LatencySampleFactory(account=a, proxy_url=proxy.url, first_token_ms=100, recorded_at=now - timedelta(minutes=59))
    LatencySampleFactory(account=a, proxy_url=proxy.url, first_token_ms=300, recorded_at=now)
    LatencySampleFactory(account=a, first_token_ms=200, recorded_at=now - timedelta(minutes=2))  # no proxy
    LatencySampleFactory(account=b, first_token_ms=1100, recorded_at=now - timedelta(minutes=1))
    LatencySampleFactory(account=b, first_token_ms=9999, recorded_at=now - SNAPSHOT_WINDOW)  # just out
    LatencySampleFactory(account=b, first_token_ms=9999, recorded_at=now + timedelta(seconds=1))  # not yet

    snapshot = maintenance.latency_snapshot_refresh(now=now)

    snapshot.refresh_from_db()
    assert snapshot.generated_at == now
    assert snapshot.window_seconds == 3600
    assert snapshot.sample_count == 4
    assert snapshot.global_avg_ms == pytest.approx(425.0)  # sample-weighted: (100 + 300 + 200 + 1100) / 4
    stored = snapshot_load(snapshot).snapshot
    assert stored.accounts == {"a": LatencyStats(3, 200.0), "b": LatencyStats(1, 1100.0)}
    assert stored.proxies == {"http://p:1": LatencyStats(2, 200.0)}


@pytest.mark.django_db
def test_snapshot_refresh_without_samples_has_no_average():
    stored = snapshot_load(maintenance.latency_snapshot_refresh())
    assert (stored.snapshot.global_avg_ms, stored.sample_count) == (None, 0)
    assert (stored.snapshot.accounts, stored.snapshot.proxies) == ({}, {})


@pytest.mark.django_db
def test_snapshot_refresh_keeps_only_the_last_few():
    start = timezone.now()
    for minute in range(maintenance.SNAPSHOTS_KEPT + 5):
        newest = maintenance.latency_snapshot_refresh(now=start + timedelta(minutes=minute))
    assert LatencySnapshot.objects.count() == maintenance.SNAPSHOTS_KEPT
    assert LatencySnapshot.objects.latest().pk == newest.pk


@pytest.mark.django_db
def test_of_two_refreshes_stamped_alike_every_reader_takes_the_later():
    now = timezone.now()
    maintenance.latency_snapshot_refresh(now=now)
    LatencySampleFactory(account=AccountFactory(name="a"), first_token_ms=700, recorded_at=now)
    later = maintenance.latency_snapshot_refresh(now=now)

    assert latency_snapshot_latest().id == later.pk
    assert latency_snapshot_current().snapshot.accounts == {"a": LatencyStats(1, 700.0)}
    assert LatencySnapshot.objects.latest().pk == later.pk


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_an_account_deleted_while_the_snapshot_is_written_is_left_out_and_the_rest_refreshed():
    """The refresh has read the samples of an account that an operator is
    deleting (with its samples): the snapshot's stats row for it waits for
    the account's row, and once the deletion commits it is gone. The
    refresh reads the samples again and writes the snapshot without it;
    before, the whole run failed on the foreign key and no account's
    latency was refreshed."""
    kept, gone = AccountFactory(name="kept"), AccountFactory(name="gone")
    LatencySampleFactory(account=kept, first_token_ms=200)
    LatencySampleFactory.create_batch(2, account=gone, first_token_ms=900)

    def deletion(cursor) -> None:  # committed while the refresh's snapshot waits for the account's row
        cursor.execute("DELETE FROM routing_latencysample WHERE account_id = %s", [gone.pk])
        cursor.execute("DELETE FROM accounts_account WHERE id = %s", [gone.pk])

    snapshot = run_queued_behind(deletion, maintenance.latency_snapshot_refresh)
    assert LatencySnapshot.objects.get().pk == snapshot.pk
    stored = snapshot_load(snapshot)
    assert (stored.sample_count, stored.snapshot.global_avg_ms) == (1, 200.0)
    assert stored.snapshot.accounts == {"kept": LatencyStats(1, 200.0)}


@pytest.mark.django_db
def test_purge_deletes_expired_bindings_and_keeps_counts_exact():
    account = AccountFactory()
    live = binding(account, updated_ago=timedelta(hours=1), expires_in=timedelta(hours=5))
    for n in range(3):
        binding(account, updated_ago=timedelta(hours=7), expires_in=-timedelta(minutes=n))
    assert Account.objects.get(pk=account.pk).binding_rows == 4

    assert sessions.binding_purge(max_entries=100) == (3, 0)

    assert list(SessionBinding.objects.values_list("pk", flat=True)) == [live.pk]
    assert_binding_rows_exact()
    assert sessions.binding_purge(max_entries=100) == (0, 0)  # idempotent


@pytest.mark.django_db
def test_purge_evicts_least_recently_updated_beyond_capacity():
    account, other = AccountFactory(), AccountFactory()
    keep = [
        binding(account, updated_ago=timedelta(minutes=1), expires_in=timedelta(hours=1)),
        binding(other, updated_ago=timedelta(minutes=2), expires_in=timedelta(hours=1)),
        binding(account, updated_ago=timedelta(minutes=3), expires_in=timedelta(hours=1)),
    ]
    binding(other, updated_ago=timedelta(minutes=4), expires_in=timedelta(hours=1))
    binding(account, updated_ago=timedelta(minutes=5), expires_in=timedelta(hours=1))
    binding(account, updated_ago=timedelta(hours=9), expires_in=-timedelta(hours=1))  # expired: first out

    assert sessions.binding_purge(max_entries=3) == (1, 2)

    assert set(SessionBinding.objects.values_list("pk", flat=True)) == {b.pk for b in keep}
    assert_binding_rows_exact()
    assert sessions.binding_purge(max_entries=3) == (0, 0)


@pytest.mark.django_db
def test_purge_capacity_breaks_updated_at_ties_by_age_of_row(settings):
    settings.KIROPOOL_AFFINITY_MAX_ENTRIES = 2
    now = timezone.now()
    later = now + timedelta(hours=1)
    rows = [SessionBindingFactory(created_at=now, updated_at=now, expires_at=later) for _ in range(4)]
    assert sessions.binding_purge(now=now) == (0, 2)
    assert set(SessionBinding.objects.values_list("pk", flat=True)) == {rows[2].pk, rows[3].pk}


@pytest.mark.django_db
def test_a_purge_that_runs_whole_between_anothers_two_counts_leaves_it_nothing_to_evict():
    """Two purges at once, the second run from start to end between the
    first's count of the live bindings and its count per key (here on the
    same connection, between the two statements). The second evicts down
    to the capacity; the first then counts what is left, and evicts
    nothing. Before, it took the number over the capacity from its first
    count and the key's bindings from its second, and evicted 75 more: the
    key's bindings down to its share, half the capacity."""
    key, account = ApiKeyFactory(), AccountFactory()
    for n in range(400):
        binding(account, updated_ago=timedelta(seconds=n), expires_in=timedelta(hours=1), api_key=key)
    other: list = []

    def other_purge_between(execute, sql, params, many, context):
        if "GROUP BY" in sql and not other:  # the first purge's count per key
            other.append("running")
            other[0] = sessions.binding_purge(max_entries=150)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(other_purge_between):
        first = sessions.binding_purge(max_entries=150)
    assert (other, first) == ([(0, 250)], (0, 0))
    assert SessionBinding.objects.count() == 150
    assert_binding_rows_exact()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_purge_holding_its_accounts_lets_a_lease_start_on_them():
    """The purge locks each batch's accounts before the triggers update their
    binding counts. A lease's insert checks its foreign key to the account
    (FOR KEY SHARE): held FOR UPDATE, the account made every lease start on
    it wait for the batch's commit; FOR NO KEY UPDATE, all the triggers'
    updates need, does not."""
    account = AccountFactory()
    binding(account, updated_ago=timedelta(hours=1), expires_in=-timedelta(minutes=1))
    held, done = threading.Event(), threading.Event()

    def hold_before_delete(execute, sql, params, many, context):
        if sql.startswith("DELETE") and not held.is_set():  # the accounts are locked by now
            held.set()
            assert done.wait(10)
        return execute(sql, params, many, context)

    def purge() -> None:
        try:
            with connection.execute_wrapper(hold_before_delete):
                sessions.binding_purge()
        finally:
            connection.close()

    thread = threading.Thread(target=purge)
    thread.start()
    try:
        assert held.wait(10)
        with psycopg.connect(test_database_url(), autocommit=True) as other:
            other.execute("SET lock_timeout = '2s'")
            # What a lease insert's foreign-key check takes on its account.
            other.execute("SELECT 1 FROM accounts_account WHERE id = %s FOR KEY SHARE", [account.pk])
    finally:
        done.set()
        thread.join(10)
    assert not SessionBinding.objects.exists()
    assert_binding_rows_exact()


@pytest.mark.django_db
def test_purge_works_in_batches(monkeypatch):
    # The purge (routing/sessions.py) reads routing.batches.BATCH at each
    # batch; maintenance.BATCH is the prunes' own copy.
    monkeypatch.setattr(batches, "BATCH", 3)
    account = AccountFactory()
    for n in range(8):
        binding(account, updated_ago=timedelta(hours=8), expires_in=-timedelta(seconds=n + 1))
    for n in range(7):
        binding(account, updated_ago=timedelta(minutes=n), expires_in=timedelta(hours=1))
    assert sessions.binding_purge(max_entries=2) == (8, 5)
    assert SessionBinding.objects.count() == 2
    assert_binding_rows_exact()


@pytest.mark.django_db
def test_prune_drops_samples_that_left_the_window(monkeypatch):
    monkeypatch.setattr(maintenance, "BATCH", 2)
    now = timezone.now()
    kept = [LatencySampleFactory(recorded_at=now - timedelta(minutes=m)) for m in (0, 30, 59)]
    for hours in (1, 2, 3, 30, 300):
        LatencySampleFactory(recorded_at=now - timedelta(hours=hours))
    assert maintenance.latency_sample_prune(now=now) == 5
    assert set(LatencySample.objects.values_list("pk", flat=True)) == {s.pk for s in kept}
    assert maintenance.latency_sample_prune(now=now) == 0


@pytest.mark.django_db
def test_history_prune_keeps_live_leases_and_recent_history(settings, monkeypatch):
    monkeypatch.setattr(maintenance, "BATCH", 2)
    settings.KIROPOOL_HISTORY_RETENTION_DAYS = 7
    now = timezone.now()
    old, recent = now - timedelta(days=8), now - timedelta(days=6)
    live_old = LeaseFactory(started_at=old, expires_at=old + timedelta(minutes=15))
    recent_done = LeaseFactory(completed_at=recent, outcome="success")
    for _ in range(3):
        LeaseFactory(completed_at=old, outcome="success")
    account = AccountFactory()
    CooldownEvent.objects.create(kind="quota_reset", account=account, created_at=old)
    kept_event = CooldownEvent.objects.create(kind="quota_reset", account=account, created_at=recent)
    assert maintenance.history_prune(now=now) == 4
    assert set(Lease.objects.values_list("pk", flat=True)) == {live_old.pk, recent_done.pk}
    assert list(CooldownEvent.objects.all()) == [kept_event]
    assert maintenance.history_prune(now=now) == 0


@pytest.mark.django_db
def test_history_prune_deletes_the_wait_tickets_past_their_expiry():
    """A process that died while its dispatches waited never deleted their
    tickets; they stopped counting at their expiry, and the prune clears them."""
    now = timezone.now()
    for seconds in (1, 60):
        WaitTicket.objects.create(key_id=1, expires_at=now - timedelta(seconds=seconds))
    live = WaitTicket.objects.create(key_id=1, expires_at=now + timedelta(seconds=1))
    assert maintenance.history_prune(now=now) == 2
    assert list(WaitTicket.objects.all()) == [live]


@pytest.mark.django_db(transaction=True)
def test_two_purges_at_once_evict_exactly_down_to_capacity(postgres_only):
    accounts, key = [AccountFactory() for _ in range(4)], ApiKeyFactory()
    for n in range(400):
        binding(accounts[n % 4], updated_ago=timedelta(seconds=n), expires_in=timedelta(hours=1), api_key=key)
    for n in range(100):
        binding(accounts[n % 4], updated_ago=timedelta(hours=7), expires_in=-timedelta(seconds=n + 1), api_key=key)
    results, errors = [], []
    barrier = threading.Barrier(2)

    def purge():
        try:
            barrier.wait()
            results.append(sessions.binding_purge(max_entries=150))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=purge) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a purge never finished"

    assert errors == []
    assert sum(expired for expired, _ in results) == 100
    assert sum(evicted for _, evicted in results) == 250
    assert SessionBinding.objects.count() == 150
    newest = SessionBinding.objects.order_by("-updated_at")[:150]
    assert set(SessionBinding.objects.values_list("pk", flat=True)) == {b.pk for b in newest}
    assert_binding_rows_exact()


@pytest.mark.django_db(transaction=True)
def test_purge_backs_off_when_the_hot_path_holds_a_lock(postgres_only):
    account = AccountFactory()
    for n in range(3):
        binding(account, updated_ago=timedelta(hours=7), expires_in=-timedelta(seconds=n + 1))
    locked, release = threading.Event(), threading.Event()

    def completion_in_progress():
        # What a completion does while it holds the account: it has updated the
        # row (credits) and has not committed yet.
        try:
            with transaction.atomic():
                Account.objects.filter(pk=account.pk).update(remaining_credits=5)
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=completion_in_progress)
    holder.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        assert sessions.binding_purge(max_entries=100) == (0, 0)  # gave up, did not wait it out
        assert time.monotonic() - started < 5
        assert SessionBinding.objects.count() == 3
    finally:
        release.set()
        holder.join(30)
    assert not holder.is_alive()
    assert sessions.binding_purge(max_entries=100) == (3, 0)  # the next run finishes the job
    assert_binding_rows_exact()


# --- a real worker on the real broker ------------------------------------------------------------


class TaskRuns:
    """Collects what the worker reports after each task, so a test waits for
    exactly its own task instead of sleeping."""

    def __init__(self):
        self._done: dict[str, tuple[str, object]] = {}
        self._cond = threading.Condition()

    def on_postrun(self, task_id=None, state=None, retval=None, **kwargs):
        with self._cond:
            self._done[task_id] = (state, retval)
            self._cond.notify_all()

    def run(self, task, timeout: float = 30.0):
        result = task.delay()
        with self._cond:
            assert self._cond.wait_for(lambda: result.id in self._done, timeout), f"{task.name} did not run"
            state, retval = self._done.pop(result.id)
        assert state == "SUCCESS", retval
        return retval


@pytest.fixture(scope="module")
def worker():
    if not settings.REDIS_URL:
        pytest.skip("needs a real Redis broker for the Celery worker: set REDIS_URL=redis://host:6379/<db> (CI does)")
    from celery.contrib.testing.worker import start_worker

    runs = TaskRuns()
    signals.task_postrun.connect(runs.on_postrun, weak=False)
    celery_app.control.purge()  # nothing left over from an earlier run
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=30):
            yield runs
    finally:
        signals.task_postrun.disconnect(runs.on_postrun)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_worker_refreshes_the_snapshot(worker):
    account = AccountFactory(name="timed")
    for ms in (200.0, 400.0):
        LatencySampleFactory(account=account, first_token_ms=ms)

    assert worker.run(tasks.latency_snapshot_refresh) == 2

    snapshot = LatencySnapshot.objects.get()
    assert snapshot.global_avg_ms == pytest.approx(300.0)
    assert snapshot_load(snapshot).snapshot.accounts == {"timed": LatencyStats(2, 300.0)}


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_worker_purges_expired_bindings(worker):
    account = AccountFactory()
    live = binding(account, updated_ago=timedelta(minutes=1), expires_in=timedelta(hours=1))
    binding(account, updated_ago=timedelta(hours=7), expires_in=-timedelta(seconds=1))
    binding(account, updated_ago=timedelta(hours=8), expires_in=-timedelta(hours=1))

    assert worker.run(tasks.binding_purge) == {"expired": 2, "evicted": 0}

    assert list(SessionBinding.objects.values_list("pk", flat=True)) == [live.pk]
    assert Account.objects.get(pk=account.pk).binding_rows == 1


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_worker_enforces_the_binding_capacity(worker, settings):
    settings.KIROPOOL_AFFINITY_MAX_ENTRIES = 2  # the worker thread reads the same settings
    account = AccountFactory()
    newest = [binding(account, updated_ago=timedelta(minutes=m), expires_in=timedelta(hours=1)) for m in (1, 2)]
    for m in (3, 4, 5):
        binding(account, updated_ago=timedelta(minutes=m), expires_in=timedelta(hours=1))

    assert worker.run(tasks.binding_purge) == {"expired": 0, "evicted": 3}

    assert set(SessionBinding.objects.values_list("pk", flat=True)) == {b.pk for b in newest}
    assert Account.objects.get(pk=account.pk).binding_rows == 2


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_worker_reaps_leases_past_their_ttl(worker):
    identity = RoutingIdentityFactory(max_concurrency=2, in_flight=2)
    key = ApiKeyFactory(max_concurrency=5)
    slot = KeySlot.objects.create(api_key=key, number=0, taken=True)
    account = AccountFactory(identity=identity)
    now = timezone.now()
    lapsed = LeaseFactory(
        account=account, api_key=key, key_slot=slot, started_at=now - timedelta(hours=1), expires_at=now
    )
    live = LeaseFactory(account=account)

    assert worker.run(tasks.lease_reap) == 1

    lapsed.refresh_from_db()
    live.refresh_from_db()
    assert (lapsed.outcome, lapsed.completed_at is not None) == (LeaseOutcome.EXPIRED, True)
    assert (live.outcome, live.completed_at) == ("", None)
    assert RoutingIdentity.objects.get(pk=identity.pk).in_flight == 1
    assert ApiKey.objects.get(pk=key.pk).in_flight == 0
    assert worker.run(tasks.lease_reap) == 0  # idempotent
    assert Lease.objects.filter(outcome=LeaseOutcome.EXPIRED).count() == 1


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_worker_prunes_old_samples(worker):
    fresh = LatencySampleFactory()
    LatencySampleFactory(recorded_at=timezone.now() - timedelta(hours=2))
    assert worker.run(tasks.latency_sample_prune) == 1
    assert list(LatencySample.objects.values_list("pk", flat=True)) == [fresh.pk]


# --- a hung task, in a real prefork worker ---------------------------------------------------------


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_a_hung_task_is_stopped_at_its_limits_and_maintenance_goes_on(tmp_path):
    """One worker slot (concurrency 1, as lean as it gets): a task that obeys
    its soft limit and one that ignores it and is killed at its hard limit,
    then the lease reaper queued behind them still runs, and neither hung task
    is delivered again."""
    if not settings.REDIS_URL:
        pytest.skip("needs a real Redis broker: set REDIS_URL=redis://host:6379/<db> (CI does)")
    import redis

    from tests.drills.services import PYTHON, ROOT, stop_process, wait_for
    from tests.support import project_env, test_database_url

    identity = RoutingIdentityFactory(max_concurrency=2, in_flight=1)
    now = timezone.now()
    account = AccountFactory(identity=identity)
    lapsed = LeaseFactory(account=account, started_at=now - timedelta(hours=1), expires_at=now)
    marker, log = tmp_path / "hang.log", tmp_path / "worker.log"
    queue = f"kiropool-test-time-limits-{uuid.uuid4().hex}"  # nobody else's worker takes these
    env = project_env(tmp_path, DATABASE_URL=test_database_url(), REDIS_URL=settings.REDIS_URL)
    command = [PYTHON, "-m", "celery", "-A", "tests.routing.celery_hang", "worker", "--concurrency=1", "-Q", queue]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO"]
    with open(log, "ab") as output:
        worker = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    broker = redis.Redis.from_url(settings.REDIS_URL)
    try:
        wait_for(lambda: "ready." in log.read_text(errors="replace"), timeout=60, what="the worker to be ready")
        celery_app.send_task("tests.hang", args=[str(marker), False], queue=queue)
        celery_app.send_task("tests.hang", args=[str(marker), True], queue=queue)
        tasks.lease_reap.apply_async(queue=queue)
        # 1 s + 3 s of limits, then the reap; the rest is slack for a busy machine.
        wait_for(lambda: Lease.objects.get(pk=lapsed.pk).outcome == LeaseOutcome.EXPIRED, timeout=60, what="the reap")
    finally:
        stop_process(worker, timeout=30)
    output = log.read_text(errors="replace")
    assert "Hard time limit (3s) exceeded for tests.hang" in output, output[-3000:]
    assert marker.read_text().splitlines() == ["started", "soft limit", "started", "soft limit"]
    assert RoutingIdentity.objects.get(pk=identity.pk).in_flight == 0
    # Acked, not waiting to be delivered again: a warm shutdown puts unacked
    # messages back on their queue.
    assert broker.llen(queue) == 0
    broker.delete(queue)
