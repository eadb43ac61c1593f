"""Bulk onboarding: import and export of routing identities, proxies, accounts
and groups, from a management command (``pool_import``, ``pool_export``) and
the admin. ``kinds.py`` says what travels, ``columns.py`` what a cell may
hold, ``plans.py`` how a file is read and validated before anything is
written, ``importer.py`` the import itself (``pool_import``), which writes
that plan in one transaction (all or nothing), ``errors.py`` what a rejected
file says, ``exporter.py`` what is read back, ``files.py`` the JSON and CSV
shapes."""
