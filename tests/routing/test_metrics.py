"""/metrics: event counters, gauges read from the database, multiprocess mode."""

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from routing import metrics
from routing.models import LatencySnapshot, PoolOrder
from tests.factories import (
    AccountFactory,
    LeaseFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
    latency_snapshot_create,
)

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent.parent


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_dispatch_results_are_counted(client):
    before = scrape(client)
    metrics.dispatch_observe("sticky_hit", 0.004, 0.0)
    metrics.dispatch_observe("sticky_hit", 0.006, 0.0)
    metrics.dispatch_observe("rate_limited", 2.0, 1.5)
    after = scrape(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("kiropool_dispatches_total", result="sticky_hit") == 2
    assert delta("kiropool_dispatches_total", result="rate_limited") == 1
    assert delta("kiropool_dispatches_total", result="new_session") == 0
    assert delta("kiropool_dispatch_duration_seconds_count") == 3
    assert delta("kiropool_dispatch_duration_seconds_bucket", le="0.005") == 1
    assert delta("kiropool_dispatch_wait_seconds_bucket", le="0.0") == 2
    assert delta("kiropool_dispatch_wait_seconds_sum") == pytest.approx(1.5)


def test_every_result_and_outcome_is_exported_from_the_start(client):
    samples = scrape(client)
    for result in metrics.DISPATCH_RESULTS:
        assert ("kiropool_dispatches_total", (("result", result),)) in samples
    for outcome in metrics.COMPLETION_OUTCOMES:
        assert ("kiropool_lease_completions_total", (("outcome", outcome),)) in samples


def test_completions_are_counted_by_outcome(client):
    key = ("kiropool_lease_completions_total", (("outcome", "quota_exhausted"),))
    before = scrape(client)[key]
    metrics.completion_observe("quota_exhausted")
    assert scrape(client)[key] == before + 1


def test_unknown_labels_are_refused():
    with pytest.raises(ValueError):
        metrics.dispatch_observe("lucky", 0.1, 0.0)
    with pytest.raises(ValueError):
        metrics.completion_observe("expired")  # the reaper's, never a gateway's


def test_pool_state_is_read_from_the_database(client):
    now = timezone.now()
    busy = RoutingIdentityFactory(name="busy", cooldown_until=now + timedelta(minutes=1))
    idle = RoutingIdentityFactory(name="idle", cooldown_until=now - timedelta(minutes=1))
    account, alias = AccountFactory(identity=busy), AccountFactory(identity=busy)
    LeaseFactory(account=account)
    LeaseFactory(account=alias)
    LeaseFactory(account=alias, expires_at=now - timedelta(seconds=1))  # past its TTL: not in flight
    SessionBindingFactory(account=account)
    SessionBindingFactory(account=alias)
    SessionBindingFactory(account=alias, updated_at=now - timedelta(hours=7), expires_at=now)  # expired
    AccountFactory(identity=idle)
    latency_snapshot_create(generated_at=now - timedelta(seconds=90), window_seconds=3600)

    samples = scrape(client)

    assert samples[("kiropool_identity_leases_in_flight", (("identity", "busy"),))] == 2
    assert samples[("kiropool_identity_leases_in_flight", (("identity", "idle"),))] == 0
    assert samples[("kiropool_identity_live_bindings", (("identity", "busy"),))] == 2
    assert samples[("kiropool_identity_live_bindings", (("identity", "idle"),))] == 0
    assert samples[("kiropool_identities_cooling_down", ())] == 1
    assert samples[("kiropool_identities", ())] == 2
    assert samples[("kiropool_database_up", ())] == 1
    assert 90 <= samples[("kiropool_latency_snapshot_age_seconds", ())] < 120
    assert ("kiropool_latency_bands_whole", ()) not in samples  # no global average: no band orders


@pytest.mark.parametrize("whole", [True, False])
def test_the_bands_gauge_says_whether_the_newest_snapshots_bands_are_whole(client, whole):
    """Whole once the refresh has checked every row; not when a row it had
    to write stayed held (a snapshot the refresh left unmarked)."""
    account = AccountFactory(name="a")
    latency_snapshot_create(global_avg_ms=900.0, accounts={"a": (4, 2500.0)})
    assert PoolOrder.objects.get(account=account, scope_id=PoolOrder.ALL_ACCOUNTS).band is not None
    if not whole:
        LatencySnapshot.objects.update(bands_whole_at=None)
    assert scrape(client)[("kiropool_latency_bands_whole", ())] == int(whole)


# A reading: the identity aggregate, the snapshot, the drift, and the ping
# before them, which is a query on SQLite and a connection of its own on
# PostgreSQL (core/database.py).
READING_QUERIES = 3 if connection.vendor == "postgresql" else 4


def test_a_burst_of_scrapes_runs_the_pool_aggregates_once(client, django_assert_num_queries, database_pings):
    busy = RoutingIdentityFactory(name="busy")
    LeaseFactory(account=AccountFactory(identity=busy))
    with django_assert_num_queries(READING_QUERIES):  # once for the burst
        burst = [scrape(client) for _ in range(50)]
    assert len(database_pings) == 1
    assert all(samples[("kiropool_identity_leases_in_flight", (("identity", "busy"),))] == 1 for samples in burst)
    # The event counters are not part of the reused reading: they stay live.
    metrics.completion_observe("success")
    key = ("kiropool_lease_completions_total", (("outcome", "success"),))
    assert scrape(client)[key] == burst[-1][key] + 1


def test_the_pool_state_is_read_again_after_the_interval(client, django_assert_num_queries):
    added = ("kiropool_identity_leases_in_flight", (("identity", "added"),))
    scrape(client)
    RoutingIdentityFactory(name="added")
    assert added not in scrape(client)  # the reading is reused...
    time.sleep(metrics.POOL_STATE_CACHE_SECONDS + 0.2)
    with django_assert_num_queries(READING_QUERIES):
        assert scrape(client)[added] == 0  # ...for no longer than the interval


def test_metrics_are_open_by_default_and_can_require_a_token(client, settings):
    assert client.get("/metrics").status_code == 200
    settings.KIROPOOL_METRICS_TOKEN = "scrape-secret"
    denied = client.get("/metrics")
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert scrape(client, HTTP_AUTHORIZATION="Bearer scrape-secret")


WORKER = """
import django, sys
django.setup()
from routing import metrics
for _ in range(int(sys.argv[1])):
    metrics.dispatch_observe("new_session", 0.01, 0.0)
metrics.completion_observe("success")
"""

SCRAPER = """
import django, sys
django.setup()
from routing import metrics
sys.stdout.write(metrics.exposition()[0].decode())
"""


def test_multiprocess_mode_sums_every_worker(tmp_path):
    """What a web server with several workers does: each process counts into the
    shared folder, and any process's scrape sums them."""
    env = {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "kiropool.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'unmigrated.sqlite3'}",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }

    def run(code: str, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout

    run(WORKER, "3")
    run(WORKER, "4")
    samples = parse(run(SCRAPER))

    assert samples[("kiropool_dispatches_total", (("result", "new_session"),))] == 7
    assert samples[("kiropool_dispatch_duration_seconds_count", ())] == 7
    assert samples[("kiropool_lease_completions_total", (("outcome", "success"),))] == 2
    # That database has no tables: the scrape still answers, and says so.
    assert samples[("kiropool_database_up", ())] == 0
