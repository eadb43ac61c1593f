#!/usr/bin/env python
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kiropool.settings")
    from django.core.management import execute_from_command_line

    from kiropool.secrets_guard import manage_py_guard

    manage_py_guard(sys.argv)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
