"""Bulk onboarding: import and export of routing identities, proxies, accounts
and groups, from a management command (``pool_import``, ``pool_export``) and
the admin. ``kinds.py`` says what travels, ``columns.py`` what a cell may
hold, ``importer.py`` how a file is validated and written (all or nothing),
``exporter.py`` what is read back, ``files.py`` the JSON and CSV shapes."""
