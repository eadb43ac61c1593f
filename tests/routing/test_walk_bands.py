"""Latency bands in the order table (migration 0009, routing/selectors/walk.py).

- The refresh writes a row's band under the new snapshot when it has none
  or it changed, and then marks the snapshot's bands whole; a trigger
  clears a band when the account's proxy, or the proxy's URL, changes;
  whatever writes the sources, a row's band is the band SPEC §2 gives its
  account under the row's snapshot and under every whole snapshot since.
- On random pools with a usable snapshot, rows under another snapshot or
  none among them, a snapshot not whole, the walk's head is the full
  read's head whenever it says so.
- A dispatch with a usable snapshot on a large pool reads its head through
  the band index, and grants what the full read grants.
- A row without its band under the read's snapshot sends the scope's
  dispatches to the full read until the next refresh; an operator's edit
  that leaves rows without one writes their bands once it commits.
- On PostgreSQL the refresh skips rows another transaction holds, never
  waiting for them, and writes them once they are released.
- A process notices a new snapshot within ``SNAPSHOT_CHECK_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import Account, ApiKey, Pool, Proxy
from accounts.onboarding.importer import pool_import
from routing import maintenance, pool_order, selection
from routing.dispatch import DispatchRequest
from routing.models import LatencySample, LatencySnapshot, PoolOrder
from routing.pools import pool_seed, uniform_pool
from routing.selectors import dispatch as reads
from routing.selectors import latency as cached
from routing.selectors.candidates import HEAD_ROWS
from routing.selectors.latency import latency_snapshot_latest, snapshot_load
from tests.accounts.test_migrations import migrate
from tests.factories import AccountFactory, LatencySampleFactory, ProxyFactory, latency_snapshot_create
from tests.routing.gateway import Gateway
from tests.routing.random_pools import account_specs, identity_specs, names_at, pool_build, pool_key, walk_head_check
from tests.routing.test_walk import OPS, ORDER_TABLE, _apply, _nodes, _reads, scripted_day
from tests.support import lock_wait_seen, test_database_url

pytestmark = pytest.mark.django_db


def _band_checks():
    """Each banded row under each snapshot whose band it must hold: the one
    it was written under, and every whole one since (still kept), as
    ``(row id, snapshot, stored band, account name, proxy URL)``."""
    snapshots = {row.pk: row for row in LatencySnapshot.objects.all()}
    whole = {pk for pk, row in snapshots.items() if row.bands_whole_at}
    proxies = dict(Account.objects.values_list("pk", "proxy__url"))
    rows = PoolOrder.objects.filter(band_snapshot_id__isnull=False)
    for pk, account_id, name, band, since in rows.values_list(
        "pk", "account_id", "account__name", "band", "band_snapshot_id"
    ):
        for snapshot_id in sorted(({since} | {w for w in whole if w > since}) & snapshots.keys()):
            yield pk, snapshots[snapshot_id], band, name, proxies[account_id]


def bands_of_spec() -> dict[tuple[int, int], int]:
    """The band each banded row must hold under each snapshot of
    :func:`_band_checks`, by (row id, snapshot id), as SPEC §2 computes it
    (``selection``) from that snapshot and the account's proxy now."""
    loaded = {}
    bands = {}
    for pk, snapshot, _, name, proxy_url in _band_checks():
        if snapshot.pk not in loaded:
            loaded[snapshot.pk] = snapshot_load(snapshot).snapshot
        score = selection.latency_score(loaded[snapshot.pk], account=name, proxy_url=proxy_url)
        bands[pk, snapshot.pk] = selection.latency_band(score, loaded[snapshot.pk].global_avg_ms)
    return bands


def bands_stored() -> dict[tuple[int, int], int]:
    return {(pk, snapshot.pk): band for pk, snapshot, band, *_ in _band_checks()}


def whole(snapshot: LatencySnapshot) -> bool:
    snapshot.refresh_from_db()
    return snapshot.bands_whole_at is not None


def _pool_with_latency():
    """Six accounts on two proxies and none, a group of three, samples
    spreading them over several bands, and the snapshot written by the refresh."""
    fast, slow = ProxyFactory(url="http://fast:1"), ProxyFactory(url="http://slow:1")
    accounts = [AccountFactory(name=f"a{n}", proxy=[fast, slow, None][n % 3]) for n in range(6)]
    accounts[0].groups.create(name="g").accounts.add(*accounts[:3])
    for account, first_token_ms in zip(accounts, [200, 900, 3000, 400, 1200, 5000], strict=True):
        proxy_url = account.proxy.url if account.proxy else ""
        LatencySampleFactory.create_batch(5, account=account, first_token_ms=first_token_ms, proxy_url=proxy_url)
    return accounts, fast, slow


