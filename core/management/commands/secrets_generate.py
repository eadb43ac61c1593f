"""``manage.py secrets_generate``: fresh values for SECRET_KEY and
KIROPOOL_FERNET_KEYS, as lines for an environment file; with ``--local``, the
development secrets of this checkout (core/local_secrets.py), which
`make run` calls. It runs whatever the configured secrets are
(kiropool/secrets_guard.py): it is how one gets good ones."""

import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core import local_secrets


class Command(BaseCommand):
    help = (
        "Print a new SECRET_KEY and Fernet key for an environment file; with --local, generate this "
        "checkout's development secrets once (make run) and reuse them after."
    )
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument(
            "--local",
            action="store_true",
            help=f"keep development secrets in {_shown(settings.LOCAL_SECRETS_FILE)} (created once, mode 0600)",
        )

    def handle(self, *args, **options):
        if not options["local"]:
            self.stdout.write(f"SECRET_KEY={local_secrets.secret_key_generate()}")
            self.stdout.write(f"KIROPOOL_FERNET_KEYS={local_secrets.fernet_key_generate()}")
            return
        path = settings.LOCAL_SECRETS_FILE
        result = local_secrets.local_secrets_ensure(path, environ=os.environ)
        if result.missing:
            raise CommandError(
                f"{_shown(path)} sets no {' and no '.join(result.missing)}. Add the missing line (see "
                "`manage.py secrets_generate`), or delete the file to generate both, but only if no account "
                "credentials were stored under its Fernet key."
            )
        if result.mode_fixed:
            self.stdout.write(self.style.WARNING(f"{_shown(path)} was readable by others; it is now mode 0600."))
        if result.state == "created":
            self.stdout.write(f"Generated development secrets in {_shown(path)} (mode 0600), reused from now on.")
        elif result.state == "kept":
            self.stdout.write(f"Using the development secrets in {_shown(path)}.")
        else:
            self.stdout.write("SECRET_KEY and KIROPOOL_FERNET_KEYS come from the environment; no local secrets needed.")


def _shown(path: Path) -> str:
    try:
        return str(Path(path).relative_to(settings.BASE_DIR))
    except ValueError:
        return str(path)
