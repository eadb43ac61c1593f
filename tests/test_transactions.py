"""core.transactions.on_commit_once: a hook once per transaction, again after a rollback."""

import pytest
from django.db import transaction

from core.transactions import on_commit_once

pytestmark = pytest.mark.django_db(transaction=True)


class Hook:
    def __init__(self) -> None:
        self.runs = 0

    def __call__(self) -> None:
        self.runs += 1


def test_a_hook_asked_for_twice_in_one_transaction_runs_once_on_commit():
    hook = Hook()
    with transaction.atomic():
        on_commit_once(hook)
        with transaction.atomic():  # a savepoint, released
            on_commit_once(hook)
        assert hook.runs == 0
    assert hook.runs == 1


def test_a_rolled_back_transaction_runs_nothing_and_the_next_asks_again():
    hook = Hook()
    with transaction.atomic():
        on_commit_once(hook)
        transaction.set_rollback(True)
    assert hook.runs == 0
    with transaction.atomic():
        on_commit_once(hook)
    assert hook.runs == 1


def test_a_hook_asked_for_in_a_savepoint_rolled_back_is_asked_for_again_after_it():
    hook = Hook()
    with transaction.atomic():
        with pytest.raises(ValueError), transaction.atomic():
            on_commit_once(hook)
            raise ValueError
        on_commit_once(hook)
    assert hook.runs == 1


def test_outside_a_transaction_the_hook_runs_at_once():
    hook = Hook()
    on_commit_once(hook)
    on_commit_once(hook)
    assert hook.runs == 2