def _samples_swapped(one: Account, other: Account) -> None:
    """The two accounts' samples swapped: the global average stays, their bands swap."""
    of_one = list(LatencySample.objects.filter(account=one).values_list("pk", flat=True))
    LatencySample.objects.filter(account=other).update(account=one)
    LatencySample.objects.filter(pk__in=of_one).update(account=other)


# --- the bands are written, and cleared when their inputs change ---------------------------


def test_the_refresh_writes_every_rows_band_under_the_new_snapshot():
    accounts, *_ = _pool_with_latency()
    snapshot = maintenance.latency_snapshot_refresh()
    rows = PoolOrder.objects.count()
    assert rows == 6 + 3
    assert PoolOrder.objects.filter(band_snapshot_id=snapshot.pk).count() == rows
    assert whole(snapshot)
    assert bands_stored() == bands_of_spec()
    assert len(set(bands_stored().values())) >= 3  # the samples spread them


def test_the_next_refresh_writes_only_the_rows_whose_band_changed():
    """a2 and a5 (no proxy either) swap their samples: the global average
    stays, every other account keeps its band, and only their three rows
    are written again."""
    accounts, *_ = _pool_with_latency()
    first = maintenance.latency_snapshot_refresh()
    before = dict(PoolOrder.objects.values_list("pk", "band"))
    _samples_swapped(accounts[2], accounts[5])
    with CaptureQueriesContext(connection) as ctx:
        second = maintenance.latency_snapshot_refresh()
    changed = PoolOrder.objects.filter(account__in=[accounts[2], accounts[5]])
    assert set(PoolOrder.objects.filter(band_snapshot_id=second.pk)) == set(changed)
    assert all(before[row.pk] != row.band for row in changed)
    assert PoolOrder.objects.filter(band_snapshot_id=first.pk).count() == 9 - 3
    assert whole(second)
    assert bands_stored() == bands_of_spec()  # the unchanged rows hold second's bands too
    updates = [q["sql"] for q in ctx.captured_queries if q["sql"].startswith(f"UPDATE {ORDER_TABLE}")]
    assert len(updates) == 1


def test_without_a_global_average_no_band_is_written():
    AccountFactory.create_batch(2)
    snapshot = maintenance.latency_snapshot_refresh()  # no samples
    assert not PoolOrder.objects.filter(band_snapshot_id__isnull=False).exists()
    assert not whole(snapshot)


def test_a_proxy_change_clears_the_accounts_bands_and_other_edits_keep_them():
    accounts, fast, slow = _pool_with_latency()
    snapshot = maintenance.latency_snapshot_refresh()
    Account.objects.filter(pk=accounts[0].pk).update(proxy=slow)
    Account.objects.filter(pk=accounts[1].pk).update(remaining_credits=5.0, name="renamed")
    whole = Account.objects.get(pk=accounts[3].pk)
    whole.save()  # every column written, the proxy unchanged
    assert set(PoolOrder.objects.filter(band_snapshot_id__isnull=True).values_list("account_id", flat=True)) == {
        accounts[0].pk
    }
    assert PoolOrder.objects.filter(band_snapshot_id=snapshot.pk).count() == 9 - 2  # its two rows
    assert bands_stored() == bands_of_spec()


def test_a_proxys_new_url_clears_its_accounts_bands():
    """The samples of a proxy are keyed by its URL: under a new URL it has none."""
    accounts, fast, _ = _pool_with_latency()
    maintenance.latency_snapshot_refresh()
    Proxy.objects.filter(pk=fast.pk).update(url="http://fast-moved:1")
    cleared = set(PoolOrder.objects.filter(band_snapshot_id__isnull=True).values_list("account_id", flat=True))
    assert cleared == {a.pk for a in accounts if a.proxy_id == fast.pk}
    assert bands_stored() == bands_of_spec()


def test_a_proxy_deleted_clears_its_accounts_bands():
    accounts, fast, _ = _pool_with_latency()
    maintenance.latency_snapshot_refresh()
    on_fast = {a.pk for a in accounts if a.proxy_id == fast.pk}
    fast.delete()  # its accounts' proxy is set to none
    cleared = set(PoolOrder.objects.filter(band_snapshot_id__isnull=True).values_list("account_id", flat=True))
    assert cleared == on_fast
    assert bands_stored() == bands_of_spec()


