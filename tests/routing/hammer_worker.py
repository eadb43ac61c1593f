"""One OS process of the concurrency tests: dispatch → hold → complete cycles
through the real HTTP stack (Django's test client), against the database named
by DATABASE_URL. Prints one JSON line of what it saw.

Run by tests/routing/test_concurrency.py, never by pytest directly."""

import json
import os
import sys
import time

import django


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")
    django.setup()
    from django.db import connection
    from django.test import Client

    plaintext, cycles, hold_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    client = Client(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    acquired, refused, peaks = [], 0, []
    for i in range(cycles):
        response = client.post(
            "/api/v1/dispatch", {"session_id": f"{os.getpid()}-{i % 3}", "max_wait_ms": 20_000}, "application/json"
        )
        if response.status_code != 200:
            refused += 1
            continue
        lease = response.json()
        identity = lease["account"]["routing_identity"]
        # The probe counts holders from outside the dispatcher: incremented
        # after the lease is granted, decremented before it is released, so
        # it can only under-count the real concurrency.
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE hammer_probe SET holders = holders + 1, peak = GREATEST(peak, holders + 1) "
                "WHERE identity = %s RETURNING holders",
                [identity],
            )
            peaks.append(cursor.fetchone()[0])
        time.sleep(hold_ms / 1000)
        with connection.cursor() as cursor:
            cursor.execute("UPDATE hammer_probe SET holders = holders - 1 WHERE identity = %s", [identity])
        done = client.post(
            f"/api/v1/leases/{lease['lease_id']}/complete",
            {"outcome": "success", "first_token_ms": hold_ms},
            "application/json",
        )
        assert done.status_code == 200, done.content
        acquired.append(lease["lease_id"])
    print(json.dumps({"acquired": acquired, "refused": refused, "peak": max(peaks, default=0)}))


if __name__ == "__main__":
    main()
