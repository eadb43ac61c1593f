"""Helpers shared by the tests that start other processes against the test
database (workers, a real gunicorn)."""

from urllib.parse import quote

from django.db import connection


def test_database_url() -> str:
    """DATABASE_URL of the PostgreSQL database this test run is using."""
    s = connection.settings_dict
    auth = quote(s["USER"] or "")
    if s["PASSWORD"]:
        auth += ":" + quote(s["PASSWORD"])
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


test_database_url.__test__ = False  # a helper, not a test