def test_rows_added_after_the_refresh_have_no_band_until_the_next():
    accounts, *_ = _pool_with_latency()
    maintenance.latency_snapshot_refresh()
    newcomer = AccountFactory(name="newcomer")
    accounts[0].groups.get().accounts.add(accounts[4])
    assert set(PoolOrder.objects.filter(band_snapshot_id__isnull=True).values_list("scope_id", "account__name")) == {
        (0, "newcomer"),
        (accounts[0].groups.get().pk, "a4"),
    }
    snapshot = maintenance.latency_snapshot_refresh()
    assert set(PoolOrder.objects.filter(band_snapshot_id=snapshot.pk).values_list("scope_id", "account__name")) == {
        (0, "newcomer"),
        (accounts[0].groups.get().pk, "a4"),
    }
    assert PoolOrder.objects.filter(account=newcomer).get().band is not None
    assert bands_stored() == bands_of_spec()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from([*OPS, "proxy_change", "proxy_url_change", "bands_write"]), st.integers(0, 50)),
        min_size=1,
        max_size=12,
    ),
    data=st.data(),
)
def test_every_write_leaves_each_rows_band_its_snapshots_band(steps, data):
    with transaction.atomic():
        _, fast, slow = _pool_with_latency()
        maintenance.latency_snapshot_refresh()
        for op, pick in steps:
            accounts = list(Account.objects.order_by("pk"))
            if op == "proxy_change":
                account = accounts[pick % len(accounts)]
                Account.objects.filter(pk=account.pk).update(proxy=[fast, slow, None][pick % 3])
            elif op == "proxy_url_change":
                proxy = [fast, slow][pick % 2]
                # its pk in the URL: two proxies never move to the same one (URLs are unique)
                Proxy.objects.filter(pk=proxy.pk).update(url=f"http://moved-{proxy.pk}-{pick}:1")
            elif op == "bands_write":
                pool_order.pool_order_bands_write(LatencySnapshot.objects.latest("pk"))
            else:
                _apply(op, pick, data)
            assert bands_stored() == bands_of_spec(), op
        transaction.set_rollback(True)


# --- the walk's head is the full read's head, with bands ----------------------------------------

STALE = ["none", "kept", "skipped", "newer", "proxy", "proxy_url"]


def _staleness(made, proxies, kind: str, at: int, band: int) -> None:
    """One way a row comes to hold a band written under another snapshot
    than the read's, or none."""
    account = made[at % len(made)]
    rows = PoolOrder.objects.filter(account=account)
    snapshot = LatencySnapshot.objects.latest("pk")
    if kind == "none":
        rows.update(band=None, band_snapshot_id=None)
    elif kind == "kept":  # written under an older snapshot, unchanged in this one
        rows.update(band_snapshot_id=snapshot.pk - 1)
    elif kind == "skipped":  # a refresh could not write it: its snapshot is not whole
        rows.update(band=band, band_snapshot_id=snapshot.pk - 1)
        LatencySnapshot.objects.filter(pk=snapshot.pk).update(bands_whole_at=None)
    elif kind == "newer":  # a process a refresh behind
        rows.update(band=band, band_snapshot_id=snapshot.pk + 1)
    elif kind == "proxy":
        Account.objects.filter(pk=account.pk).update(proxy=proxies[band % 2])
    else:
        proxy = proxies[band % 2]
        # its pk in the URL: two proxies never move to the same one (URLs are unique)
        Proxy.objects.filter(pk=proxy.pk).update(url=f"http://moved-{proxy.pk}-{at}:1")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    accounts=account_specs(identities=14, min_size=4, max_size=16),
    identities=identity_specs(
        14, cooling=st.sampled_from([False] * 7 + [True]), in_flight=st.sampled_from([0, 0, 0, 0, 1, 3])
    ),
    proxy_cooling=st.tuples(st.booleans(), st.just(False)),
    global_avg=st.floats(100, 2500, allow_nan=False),
    proxy_samples=st.tuples(
        *[st.one_of(st.none(), st.tuples(st.integers(1, 40), st.floats(50, 3000, allow_nan=False)))] * 2
    ),
    stale=st.lists(st.tuples(st.sampled_from(STALE), st.integers(0, 15), st.integers(-3, 3)), max_size=3),
    preferred_pool=st.sampled_from([Pool.BALANCED, Pool.CREDIT_FIRST]),
    spread=st.booleans(),
    excluded=st.sets(st.integers(0, 15), max_size=2),
    preferred=st.sets(st.integers(0, 15), max_size=1),
    grouped=st.booleans(),
)
def test_with_bands_the_walks_head_is_the_full_reads_head_whenever_it_says_so(
    accounts,
    identities,
    proxy_cooling,
    global_avg,
    proxy_samples,
    stale,
    preferred_pool,
    spread,
    excluded,
    preferred,
    grouped,
):
    with transaction.atomic():
        made = pool_build(
            accounts, identities, proxy_cooling=proxy_cooling, global_avg=global_avg, proxy_samples=proxy_samples
        )
        key = pool_key(made, accounts, grouped=grouped, preferred_pool=preferred_pool)
        proxies = list(Proxy.objects.order_by("name"))
        for kind, at, band in stale:
            _staleness(made, proxies, kind, at, band)
        snapshot = latency_snapshot_latest()
        scope = PoolOrder.objects.filter(scope_id=key.account_group_id or PoolOrder.ALL_ACCOUNTS)
        bands_whole = (
            LatencySnapshot.objects.filter(pk=snapshot.id, bands_whole_at__isnull=False).exists()
            and not scope.filter(band_snapshot_id__isnull=True).exists()
            and not scope.filter(band_snapshot_id__gt=snapshot.id).exists()
        )
        walk_head_check(
            key,
            DispatchRequest(session_id="s" if spread else None, exclude_accounts=names_at(made, excluded)),
            preferred=names_at(made, preferred),
            snapshot=snapshot,
            bands_whole=bands_whole,
        )
        transaction.set_rollback(True)


