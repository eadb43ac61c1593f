"""The README's "complete gateway" is run as written: against a real kiropool
and a local upstream that rate-limits the first call and streams the second."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import RoutingIdentity
from routing.models import Lease, SessionBinding
from tests.client.conftest import open_leases, seed_pool

pytestmark = pytest.mark.django_db(transaction=True)

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_gateway() -> str:
    section = README.read_text().split("### A complete gateway", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


class Upstream:
    """A local upstream answering POSTs from a script of (status, headers, chunks)."""

    def __init__(self, script: list[tuple[int, dict[str, str], list[bytes]]]) -> None:
        self.script = list(script)
        self.received: list[dict] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                upstream.received.append(json.loads(self.rfile.read(length)))
                status, headers, chunks = upstream.script.pop(0)
                self.send_response(status)
                for name, value in {**headers, "Transfer-Encoding": "chunked", "Connection": "close"}.items():
                    self.send_header(name, value)
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/generate"

    def __enter__(self) -> Upstream:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_readme_gateway_runs_as_written(kiropool_url, monkeypatch):
    code = readme_gateway()
    assert len(code.splitlines()) < 30
    pool = seed_pool("readme", identities=2)
    script = [(429, {"Retry-After": "60"}, [b"slow down"]), (200, {}, [b"hello ", b"world"])]
    with Upstream(script) as upstream:
        monkeypatch.setenv("KIROPOOL_URL", kiropool_url)
        monkeypatch.setenv("KIROPOOL_KEY", pool.key)
        monkeypatch.setenv("UPSTREAM_URL", upstream.url)
        gateway: dict = {}
        exec(compile(code, str(README), "exec"), gateway)
        try:
            assert gateway["handle"]("conv-readme", "hi") == "hello world"
        finally:
            gateway["kiropool"].close()
    assert [body["prompt"] for body in upstream.received] == ["hi", "hi"]

    (limited, served) = Lease.objects.order_by("started_at")
    assert (limited.outcome, served.outcome) == ("rate_limited", "success")
    assert limited.account_name != served.account_name and served.first_token_ms is not None
    cooldown = RoutingIdentity.objects.get(id=limited.identity_id).cooldown_until - timezone.now()
    assert timedelta(seconds=50) < cooldown <= timedelta(seconds=60)  # slack: 10 s
    assert SessionBinding.objects.get(session_id="conv-readme").account.name == served.account_name
    assert open_leases() == []
