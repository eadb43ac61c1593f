"""``manage.py demo`` (``make demo``): a living pool in one command.

Seeds the demonstration pool, starts the web app (``core.webserver``) and
plays synthetic gateways against it for a while (``routing/demo/``). The
login, the API keys and the dashboard URL are printed at the start and again
at the end; the demo's staff login is removed when it stops.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from core.webserver import WebServer, WebServerError
from routing.demo.pool import Login, demo_login, demo_login_remove, demo_pool_seed, foreign_data
from routing.demo.traffic import Api, DemoError, Traffic


class Command(BaseCommand):
    help = "Seed a demonstration pool and drive synthetic gateway traffic through the HTTP API."

    def add_arguments(self, parser):
        parser.add_argument("--duration", type=float, default=180, help="seconds of traffic (default 180)")
        parser.add_argument(
            "--bind",
            default=os.environ.get("KIROPOOL_BIND", "127.0.0.1:8000"),
            help="where the demo's own web server listens (default $KIROPOOL_BIND or 127.0.0.1:8000)",
        )
        parser.add_argument("--url", help="use a kiropool already running here (e.g. under `make run`) instead")
        parser.add_argument("--clients", type=int, default=8, help="concurrent simulated gateway clients")
        parser.add_argument(
            "--seed", type=int, help="seed of the simulated traffic: the same requests in the same order (one client)"
        )
        parser.add_argument(
            "--serve",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="keep the web app running after the traffic until Ctrl-C (default: when run from a terminal)",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="run even though the database holds pool rows the demo did not make (they are left alone)",
        )

    def handle(self, *args, duration, bind, url, clients, seed, serve, force, **options):
        foreign = foreign_data()
        if foreign and not force:
            raise CommandError(
                "This database holds pool data the demo did not make ("
                + ", ".join(foreign)
                + "). The demo only touches demo-* rows, but it adds a superuser and traffic. "
                "Point DATABASE_URL at a scratch database, or pass --force."
            )
        serve = sys.stdin.isatty() if serve is None else serve
        login = demo_login()
        server = None
        try:
            keys = demo_pool_seed()
            if url:
                base = url.rstrip("/")
            else:
                # WhiteNoise serves the dashboard's stylesheet from STATIC_ROOT.
                call_command("collectstatic", interactive=False, verbosity=0)
                server = WebServer(bind=bind, log=Path(settings.VAR_DIR) / "demo-server.log")
                base = server.url
                self.stdout.write(f"Starting the web app on {base} (log: {server.log}) ...")
                try:
                    server.start()
                except WebServerError as error:
                    raise CommandError(
                        f"{error}. Stop what listens there, pass --url {base} to use it, "
                        "or choose another address with --bind or KIROPOOL_BIND."
                    ) from error
            api = Api(base, keys=keys, token=login.token)
            api.wait_ready()
            api.latency_refresh()
            self.banner(base, login, keys, heading="kiropool demo: traffic is flowing, watch it live")
            traffic = Traffic(api, rng=random.Random(seed), duration=duration, clients=clients, out=self.stdout)
            traffic.run()
            api.latency_refresh()
            self.stdout.write(traffic.summary())
            self.banner(base, login, keys, heading="kiropool demo: done")
            if server and serve:
                self.stdout.write("The web app keeps running so you can look around; Ctrl-C stops it.")
                while server.alive():
                    time.sleep(30)
                    api.latency_refresh(quiet=True)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping.")
        except DemoError as error:
            raise CommandError(str(error)) from error
        finally:
            if server:
                server.stop()
            demo_login_remove(login)

    def banner(self, base: str, login: Login, keys: dict[str, str], *, heading: str) -> None:
        width = 78
        lines = [
            "",
            "=" * width,
            f"  {heading}",
            "-" * width,
            f"  dashboard   {base}/dashboard/",
            f"  login       {login.username} / {login.password}   (removed when the demo stops)",
            f"  API key     {keys['gateway']}",
            "              (demo-gateway: prefers the balanced pool)",
            f"  second key  {keys['batch']}",
            "              (demo-batch: prefers the credit-first pool)",
            f"  try it      curl -s {base}/api/v1/dispatch/explain -H 'Content-Type: application/json' \\",
            f"                -H 'Authorization: Bearer {keys['gateway']}' -d '{{\"session_id\": \"hi\"}}'",
            "=" * width,
            "",
        ]
        self.stdout.write("\n".join(lines))