# --- the dispatcher ------------------------------------------------------------------------


def _latency_pool(prefix: str, identities: int, *, max_concurrency: int = 4):
    """A pool whose accounts' first-token times put them in three bands,
    with a refreshed snapshot."""
    seeded = pool_seed(prefix=prefix, identities=uniform_pool(identities, max_concurrency=max_concurrency))
    for n, account in enumerate(seeded.accounts):
        LatencySampleFactory(account=account, first_token_ms=[400, 1000, 2500][n % 3])
    maintenance.latency_snapshot_refresh()
    return seeded


def test_a_large_pools_dispatch_with_bands_reads_its_head_through_the_order_table(settings):
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = 6
    seeded = _latency_pool("banded-", 9)
    gw = Gateway(seeded.key)
    with CaptureQueriesContext(connection) as ctx:
        account = gw.account_of(session_id="new-1")
    (read,) = _reads(ctx)
    assert ORDER_TABLE in read and '"band_snapshot_id"' in read
    # the fastest band: every third account, from the first
    assert account in {a.name for a in seeded.accounts[::3]}


def _granted(prefix: str, min_accounts: int, settings) -> list[str]:
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = min_accounts
    return scripted_day(_latency_pool(prefix, 7, max_concurrency=2), prefix)


def test_with_bands_the_walk_grants_what_the_full_read_grants(settings):
    assert _granted("walked-", 1, settings) == _granted("sorted-", 10_000, settings)


def test_a_row_without_its_band_sends_the_scopes_dispatches_to_the_full_read_until_the_next_refresh(settings):
    """A proxy changed since the refresh: the walk finds nothing (it cannot
    place that row), the full read decides, and grants the right account;
    after the next refresh the walk serves again."""
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = 6
    seeded = _latency_pool("moved-", 9)
    Account.objects.filter(pk=seeded.accounts[4].pk).update(proxy=ProxyFactory())
    gw = Gateway(seeded.key)
    with CaptureQueriesContext(connection) as ctx:
        account = gw.account_of(session_id="new-1")
    walked, full = _reads(ctx)
    assert ORDER_TABLE in walked and ORDER_TABLE not in full
    assert account in {a.name for a in seeded.accounts[::3]}
    maintenance.latency_snapshot_refresh()
    with CaptureQueriesContext(connection) as ctx:
        gw.account_of(session_id="new-2")
    (read,) = _reads(ctx)
    assert ORDER_TABLE in read


