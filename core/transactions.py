"""Transaction helpers shared by the apps."""

from __future__ import annotations

from collections.abc import Callable

from django.db import transaction


def on_commit_once(func: Callable[[], None], *, robust: bool = False) -> None:
    """``transaction.on_commit(func)``, unless ``func`` already waits for
    this transaction's commit: many edits in one transaction (an import)
    run it once. Outside a transaction it runs at once, as on_commit does.

    Reads the connection's list of pending hooks: Django keeps it as
    ``(savepoint ids, func, robust)``, and drops a hook with the savepoint
    or transaction that rolls back, so a later edit registers it again."""
    connection = transaction.get_connection()
    if connection.in_atomic_block and any(hook is func for _, hook, _ in connection.run_on_commit):
        return
    transaction.on_commit(func, robust=robust)
