"""`make bench`: the dispatcher under load, against the framework floor.

gunicorn (gunicorn.conf.py, 4 workers) on PostgreSQL; 50 identities with one
account each (max_concurrency 4), one key over all of them, 65,536 live
bindings; 16 concurrent clients run dispatch → complete cycles (80 % existing
sessions, 10 % new sessions, 10 % without a session) for a fixed duration;
then the same with 0 bindings; and a minimal DRF endpoint doing one indexed
SELECT, as the floor. Then how long a waiting dispatch takes to acquire after
another client releases the slot it waits for.

A benchmark, not a test: it asserts nothing, it measures and writes
bench/out/bench.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
IDENTITIES = 50
BINDINGS = 65_536
CLIENTS = 16
CLIENT_PROCESSES = 4


# --- setup -------------------------------------------------------------------


def database_recreate(url: str) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def django_setup(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def pool_seed() -> dict:
    from django.core.management import call_command
    from django.utils import timezone

    from accounts.models import Account, AccountGroup, RoutingIdentity
    from accounts.services import api_key_create

    call_command("migrate", verbosity=0)
    identities = RoutingIdentity.objects.bulk_create(
        RoutingIdentity(name=f"identity-{i:02d}", max_concurrency=4) for i in range(IDENTITIES)
    )
    accounts = Account.objects.bulk_create(
        Account(name=f"account-{i:02d}", identity=identity, region="us-east-1") for i, identity in enumerate(identities)
    )
    group = AccountGroup.objects.create(name="bench")
    group.accounts.set(accounts)
    key, plaintext = api_key_create(name="bench", account_group=group)
    wake_identity = RoutingIdentity.objects.create(name="wake", max_concurrency=1)
    wake_account = Account.objects.create(name="wake", identity=wake_identity)
    _, wake_key = api_key_create(name="wake", route_strategy="fixed", fixed_account=wake_account)
    bindings_seed(key_id=key.pk, account_ids=[a.pk for a in accounts], now=timezone.now())
    return {"key": plaintext, "wake_key": wake_key, "floor_pk": accounts[0].pk}


def bindings_seed(*, key_id: int, account_ids: list[int], now) -> None:
    from routing.models import SessionBinding

    expires = now + timedelta(hours=6)
    batch = []
    for n in range(BINDINGS):
        batch.append(
            SessionBinding(
                api_key_id=key_id,
                session_id=f"s-{n}",
                account_id=account_ids[n % len(account_ids)],
                created_at=now,
                updated_at=now,
                expires_at=expires,
            )
        )
        if len(batch) == 8192:
            SessionBinding.objects.bulk_create(batch)
            batch = []
    SessionBinding.objects.bulk_create(batch)


def bindings_clear() -> int:
    from routing.models import SessionBinding

    return SessionBinding.objects.all().delete()[0]


def live_bindings() -> int:
    from django.utils import timezone

    from routing.models import SessionBinding

    return SessionBinding.objects.filter(expires_at__gt=timezone.now()).count()


# --- the server ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_start(url: str, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "KIROPOOL_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "4",
        "KIROPOOL_BENCH_FLOOR": "1",
        "KIROPOOL_AFFINITY_MAX_ENTRIES": "1000000",
        "LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": str(ROOT / "var" / "bench-prometheus"),
    }
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "kiropool.wsgi:application"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("gunicorn did not come up")


def server_stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# --- clients -------------------------------------------------------------------


class Client:
    def __init__(self, port: int, key: str | None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        self.conn.request("POST", path, json.dumps(body), self.headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")


def _client_loop(kind: str, port: int, key: str, floor_pk: int, seconds: float, seed: int, results: list) -> None:
    rng = random.Random(seed)
    client = Client(port, key if kind == "dispatch" else None)
    latencies, served, errors = [], 0, 0
    end = time.monotonic() + seconds
    new_counter = 0
    while time.monotonic() < end:
        if kind == "floor":
            started = time.perf_counter()
            status, _ = client.post(f"/bench/floor/{floor_pk}", {})
            latencies.append(time.perf_counter() - started)
            served += 1
            errors += status != 200
            continue
        roll = rng.random()
        if roll < 0.8:
            body = {"session_id": f"s-{rng.randrange(BINDINGS)}"}
        elif roll < 0.9:
            new_counter += 1
            body = {"session_id": f"new-{seed}-{new_counter}"}
        else:
            body = {}
        started = time.perf_counter()
        status, data = client.post("/api/v1/dispatch", body)
        latencies.append(time.perf_counter() - started)
        served += 1
        if status != 200:
            errors += 1
            continue
        status, _ = client.post(
            f"/api/v1/leases/{data['lease_id']}/complete",
            {"outcome": "success", "first_token_ms": rng.uniform(300, 900)},
        )
        served += 1
        errors += status != 200
    results.append((latencies, served, errors))


def _client_process(kind, port, key, floor_pk, seconds, seed, threads, queue) -> None:
    results: list = []
    workers = [
        threading.Thread(target=_client_loop, args=(kind, port, key, floor_pk, seconds, seed * 100 + t, results))
        for t in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(results)


def load_run(kind: str, port: int, key: str, floor_pk: int, seconds: float) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client_process,
            args=(kind, port, key, floor_pk, seconds, p + 1, CLIENTS // CLIENT_PROCESSES, queue),
        )
        for p in range(CLIENT_PROCESSES)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get()]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - started
    latencies = sorted(x for lat, _, _ in results for x in lat)
    served = sum(s for _, s, _ in results)
    errors = sum(e for _, _, e in results)
    return {
        "rps": round(served / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "requests": served,
        "errors": errors,
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def wake_measure(port: int, wake_key: str, rounds: int) -> dict:
    """A holder takes the only slot; a waiter dispatches and blocks; the
    holder releases. Wake latency = waiter's answer − holder's release answer."""
    holder = Client(port, wake_key)
    samples = []
    for _ in range(rounds):
        status, held = holder.post("/api/v1/dispatch", {"max_wait_ms": 0})
        if status != 200:
            raise SystemExit(f"wake: holder could not dispatch: {held}")
        answered: dict = {}

        def wait_for_slot(answered=answered):
            status, body = Client(port, wake_key).post("/api/v1/dispatch", {"max_wait_ms": 10_000})
            answered["at"] = time.perf_counter()
            answered["status"], answered["body"] = status, body

        waiter = threading.Thread(target=wait_for_slot)
        waiter.start()
        time.sleep(0.2)  # let the waiter find the slot taken and start waiting
        holder.post(f"/api/v1/leases/{held['lease_id']}/complete", {"outcome": "success"})
        released_at = time.perf_counter()
        waiter.join()
        if answered["status"] != 200:
            raise SystemExit(f"wake: waiter failed: {answered['body']}")
        samples.append(max(0.0, answered["at"] - released_at) * 1000)
        holder.post(f"/api/v1/leases/{answered['body']['lease_id']}/complete", {"outcome": "success"})
    return {"p50": round(statistics.median(samples), 2), "max": round(max(samples), 2)}


# --- main ----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", 20)))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kiropool_bench"),
    )
    parser.add_argument("--wake-rounds", type=int, default=20)
    args = parser.parse_args()
    if not args.database_url.startswith("postgres"):
        raise SystemExit("make bench runs on PostgreSQL: set BENCH_DATABASE_URL=postgres://...")

    print(f"seeding {IDENTITIES} identities and {BINDINGS:,} bindings in {args.database_url} ...", flush=True)
    database_recreate(args.database_url)
    django_setup(args.database_url)
    seeded = pool_seed()
    from django.db import connections

    connections.close_all()
    port = free_port()
    server = server_start(args.database_url, port)
    try:
        report: dict = {}
        print(f"floor: {args.seconds:.0f} s, {CLIENTS} clients ...", flush=True)
        report["floor"] = load_run("floor", port, seeded["key"], seeded["floor_pk"], args.seconds)
        bindings = live_bindings()
        print(f"dispatch with {bindings:,} live bindings: {args.seconds:.0f} s ...", flush=True)
        report["dispatch"] = {
            "bindings": bindings,
            **load_run("dispatch", port, seeded["key"], seeded["floor_pk"], args.seconds),
        }
        bindings_clear()
        connections.close_all()
        print(f"dispatch with 0 bindings: {args.seconds:.0f} s ...", flush=True)
        report["dispatch_no_bindings"] = load_run("dispatch", port, seeded["key"], seeded["floor_pk"], args.seconds)
        print(f"wake after release: {args.wake_rounds} rounds ...", flush=True)
        report["wake_after_release_ms"] = wake_measure(port, seeded["wake_key"], args.wake_rounds)
    finally:
        server_stop(server)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table_print(report)


def table_print(report: dict) -> None:
    floor, dispatch, empty = report["floor"], report["dispatch"], report["dispatch_no_bindings"]
    wake = report["wake_after_release_ms"]
    print()
    print(f"{'run':<24}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, row in (
        ("floor", floor),
        (f"dispatch ({dispatch['bindings']:,} b.)", dispatch),
        ("dispatch (0 b.)", empty),
    ):
        print(f"{name:<24}{row['rps']:>10.1f}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}{row['errors']:>8}")
    print()
    checks = [
        ("dispatch rps / floor rps >= 0.6", dispatch["rps"] / floor["rps"], 0.6, True),
        ("dispatch p99 <= 25 ms", dispatch["p99_ms"], 25, False),
        ("dispatch rps / no-bindings rps >= 0.9", dispatch["rps"] / empty["rps"], 0.9, True),
        ("wake p50 <= 50 ms", wake["p50"], 50, False),
    ]
    for label, value, target, at_least in checks:
        met = value >= target if at_least else value <= target
        print(f"{label:<42}{value:>10.2f}   {'met' if met else 'NOT met'}")
    print(f"{'wake after release max (ms)':<42}{wake['max']:>10.2f}")
    print(f"\nwritten: {OUT / 'bench.json'}")


if __name__ == "__main__":
    main()