def _edit(edit: str, seeded) -> None:
    """An operator's edit that leaves order rows of the key's scope without a band."""
    if edit == "account added":
        seeded.group.accounts.add(AccountFactory(name="edited-new", proxy=ProxyFactory()))
    elif edit == "proxy changed":
        account = Account.objects.get(pk=seeded.accounts[4].pk)
        account.proxy = ProxyFactory()
        account.save()
    elif edit == "proxy moved":
        proxy = ProxyFactory()
        Account.objects.filter(pk__in=[a.pk for a in seeded.accounts[:3]]).update(proxy=proxy)
        maintenance.latency_snapshot_refresh()
        proxy.url = "http://moved:1"
        proxy.save()
    else:  # an account joins the group by an import: bulk writes, no post_save
        outsider = Account.objects.bulk_create([Account(name="edited-outsider", identity=seeded.accounts[0].identity)])
        pool_import({"groups": [{"name": seeded.group.name, "accounts": [a.name for a in seeded.accounts + outsider]}]})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("edit", ["account added", "proxy changed", "proxy moved", "imported"])
def test_an_operators_edit_leaves_no_row_without_its_band_once_it_commits(edit, settings):
    """An edit that leaves order rows without a band (a new member of the
    group, an account's proxy changed, a proxy's URL, an import) writes
    their bands once it commits: the scope's dispatches walk the band index
    at once, not only after the next refresh."""
    settings.KIROPOOL_WALK_MIN_ACCOUNTS = 6
    seeded = _latency_pool("edited-", 9)
    _edit(edit, seeded)
    assert not PoolOrder.objects.filter(band_snapshot_id__isnull=True).exists()
    assert whole(LatencySnapshot.objects.latest("pk"))
    assert bands_stored() == bands_of_spec()
    with CaptureQueriesContext(connection) as ctx:
        Gateway(seeded.key).account_of(session_id="new-1")
    (read,) = _reads(ctx)
    assert ORDER_TABLE in read


def _band_walk_plan(seeded) -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {PoolOrder._meta.db_table}")
        cursor.execute(f"ANALYZE {Account._meta.db_table}")
    key = ApiKey.objects.get(pk=seeded.key_ids["gateway"])
    shape, values = reads.request_shape(
        key=key,
        request=DispatchRequest(session_id="new"),
        now=timezone.now(),
        snapshot=latency_snapshot_latest(),
        spread=True,
        head=True,
    )
    assert shape.latency
    sql, params = reads.compiled(dataclasses.replace(shape, walk=True)).statement(values)
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        (plan,) = cursor.fetchone()
    return list(_nodes(plan[0]["Plan"]))


def test_the_band_walk_reads_the_band_index_and_not_the_pool(postgres_only):
    """300 accounts in three bands, beside 300 more written under an older
    snapshot (statistics taken then, as after a refresh: "older" looks like
    every row). The walk reads four rows of the band index, whether the
    scope's bands are whole takes one index entry per probe, and no scan of
    the accounts or the order runs."""
    other = _latency_pool("other-", 300)
    PoolOrder.objects.filter(account__in=other.accounts).update(band_snapshot_id=1)
    seeded = _latency_pool("many-", 300)
    nodes = _band_walk_plan(seeded)
    walked = [n for n in nodes if n.get("Index Name") == "pool_order_band_spread_idx"]
    assert walked and walked[0]["Actual Rows"] == HEAD_ROWS
    probes = [n for n in nodes if n.get("Index Name") == "pool_order_band_stale_idx"]
    # two probes for each member of the head read's union
    assert len(probes) % 2 == 0 and probes and all(n["Actual Rows"] <= 1 for n in probes)
    tables = {Account._meta.db_table, PoolOrder._meta.db_table}
    scanned = [n for n in nodes if n.get("Relation Name") in tables and n["Node Type"] == "Seq Scan"]
    assert not [n for n in scanned if n["Actual Loops"]]


# --- the refresh never waits for a row, and writes the rows it skipped ------------------------


def _refresh_in_a_thread(done: threading.Event) -> None:
    try:
        maintenance.latency_snapshot_refresh()
        done.set()
    finally:
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_the_refresh_never_waits_long_for_a_row_another_transaction_holds(postgres_only):
    """A row whose band changed stays held throughout: the refresh skips it,
    the completion pass gives up on it after its lock timeout, it keeps its
    older band, and the new snapshot's bands are not whole."""
    accounts, *_ = _pool_with_latency()
    first = maintenance.latency_snapshot_refresh()
    _samples_swapped(accounts[2], accounts[5])
    held = PoolOrder.objects.get(scope_id=PoolOrder.ALL_ACCOUNTS, account=accounts[2])
    done = threading.Event()
    with psycopg.connect(test_database_url()) as locker:
        locker.execute("SELECT 1 FROM routing_poolorder WHERE id = %s FOR UPDATE", [held.pk])
        worker = threading.Thread(target=_refresh_in_a_thread, args=(done,))
        worker.start()
        # Generous: the refresh takes milliseconds, and one LOCK_TIMEOUT
        # (200 ms) for the held row; waiting for it, it would take until the
        # rollback below.
        finished_while_held = done.wait(10.0)
        locker.rollback()
    worker.join(30)
    assert finished_while_held, "the refresh waited for a row lock"
    snapshot = LatencySnapshot.objects.latest("pk")
    written = set(PoolOrder.objects.filter(band_snapshot_id=snapshot.pk))
    assert written == set(PoolOrder.objects.filter(account__in=accounts[2::3]).exclude(pk=held.pk))
    assert PoolOrder.objects.get(pk=held.pk).band_snapshot_id == first.pk
    assert not whole(snapshot)
    assert bands_stored() == bands_of_spec()


