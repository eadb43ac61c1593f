"""Write recorded traffic as JSON lines for the fairness simulator's replay
(``make simulate TRACE=file``)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime

from routing.models import Lease

# One line per lease, in this shape; bench/simulate/traffic.py reads it back.
FIELDS = {
    "started_at": "started_at",
    "api_key": "api_key__name",
    "session_id": "session_id",
    "model": "model",
    "account_name": "account_name",
    "routing_identity": "identity__name",
    "outcome": "outcome",
    "first_token_ms": "first_token_ms",
    "completed_at": "completed_at",
}


class Command(BaseCommand):
    help = (
        "Export leases (request time, key, session id, model, account, outcome, first-token latency, "
        "completion) as JSON lines, oldest first, for `python -m bench.simulate --trace FILE`."
    )

    def add_arguments(self, parser):
        parser.add_argument("--output", "-o", default="-", help="file to write (default: standard output)")
        parser.add_argument("--since", type=_when, help="only leases started at or after (ISO 8601)")
        parser.add_argument("--until", type=_when, help="only leases started before (ISO 8601)")

    def handle(self, *args, output: str, since: datetime | None, until: datetime | None, **options):
        leases = Lease.objects.order_by("started_at", "id")
        if since is not None:
            leases = leases.filter(started_at__gte=since)
        if until is not None:
            leases = leases.filter(started_at__lt=until)
        rows = leases.values_list(*FIELDS.values()).iterator(chunk_size=2000)

        try:
            target = self.stdout if output == "-" else open(output, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"{output}: cannot write it ({exc})") from None
        count = 0
        try:
            for row in rows:
                target.write(json.dumps(_line(row)) + "\n")
                count += 1
        finally:
            if target is not self.stdout:
                target.close()
        self.stderr.write(f"Wrote {count} leases to {'standard output' if output == '-' else output}.")


def _line(row: tuple) -> dict:
    line = dict(zip(FIELDS, row, strict=True))
    for name in ("started_at", "completed_at"):
        if line[name] is not None:
            line[name] = line[name].isoformat()
    for name in ("session_id", "model", "outcome"):
        line[name] = line[name] or None  # blank in the table means none
    return line


def _when(value: str) -> datetime:
    try:
        parsed = parse_datetime(value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date-time: {value!r}")
    if parsed.tzinfo is None:
        # The example is the same time in UTC, in a form this accepts (a bare
        # date with a "Z" after it is not one).
        raise argparse.ArgumentTypeError(f"give a time zone, e.g. {parsed.replace(tzinfo=UTC).isoformat()}")
    return parsed
