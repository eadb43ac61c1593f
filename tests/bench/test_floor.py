"""The benchmark's floor server and load generators against a real gunicorn
on the PostgreSQL test database: a few seconds, not the benchmark."""

from __future__ import annotations

import random

import pytest
from django.urls import Resolver404, resolve

from bench.load.clients import Client, Plan, closed_loop, open_loop
from bench.load.servers import floor_server
from bench.load.stats import poisson_schedule
from tests.factories import AccountFactory
from tests.support import project_env, test_database_url


def test_bench_code_is_not_in_the_production_urlconf():
    with pytest.raises(Resolver404):
        resolve("/bench/floor/1")
    with pytest.raises(Resolver404):
        resolve("/floor/1")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("postgres_only")
def test_floor_serves_one_select_on_sync_workers_and_the_load_generators_measure_it(tmp_path):
    account = AccountFactory(name="floor-account")
    env = project_env(tmp_path, DATABASE_URL=test_database_url())
    with floor_server(env, workers=2, log=tmp_path / "floor.log") as server:
        status, body, headers = Client(server.port).post(f"/floor/{account.pk}", {})
        assert (status, body) == (200, {"name": "floor-account"})
        assert headers["Content-Type"] == "application/json"
        assert "X-Frame-Options" not in headers  # CommonMiddleware only

        plan = Plan("floor", floor_pk=account.pk)
        closed = closed_loop(
            server.port, plan, name="t", seconds=1, warmup=0.2, clients=2, processes=1, keep_latencies=True
        )
        assert closed["errors"] == 0 and closed["requests"] == closed["cycles"] == len(closed["latencies_s"]) > 0
        assert closed["rps"] > 0 and closed["p50_ms"] <= closed["p99_ms"]
        # The window runs from its start to the last answer, which comes after
        # the 1 s asked for (each client sends until then): 2 s of slack for a
        # busy machine. Both figures are rounded, hence the 1 % tolerance.
        assert 1.0 <= closed["elapsed_s"] <= 3.0
        assert closed["rps"] == pytest.approx(closed["requests"] / closed["elapsed_s"], rel=0.01)

        opened = open_loop(server.port, plan, name="t", rate=40, seconds=1, warmup=0.25, seed=9, processes=2, threads=4)
        scheduled = [a for a in poisson_schedule(40, 1.25, random.Random(9)) if a >= 0.25]
        assert opened["arrivals"] == opened["requests"] == len(scheduled)
        assert opened["errors"] == 0
        # Measured from the scheduled start, every latency includes its service time.
        assert opened["p50_ms"] >= opened["service_p50_ms"] and opened["p99_ms"] >= opened["service_p99_ms"]
        # Each arrival counts itself, and at 40/s 1.2 others on average in its
        # 30 ms: over the ~40 measured (standard deviation about 0.2), 4.0
        # would be 8 standard deviations above.
        crowd = opened["crowding"]
        assert crowd["window_ms"] == 30.0
        assert 1.0 <= crowd["all"] <= 4.0 and crowd["slowest"] >= 1.0
        # Every measured arrival is either calm or crowded: the calm ones
        # always exist (the fewest any arrival counted is at most the
        # average, rounded), and the share of crowded ones is a fraction.
        assert crowd["calm_p99_ms"] > 0 and 0.0 <= crowd["crowded_share"] < 1.0
    assert "Using worker: sync" in (tmp_path / "floor.log").read_text()