@pytest.mark.django_db(transaction=True)
def test_the_refresh_holds_one_batch_of_rows_at_a_time_after_its_snapshot_commits(postgres_only, monkeypatch):
    """A lease start moves its identity's order rows: it waits for a batch,
    not for the whole refresh. Seen from another connection while the
    refresh writes its second batch: the snapshot has committed, the first
    batch's rows hold their new bands and are free, the rest wait for theirs."""
    _pool_with_latency()
    monkeypatch.setattr(pool_order, "BANDS_BATCH", 4)
    write = pool_order._bands_update
    seen: list[tuple] = []

    def observed(pks, snapshot):
        if pks and not seen:
            seen.append(("first", snapshot.pk, tuple(pks)))
        elif pks and len(seen) == 1:
            first = list(seen[0][2])
            with psycopg.connect(test_database_url(), autocommit=True) as other:
                committed = other.execute("SELECT count(*) FROM routing_latencysnapshot WHERE id = %s", [snapshot.pk])
                written = other.execute(
                    "SELECT count(*) FROM routing_poolorder WHERE band_snapshot_id = %s", [snapshot.pk]
                )
                counts = (committed.fetchone()[0], written.fetchone()[0])
                with other.transaction():
                    free = other.execute(
                        "SELECT id FROM routing_poolorder WHERE id = ANY(%s) FOR UPDATE NOWAIT", [first]
                    )
                    seen.append(("second", counts, len(free.fetchall())))
        return write(pks, snapshot)

    monkeypatch.setattr(pool_order, "_bands_update", observed)
    snapshot = maintenance.latency_snapshot_refresh()

    assert seen[1] == ("second", (1, 4), 4)  # committed; the first 4 written, unlocked
    assert PoolOrder.objects.filter(band_snapshot_id=snapshot.pk).count() == 9  # then all of them
    assert bands_stored() == bands_of_spec()


@pytest.mark.django_db(transaction=True)
def test_a_row_the_refresh_skipped_gets_its_band_once_released(postgres_only):
    accounts, *_ = _pool_with_latency()
    held = PoolOrder.objects.get(scope_id=PoolOrder.ALL_ACCOUNTS, account=accounts[1])
    with psycopg.connect(test_database_url()) as locker:
        locker.execute("SELECT 1 FROM routing_poolorder WHERE id = %s FOR UPDATE", [held.pk])
        # written as the refresh writes it: pool_order_bands_write skips the held row
        snapshot = latency_snapshot_create(global_avg_ms=900.0, accounts={"a1": (4, 2500.0)})
        assert PoolOrder.objects.get(pk=held.pk).band_snapshot_id != snapshot.pk
        locker.rollback()
    assert pool_order._bands_complete(snapshot, pool_order._to_write(snapshot)) == 1
    assert not PoolOrder.objects.exclude(band_snapshot_id=snapshot.pk).exists()
    assert bands_stored() == bands_of_spec()


def test_once_a_newer_snapshot_exists_no_band_is_written_under_an_older_one():
    """A writer a refresh behind (a catch-up that read the newest snapshot
    just before the refresh made another) writes nothing: the newer
    snapshot's refresh decides, and may already have found the row right."""
    accounts, fast, slow = _pool_with_latency()
    older = maintenance.latency_snapshot_refresh()
    newer = maintenance.latency_snapshot_refresh()
    assert PoolOrder.objects.filter(band_snapshot_id=newer.pk).count() == 0  # nothing changed
    Account.objects.filter(pk=accounts[0].pk).update(proxy=slow)  # its two rows lose their band
    assert pool_order.pool_order_bands_write(older) == 0
    assert pool_order._bands_complete(older, pool_order._to_write(older)) == 0
    assert pool_order._bands_complete(newer, pool_order._to_write(newer)) == 2
    assert set(PoolOrder.objects.filter(band_snapshot_id=newer.pk)) == set(
        PoolOrder.objects.filter(account=accounts[0])
    )
    assert bands_stored() == bands_of_spec()


