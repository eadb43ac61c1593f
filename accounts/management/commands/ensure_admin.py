import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create a superuser when none exists: KIROPOOL_ADMIN_USER (default 'admin') with "
        "KIROPOOL_ADMIN_PASSWORD, or a generated password printed once."
    )

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("An admin login already exists.")
            return
        username = settings.KIROPOOL_ADMIN_USER
        password = settings.KIROPOOL_ADMIN_PASSWORD
        generated = not password
        if generated:
            password = secrets.token_urlsafe(18)
        User.objects.create_superuser(username=username, email="", password=password)
        if generated:
            self.stdout.write(
                self.style.WARNING(
                    f"Created admin login '{username}' with password: {password}\n"
                    "It is shown only this once (set KIROPOOL_ADMIN_PASSWORD to choose it)."
                )
            )
        else:
            self.stdout.write(f"Created admin login '{username}' from KIROPOOL_ADMIN_PASSWORD.")
