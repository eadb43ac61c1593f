"""The benchmark's database: recreated for every run, and seeded with
:mod:`routing.pools` (kiropool's one pool seeder), one pool per phase so no
phase inherits another's sessions or leases."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent.parent
BINDINGS = 65_536
BAND_LATENCIES_MS = (400.0, 1000.0, 2500.0)  # first-token times of the banded pool's three thirds
MAX_CONCURRENCY = 4  # per identity, for the load phases: room for all 16 closed-loop clients in every pool
HISTORY_PREFIX = "hist-"
MAIN_PREFIX = "main-"  # the throughput pool's, with its 65,536 bindings


def database_recreate(url: str) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def django_setup() -> None:
    """Django for seeding, on the environment ``main`` prepared (DATABASE_URL, keys)."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "kiropool.settings"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


@dataclass(frozen=True)
class Seeded:
    key: str  # 50 accounts, 65,536 live bindings: the mixed-traffic phase
    key_id: int
    empty_key: str  # the same pool shape without bindings
    empty_key_id: int
    floor_pk: int  # the account the floor reads
    pool_keys: dict[int, str]  # accounts → key of a pool of that size (pool-size phase)
    open_keys: dict[int, str]  # accounts → key of a pool of that size (open loop)
    wake_key: str  # one identity, one slot
    waiting_key: str  # one identity, one slot (bounded waiting)
    banded_key: str = ""  # the large pool's size, ordered by latency bands (pool-size phase)
    history_key: str = ""  # 50 accounts, the leases of a day behind them (history phase)


def bench_seed(*, main_accounts: int, pool_sizes: tuple[int, ...], open_sizes: tuple[int, ...]) -> Seeded:
    from django.core.management import call_command

    from accounts.models import ApiKey
    from routing.pools import bindings_seed, pool_seed, uniform_pool

    call_command("migrate", verbosity=0)
    main = pool_seed(prefix=MAIN_PREFIX, identities=uniform_pool(main_accounts, max_concurrency=MAX_CONCURRENCY))
    bindings_seed(key_id=main.key_ids["gateway"], accounts=main.accounts, count=BINDINGS)
    # Its own pool rather than the main one emptied: the main one's bindings
    # are kept for the throughput phase and the binding purge.
    empty = pool_seed(prefix="empty-", identities=uniform_pool(main_accounts, max_concurrency=MAX_CONCURRENCY))

    banded = pool_seed(prefix="bands-", identities=uniform_pool(max(pool_sizes), max_concurrency=MAX_CONCURRENCY))
    latency_samples_seed(banded.accounts)

    def key(prefix: str, accounts: int, max_concurrency: int = MAX_CONCURRENCY) -> str:
        return pool_seed(prefix=prefix, identities=uniform_pool(accounts, max_concurrency=max_concurrency)).key

    seeded = Seeded(
        key=main.key,
        key_id=main.key_ids["gateway"],
        empty_key=empty.key,
        empty_key_id=empty.key_ids["gateway"],
        floor_pk=main.accounts[0].pk,
        pool_keys={n: key(f"size{n}-", n) for n in pool_sizes},
        open_keys={n: key(f"open{n}-", n) for n in open_sizes},
        wake_key=key("wake-", 1, max_concurrency=1),
        waiting_key=key("wait-", 1, max_concurrency=1),
        banded_key=banded.key,
        history_key=key(HISTORY_PREFIX, main_accounts),
    )
    # The one key ordered by latency: every other key routes without it, as
    # they all did before the bench had a snapshot.
    ApiKey.objects.exclude(pk=banded.key_ids["gateway"]).update(latency_routing_enabled=False)
    latency_refresh()
    statistics_refresh()
    return seeded


def latency_samples_seed(accounts) -> None:
    """First-token samples that put a third of ``accounts`` in each of three
    latency bands (fast, average, slow)."""
    from django.utils import timezone

    from routing.models import LatencySample

    now = timezone.now()
    LatencySample.objects.bulk_create(
        LatencySample(account=account, first_token_ms=BAND_LATENCIES_MS[n % 3], recorded_at=now)
        for n, account in enumerate(accounts)
        for _ in range(3)
    )


def latency_refresh() -> None:
    """A new latency snapshot, with its bands in the order table, as the
    periodic task writes it (no Celery runs during the bench). Run again
    before the pool-size phase: a snapshot orders only while it is fresh."""
    from django.db import connections

    from routing.maintenance import latency_snapshot_refresh

    latency_snapshot_refresh()
    connections.close_all()