def bands_under(snapshot: LatencySnapshot) -> dict[int, int]:
    """Every order row's band as SPEC §2 gives it under ``snapshot``, by row id."""
    loaded = snapshot_load(snapshot).snapshot
    proxies = dict(Account.objects.values_list("pk", "proxy__url"))
    return {
        pk: selection.latency_band(
            selection.latency_score(loaded, account=name, proxy_url=proxies[account_id]), loaded.global_avg_ms
        )
        for pk, account_id, name in PoolOrder.objects.values_list("pk", "account_id", "account__name")
    }


@pytest.mark.django_db(transaction=True)
def test_of_two_refreshes_at_once_the_one_that_reads_later_commits_later(postgres_only, monkeypatch):
    """A slow refresh, held here once it has read its samples, and the next
    one beside it: the next waits for the slow one's snapshot to commit
    before it reads, so the newest snapshot, by time and by id (the bands
    go by id), is the later read's, and the order table holds its bands.
    Before, the later read committed first and the slow one's snapshot,
    written after it, had the higher id: its older bands replaced the newer
    ones, and the dispatches, reading the newer snapshot, could not walk."""
    _pool_with_latency()  # samples of now, in the later window only
    later = timezone.now()
    earlier = later - timedelta(minutes=1)
    # in both windows: the earlier snapshot's one sample, so it has bands (all 0)
    LatencySampleFactory(
        account=AccountFactory(name="z"), first_token_ms=300, recorded_at=earlier - timedelta(minutes=9)
    )
    read, go, errors = threading.Event(), threading.Event(), []
    build = maintenance.latency_snapshot_build

    def slow_build(groups, *, generated_at):
        if generated_at == earlier:  # the slow refresh has read its samples
            read.set()
            assert go.wait(30)
        return build(groups, generated_at=generated_at)

    def refresh(now) -> None:
        try:
            maintenance.latency_snapshot_refresh(now=now)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)
        finally:
            connection.close()

    monkeypatch.setattr(maintenance, "latency_snapshot_build", slow_build)
    threads = [threading.Thread(target=refresh, args=(now,)) for now in (earlier, later)]
    try:
        threads[0].start()
        assert read.wait(10)
        threads[1].start()
        lock_wait_seen()  # until the next refresh waits for the slow one's commit
    finally:
        go.set()
        for thread in threads:
            thread.join(30)
    assert not errors
    newest = LatencySnapshot.objects.order_by("-pk")[0]
    assert (newest.generated_at, newest.pk) == (later, latency_snapshot_latest().id)
    assert whole(newest)
    assert dict(PoolOrder.objects.values_list("pk", "band")) == bands_under(newest)
    assert bands_stored() == bands_of_spec()


# --- a process follows the newest snapshot --------------------------------------------------


def test_a_process_reads_a_new_snapshot_once_its_check_period_has_passed(monkeypatch):
    first = latency_snapshot_create(global_avg_ms=500.0)
    monkeypatch.setattr(cached, "SNAPSHOT_CHECK_SECONDS", 3600.0)
    assert cached.latency_snapshot_current().id == first.pk
    second = latency_snapshot_create(global_avg_ms=700.0)
    with CaptureQueriesContext(connection) as ctx:
        assert cached.latency_snapshot_current().id == first.pk  # within the period: no query
    assert not ctx.captured_queries
    monkeypatch.setattr(cached, "SNAPSHOT_CHECK_SECONDS", 0.0)
    assert cached.latency_snapshot_current().id == second.pk
    with CaptureQueriesContext(connection) as ctx:
        assert cached.latency_snapshot_current().id == second.pk
    assert len(ctx.captured_queries) == 1  # the check, and no reload


