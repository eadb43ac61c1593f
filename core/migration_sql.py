"""Raw SQL in migrations, per database vendor: triggers and indexes that
Django's schema operations cannot express."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def vendor_statements(by_vendor: Mapping[str, Sequence[str]], *, what: str) -> Callable:
    """A ``RunPython`` function that runs the vendor's statements in order,
    and refuses a vendor it has none for (``what`` names them in the error)."""

    def run(apps, schema_editor):
        vendor = schema_editor.connection.vendor
        if vendor not in by_vendor:
            raise RuntimeError(f"no {what} for {vendor}")
        for sql in by_vendor[vendor]:
            schema_editor.execute(sql)

    return run