def statistics_refresh() -> None:
    """Planner statistics and visibility map, and the dead rows gone, as
    autovacuum would have them on a database that has been running a while:
    after seeding (without them the first phases measure plans made blind),
    and between phases (``Run.vacuum``)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")


def live_bindings(key_id: int) -> int:
    from django.utils import timezone

    from routing.models import SessionBinding

    return SessionBinding.objects.filter(api_key_id=key_id, expires_at__gt=timezone.now()).count()


def history_seed(leases: int) -> None:
    """``leases`` leases on the history pool's identities, started two hours
    ago and completed: what a day of traffic leaves in the indexes of open
    leases between two vacuums (each completion leaves its old row version
    there). Their expiries lie an hour back, spread over a minute; the
    table is analyzed, not vacuumed."""
    from django.db import connection
    from django.utils import timezone

    from accounts.models import Account
    from routing.models import Lease

    accounts = list(Account.objects.filter(name__startswith=HISTORY_PREFIX).values_list("pk", "identity_id", "name"))
    now = timezone.now()
    table = connection.ops.quote_name(Lease._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""INSERT INTO {table} (id, account_id, identity_id, account_name, proxy_url, session_id, model,
                    started_at, expires_at, outcome, waited_ms, sticky, moved_from, quota_probe, error_message)
                SELECT gen_random_uuid(), a.pk, a.identity_id, a.name, '', '', '',
                       %s, %s + (g * interval '60 seconds') / %s, '', 0, '', '', false, ''
                  FROM generate_series(1, %s) AS g
                  JOIN unnest(%s::bigint[], %s::bigint[], %s::text[]) WITH ORDINALITY AS a(pk, identity_id, name, n)
                    ON a.n = 1 + g %% %s""",
            [
                now - timedelta(hours=2),
                now - timedelta(hours=1),
                leases,
                leases,
                [pk for pk, _, _ in accounts],
                [identity for _, identity, _ in accounts],
                [name for _, _, name in accounts],
                len(accounts),
            ],
        )
        cursor.execute(
            f"UPDATE {table} SET completed_at = %s, outcome = 'success'"
            " WHERE completed_at IS NULL AND account_name LIKE %s",
            [now - timedelta(hours=1), f"{HISTORY_PREFIX}%"],
        )
        # Statistics of a table of mostly completed leases, as autovacuum's
        # analyze keeps them on a lease table holding weeks of history (its
        # vacuum, which would drop the old row versions, comes only after a
        # fifth of such a table changed). Without them the reads keep plans
        # made for the near-empty table the bench started with: a scan of
        # every lease per dispatch, from 1970 or from the mark.
        cursor.execute(f"ANALYZE {table}")
    connection.close()


def samples_seed(count: int, *, proxies: int = 20) -> None:
    """``count`` first-token samples on the history pool's accounts, spread
    evenly over the snapshot window's hour up to now, two in three through
    one of ``proxies`` proxy URLs: what a gateway completing ``count / 3600``
    requests a second leaves for each latency refresh to read. Analyzed, as
    autovacuum would have the table."""
    from django.db import connection
    from django.utils import timezone

    from accounts.models import Account
    from routing.latency import SNAPSHOT_WINDOW
    from routing.models import LatencySample

    accounts = list(Account.objects.filter(name__startswith=HISTORY_PREFIX).values_list("pk", flat=True))
    table = connection.ops.quote_name(LatencySample._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""INSERT INTO {table} (account_id, proxy_url, first_token_ms, recorded_at)
                SELECT (%s::bigint[])[1 + g %% %s],
                       CASE WHEN g %% 3 = 0 THEN '' ELSE 'http://proxy-' || (g %% %s) || ':3128' END,
                       200 + (g %% 1777), %s - (g * %s) / %s
                  FROM generate_series(0, %s - 1) AS g""",
            [accounts, len(accounts), proxies, timezone.now(), SNAPSHOT_WINDOW, count, count],
        )
        cursor.execute(f"ANALYZE {table}")
    connection.close()


def bindings_expire(*, key_id: int, count: int) -> None:
    """Expire ``count`` of the key's live bindings (the lowest ids), as a
    minute of them would have expired by the purge's next run."""
    from django.db.models import F
    from django.db.models.functions import Now

    from routing.models import SessionBinding

    live = SessionBinding.objects.filter(api_key_id=key_id, expires_at__gt=Now()).order_by("pk")
    # A millisecond after its last update: about the earliest expiry a binding may have.
    SessionBinding.objects.filter(pk__in=list(live.values_list("pk", flat=True)[:count])).update(
        expires_at=F("updated_at") + timedelta(milliseconds=1)
    )


def reap() -> None:
    """One run of the periodic reaper (no Celery runs during the bench)."""
    from django.db import connections

    from routing.slots import lease_reap_expired

    lease_reap_expired(lock_timeout=True)
    connections.close_all()