def test_a_catch_up_writes_only_the_rows_without_a_band():
    """A row with a band is the refresh's to check: here one a refresh could
    not write (its snapshot not whole) keeps its older band until the next
    refresh, while the row an edit left without a band gets one at once."""
    accounts, fast, slow = _pool_with_latency()
    first = maintenance.latency_snapshot_refresh()
    _samples_swapped(accounts[2], accounts[5])
    second = maintenance.latency_snapshot_refresh()
    held = PoolOrder.objects.get(scope_id=PoolOrder.ALL_ACCOUNTS, account=accounts[5])
    PoolOrder.objects.filter(pk=held.pk).update(band=F("band") + 7, band_snapshot_id=first.pk)
    LatencySnapshot.objects.filter(pk=second.pk).update(bands_whole_at=None)  # as if the refresh had skipped it
    Account.objects.filter(pk=accounts[0].pk).update(proxy=slow)  # its two rows lose their band
    assert pool_order.pool_order_bands_catch_up() == 2
    assert set(PoolOrder.objects.filter(band_snapshot_id=second.pk, account=accounts[0])) == set(
        PoolOrder.objects.filter(account=accounts[0])
    )
    assert PoolOrder.objects.get(pk=held.pk).band_snapshot_id == first.pk
    assert not whole(second)
    maintenance.latency_snapshot_refresh()  # the next refresh sets it right
    assert bands_stored() == bands_of_spec()


@pytest.mark.django_db(transaction=True)
def test_refreshes_and_an_operators_edits_side_by_side_leave_every_band_right(postgres_only):
    """One thread refreshes, the samples moving between its runs so that
    bands change; another changes accounts' proxies and catches their bands
    up, as the admin does once an edit commits, first under the snapshot
    before the newest (a catch-up a refresh behind). However
    they interleave, every row's band is its snapshot's and every whole
    snapshot's since."""
    accounts, fast, slow = _pool_with_latency()
    maintenance.latency_snapshot_refresh()
    maintenance.latency_snapshot_refresh()
    errors: list[BaseException] = []

    def refreshes() -> None:
        try:
            for _ in range(8):
                _samples_swapped(accounts[2], accounts[5])  # their bands swap with every refresh
                maintenance.latency_snapshot_refresh()
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)
        finally:
            connection.close()

    def edits() -> None:
        try:
            for n in itertools.count():
                # at least one edit after the last refresh, when nothing can correct it
                last = not refresher.is_alive() and n >= 6
                Account.objects.filter(pk=accounts[n % 6].pk).update(proxy=[fast, slow, None][n % 3])
                # a catch-up that read the newest snapshot just before a refresh made another
                pool_order.pool_order_bands_write(LatencySnapshot.objects.order_by("-pk")[1])
                if last:  # nothing after it may set right what that wrote
                    break
                pool_order.pool_order_bands_catch_up()
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)
        finally:
            connection.close()

    refresher = threading.Thread(target=refreshes)
    threads = [refresher, threading.Thread(target=edits)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert LatencySnapshot.objects.filter(bands_whole_at__isnull=False).count() >= 2
    assert bands_stored() == bands_of_spec()
    pool_order.pool_order_bands_catch_up()  # the last edit's
    assert not PoolOrder.objects.filter(band_snapshot_id__isnull=True).exists()
    assert bands_stored() == bands_of_spec()


# --- migration 0016 ---------------------------------------------------------------------------


def _band_index_columns() -> str:
    """The definition of ``pool_order_band_idx``, as the database holds it."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'pool_order_band_idx'")
        else:
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = 'pool_order_band_idx'")
        (definition,) = cursor.fetchone()
    return definition.split("(", 1)[1].split(")", 1)[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("all_under_newest", [True, False])
def test_the_migration_marks_the_newest_snapshot_whole_only_if_every_row_is_under_it(all_under_newest):
    """As the refresh before it left them: every row under the newest
    snapshot, and the walk goes on at once; one row behind, and dispatches
    read in full until the next refresh. Reversed, the band indexes get
    their snapshot column back."""
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    AccountFactory.create_batch(3)
    try:
        apps = migrate([("routing", "0015_binding_rows_delete_per_statement")])
        assert "band_snapshot_id" in _band_index_columns()
        old = apps.get_model("routing", "LatencySnapshot").objects
        older = old.create(generated_at=timezone.now(), window_seconds=3600, global_avg_ms=900.0)
        newest = old.create(generated_at=timezone.now(), window_seconds=3600, global_avg_ms=900.0)
        PoolOrder.objects.update(band=0, band_snapshot_id=newest.pk)
        if not all_under_newest:
            PoolOrder.objects.filter(pk=PoolOrder.objects.order_by("pk")[0].pk).update(band_snapshot_id=older.pk)
    finally:
        migrate(latest)
    assert "band_snapshot_id" not in _band_index_columns()
    assert whole(LatencySnapshot.objects.get(pk=newest.pk)) is all_under_newest
    assert not whole(LatencySnapshot.objects.get(pk=older.pk))
