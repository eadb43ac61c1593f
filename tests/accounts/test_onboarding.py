"""Bulk onboarding (``accounts/onboarding``, ``manage.py pool_import`` and
``pool_export``): all or nothing, by name, the models' own validation,
credentials in but never out, counters never written."""

import io
import json
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import Account, AccountGroup, Pool, Proxy, RoutingIdentity
from accounts.onboarding.errors import ImportRejected
from accounts.onboarding.exporter import pool_export
from accounts.onboarding.importer import pool_import
from tests.factories import AccountFactory, AccountGroupFactory, ProxyFactory, RoutingIdentityFactory

pytestmark = pytest.mark.django_db

SECRET = "refresh-token-that-must-never-leave"


def pool_document(accounts: int, *, secret: str = SECRET) -> dict:
    """Two accounts per identity, four proxies, a group of every tenth account."""
    return {
        "identities": [
            {"name": f"kiro-{i:04d}", "max_concurrency": 1 + i % 3, "min_start_interval_ms": 250 * (i % 2)}
            for i in range(accounts // 2)
        ],
        "proxies": [{"name": f"egress-{p}", "url": f"http://egress-{p}.internal:3128"} for p in range(4)],
        "accounts": [
            {
                "name": f"acct-{i:04d}",
                "identity": f"kiro-{i // 2:04d}",
                "proxy": f"egress-{i % 4}" if i % 5 else None,
                "pool": Pool.CREDIT_FIRST if i % 3 == 0 else Pool.BALANCED,
                "enabled": i % 7 != 0,
                "region": "us-east-1",
                "profile_arn": f"arn:aws:codewhisperer:us-east-1:{i:012d}:profile/P",
                "credentials": {"refresh_token": f"{secret}-{i}", "client_id": "cid"},
            }
            for i in range(accounts)
        ],
        "groups": [
            {"name": "tenth", "accounts": [f"acct-{i:04d}" for i in range(0, accounts, 10)]},
            {"name": "empty", "accounts": []},
        ],
    }


def pool_counts() -> tuple[int, int, int, int, int]:
    return (
        RoutingIdentity.objects.count(),
        Proxy.objects.count(),
        Account.objects.count(),
        AccountGroup.objects.count(),
        AccountGroup.accounts.through.objects.count(),
    )


def writes(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))]


def run_import(*args: str) -> str:
    out = io.StringIO()
    call_command("pool_import", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_import_creates_all_four_kinds_by_name_with_credentials_encrypted(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(pool_document(10)))

    output = run_import(str(path))

    assert "accounts: 10 new" in output
    assert pool_counts() == (5, 4, 10, 2, 1)
    account = Account.objects.select_related("identity", "proxy").get(name="acct-0003")
    assert (account.identity.name, account.proxy.name, account.pool, account.enabled) == (
        "kiro-0001",
        "egress-3",
        Pool.CREDIT_FIRST,
        True,
    )
    assert account.credentials == {"refresh_token": f"{SECRET}-3", "client_id": "cid"}
    with connection.cursor() as cursor:  # stored as a Fernet token through the model field, never as JSON
        cursor.execute("SELECT credentials FROM accounts_account WHERE name = %s", ["acct-0003"])
        (stored,) = cursor.fetchone()
    assert stored.startswith("gAAAAA") and SECRET not in stored
    assert Account.objects.get(name="acct-0005").proxy is None
    assert sorted(AccountGroup.objects.get(name="tenth").accounts.values_list("name", flat=True)) == ["acct-0000"]
    assert RoutingIdentity.objects.get(name="kiro-0001").min_start_interval_ms == 250


def _timed_import(document) -> tuple[list[str], float]:
    with CaptureQueriesContext(connection) as captured:
        started = time.monotonic()
        pool_import(document)
        seconds = time.monotonic() - started
    return [q["sql"] for q in captured], seconds


def _inserts(queries: list[str]) -> list[str]:
    return [q for q in queries if q.startswith("INSERT")]


def test_500_accounts_import_in_a_bounded_number_of_queries():
    small, _ = _timed_import(pool_document(50))
    Account.objects.all().delete()
    AccountGroup.objects.all().delete()
    RoutingIdentity.objects.all().delete()
    Proxy.objects.all().delete()

    large, seconds = _timed_import(pool_document(500))

    assert pool_counts() == (250, 4, 500, 2, 50)
    # The reads: 5 by name, a check per constraint per distinct value (7 here,
    # each in a savepoint inside the test's transaction) and the unique-URL
    # read: the same for 50 rows as for 500.
    assert len(large) - len(_inserts(large)) == len(small) - len(_inserts(small)) <= 30
    # The writes: one INSERT per table on PostgreSQL; SQLite caps a statement's
    # parameters, so Django splits the batch into a few. Never row by row (750+).
    assert len(_inserts(large)) == 5 if connection.vendor == "postgresql" else len(_inserts(large)) < 25
    # About a second on a quiet machine (Fernet-encrypting 500 credentials is
    # most of it); 20 s leaves room for a busy 2-core CI machine.
    assert seconds < 20, seconds


def test_one_bad_row_among_500_rejects_the_batch_and_names_row_and_field(tmp_path):
    document = pool_document(500)
    document["accounts"][376]["identity"] = "kiro-ghost"
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(document))
    stderr = io.StringIO()

    with pytest.raises(CommandError, match="nothing was written: 1 error"):
        call_command("pool_import", str(path), stdout=io.StringIO(), stderr=stderr)

    assert pool_counts() == (0, 0, 0, 0, 0)
    assert "accounts row 377 ('acct-0376'), field 'identity': no routing identity named 'kiro-ghost'" in (
        stderr.getvalue()
    )


def test_a_row_the_database_would_take_but_the_model_refuses_rejects_the_batch():
    document = pool_document(20)
    document["identities"][3]["max_concurrency"] = 0  # the admin's form refuses it: MinValueValidator(1)

    with pytest.raises(ImportRejected) as rejected:
        pool_import(document)

    [error] = rejected.value.errors
    assert (error.kind, error.row, error.field) == ("identities", 4, "max_concurrency")
    assert pool_counts() == (0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("kind", "row", "field", "value", "message"),
    [
        ("accounts", {"name": ""}, "name", None, "cannot be blank"),
        ("accounts", {"name": "x" * 201}, "name", None, "at most 200 characters"),
        ("accounts", {"pool": "fastest"}, "pool", None, "not a valid choice"),
        ("accounts", {"enabled": "maybe"}, "enabled", None, "true or false"),
        ("accounts", {"region": "eu\x00west"}, "region", None, "NUL"),
        ("accounts", {"proxy": "egress-9"}, "proxy", None, "no proxy named 'egress-9'"),
        ("accounts", {"in_flight": 0}, "in_flight", None, "never imported"),
        ("accounts", {"remaining_credits": 12}, "remaining_credits", None, "never imported"),
        ("accounts", {"colour": "red"}, "colour", None, "not a column of accounts"),
        ("identities", {"max_concurrency": "two"}, "max_concurrency", None, "whole number"),
        # str.isdigit takes these, int() does not: a CellError, not a ValueError out of the import
        ("identities", {"max_concurrency": "--2"}, "max_concurrency", None, "whole number"),
        ("identities", {"min_start_interval_ms": "²"}, "min_start_interval_ms", None, "whole number"),
        ("identities", {"min_start_interval_ms": -5}, "min_start_interval_ms", None, "greater than or equal to 0"),
        ("proxies", {"url": "http://egress-0.internal:3128"}, "url", None, "already exists"),
        ("groups", {"accounts": ["acct-0001", "nobody"]}, "accounts", None, "no account named 'nobody'"),
    ],
)
def test_the_import_refuses_what_the_admin_refuses(kind, row, field, value, message):
    document = pool_document(10)
    document[kind][1].update(row)

    with pytest.raises(ImportRejected) as rejected:
        pool_import(document)

    [error] = rejected.value.errors
    assert (error.kind, error.row, error.field) == (kind, 2, field)
    assert message in error.message
    assert pool_counts() == (0, 0, 0, 0, 0)


def test_a_name_twice_in_a_file_is_refused_at_the_second_row():
    document = pool_document(6)
    document["accounts"].append(dict(document["accounts"][0]))

    with pytest.raises(ImportRejected) as rejected:
        pool_import(document)

    [error] = rejected.value.errors
    assert (error.row, error.field, error.message) == (7, "name", "appears twice in the file (first in row 1)")


def test_credentials_must_be_a_json_object_and_never_appear_in_errors():
    document = pool_document(4)
    document["accounts"][0]["credentials"] = f'["{SECRET}"]'
    document["accounts"][1]["credentials"] = f"{SECRET} not json"

    with pytest.raises(ImportRejected) as rejected:
        pool_import(document)

    assert [(e.row, e.field) for e in rejected.value.errors] == [(1, "credentials"), (2, "credentials")]
    assert SECRET not in str(rejected.value) and all(SECRET not in str(e) for e in rejected.value.errors)


def test_dry_run_validates_everything_and_writes_nothing():
    proxy = ProxyFactory(name="egress-0", url="http://old.internal:3128")
    document = pool_document(100)

    with CaptureQueriesContext(connection) as captured:
        report = pool_import(document, dry_run=True)

    assert writes(captured) == []
    assert pool_counts() == (0, 1, 0, 0, 0)
    proxy.refresh_from_db()
    assert proxy.url == "http://old.internal:3128"
    assert report.counts("accounts") == {"new": 100, "update": 0, "skip": 0}
    assert report.counts("proxies") == {"new": 3, "update": 1, "skip": 0}

    document["accounts"][40]["pool"] = "nope"
    with pytest.raises(ImportRejected) as rejected:
        pool_import(document, dry_run=True)
    assert [(e.row, e.field) for e in rejected.value.errors] == [(41, "pool")]


def test_dry_run_command_says_so(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(pool_document(8)))

    assert "dry run, nothing written: would import" in run_import(str(path), "--dry-run")
    assert pool_counts() == (0, 0, 0, 0, 0)


def test_update_writes_only_the_changed_editable_fields_never_the_counters():
    pool_import(pool_document(20))
    now = timezone.now()
    RoutingIdentity.objects.filter(name="kiro-0001").update(
        in_flight=1, last_started_at=now, cooldown_until=now + timedelta(minutes=5), cooldown_reason="429"
    )
    Account.objects.filter(name="acct-0002").update(
        quota_exhausted=True, quota_exhausted_reason="spent", remaining_credits=3.5
    )
    document = pool_export()
    document["identities"][1]["max_concurrency"] = 7
    document["accounts"][2]["region"] = "eu-west-1"
    document["accounts"][2]["proxy"] = None

    with CaptureQueriesContext(connection) as captured:
        report = pool_import(document)

    assert report.counts("identities") == {"new": 0, "update": 1, "skip": 9}
    assert report.counts("accounts") == {"new": 0, "update": 1, "skip": 19}
    updates = writes(captured)
    assert len(updates) == 2, updates
    for sql in updates:
        for counter in ("in_flight", "binding_rows", "last_started_at", "cooldown", "quota", "remaining_credits"):
            assert counter not in sql, sql
        assert "credentials" not in sql  # an export carries none, so an import of it keeps them
    identity = RoutingIdentity.objects.get(name="kiro-0001")
    assert (identity.max_concurrency, identity.in_flight, identity.last_started_at) == (7, 1, now)
    assert identity.cooldown_reason == "429"
    account = Account.objects.get(name="acct-0002")
    assert (account.region, account.proxy, account.quota_exhausted, account.remaining_credits) == (
        "eu-west-1",
        None,
        True,
        3.5,
    )
    assert account.credentials == {"refresh_token": f"{SECRET}-2", "client_id": "cid"}


def test_group_membership_is_what_the_file_says():
    first, second, third = AccountFactory.create_batch(3)
    group = AccountGroupFactory(name="team", accounts=[first, second])

    pool_import({"groups": [{"name": "team", "accounts": [second.name, third.name]}]})

    assert set(group.accounts.values_list("name", flat=True)) == {second.name, third.name}
    # Importing it again changes nothing.
    assert pool_import({"groups": [{"name": "team", "accounts": [third.name, second.name]}]}).counts("groups") == {
        "new": 0,
        "update": 0,
        "skip": 1,
    }


@pytest.mark.parametrize(
    "args",
    [
        ["--output", "{tmp}/missing/pool.json"],  # a folder that is not there
        ["--format", "csv", "--output", "{tmp}/taken"],  # one file per kind, into a file
    ],
)
def test_an_output_it_cannot_write_is_refused_with_a_message(tmp_path, args):
    # pool_import refuses a file it cannot read with a CommandError; the
    # export crashed with a traceback instead.
    (tmp_path / "taken").write_text("")
    args = [arg.format(tmp=tmp_path) for arg in args]
    with pytest.raises(CommandError, match="cannot write"):
        call_command("pool_export", *args, stdout=io.StringIO(), stderr=io.StringIO())


def test_export_holds_no_credentials_nor_dispatcher_state(tmp_path):
    pool_import(pool_document(10))
    RoutingIdentity.objects.update(in_flight=1, last_started_at=timezone.now())
    out = io.StringIO()

    call_command("pool_export", stdout=out, stderr=io.StringIO())
    call_command("pool_export", "--format", "csv", "--output", str(tmp_path), stderr=io.StringIO())

    texts = [out.getvalue(), *(p.read_text() for p in sorted(tmp_path.glob("*.csv")))]
    assert len(texts) == 5
    for text in texts:
        assert SECRET not in text and "credentials" not in text and "gAAAAA" not in text
        for state in ("in_flight", "last_started_at", "cooldown", "binding_rows", "quota", "remaining_credits"):
            assert state not in text
    document = json.loads(out.getvalue())
    assert set(document["accounts"][0]) == {"name", "identity", "proxy", "pool", "enabled", "region", "profile_arn"}


def test_export_then_import_is_a_round_trip(tmp_path):
    pool_import(pool_document(30))
    out = io.StringIO()
    call_command("pool_export", stdout=out, stderr=io.StringIO())
    exported = json.loads(out.getvalue())
    (tmp_path / "pool.json").write_text(out.getvalue())

    # Into the same pool: nothing to do, nothing written.
    with CaptureQueriesContext(connection) as captured:
        assert "accounts: 0 new, 0 updated, 30 unchanged" in run_import(str(tmp_path / "pool.json"))
    assert writes(captured) == []

    # Into an empty pool: the same pool comes back (credentials aside: never exported).
    AccountGroup.objects.all().delete()
    Account.objects.all().delete()
    RoutingIdentity.objects.all().delete()
    Proxy.objects.all().delete()
    run_import(str(tmp_path / "pool.json"))
    again = pool_export()
    assert again == {key: exported[key] for key in again}


def test_csv_files_round_trip_one_per_kind(tmp_path):
    pool_import(pool_document(12))
    call_command("pool_export", "--format", "csv", "--output", str(tmp_path), stderr=io.StringIO())
    exported = pool_export()
    accounts_csv = (tmp_path / "accounts.csv").read_text()
    assert accounts_csv.splitlines()[0] == "name,identity,proxy,pool,enabled,region,profile_arn"
    assert (tmp_path / "groups.csv").read_text().splitlines()[1] == "empty,"

    AccountGroup.objects.all().delete()
    Account.objects.all().delete()
    RoutingIdentity.objects.all().delete()
    Proxy.objects.all().delete()
    files = [str(tmp_path / f"{k}.csv") for k in ("groups", "accounts", "proxies", "identities")]
    assert "accounts: 12 new" in run_import(*files)

    assert pool_export() == exported


def test_csv_cells_follow_the_spreadsheet_rules(tmp_path):
    RoutingIdentityFactory(name="kiro-a", max_concurrency=3)
    ProxyFactory(name="egress-a")
    AccountFactory(name="acct-a", identity=RoutingIdentity.objects.get(name="kiro-a"), proxy=Proxy.objects.get())
    path = tmp_path / "accounts-batch-7.csv"
    path.write_text(
        "name,identity,proxy,enabled,region,credentials\n"
        "acct-a,kiro-a,,FALSE,,\n"  # empty proxy: none; empty credentials: kept
        'acct-b,kiro-a,egress-a,yes,eu-west-1,"{""refresh_token"": ""t-b""}"\n'
    )

    run_import(str(path))

    a = Account.objects.get(name="acct-a")
    assert (a.proxy, a.enabled, a.region, a.credentials) == (None, False, "", {"refresh_token": "secret-refresh-token"})
    b = Account.objects.get(name="acct-b")
    assert (b.proxy.name, b.enabled, b.region) == ("egress-a", True, "eu-west-1")
    assert b.credentials == {"refresh_token": "t-b"}
    assert RoutingIdentity.objects.get(name="kiro-a").max_concurrency == 3


def test_csv_errors_name_the_row_and_the_file_shape(tmp_path):
    path = tmp_path / "identities.csv"
    path.write_text("name,max_concurrency\nkiro-a,2\nkiro-b,2,extra\n")
    with pytest.raises(CommandError, match="1 error"):
        call_command("pool_import", str(path), stdout=io.StringIO(), stderr=(stderr := io.StringIO()))
    assert "identities row 2: has more cells than the header has columns" in stderr.getvalue()

    unnamed = tmp_path / "batch.csv"
    unnamed.write_text("name\nx\n")
    with pytest.raises(CommandError, match="which kind"):
        run_import(str(unnamed))
    assert "identities: 1 new" in run_import(str(unnamed), "--kind", "identities")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"accounts": [], "keys": []}', "unknown key(s) keys"),
        ('{"version": 2}', "version 2 is not supported"),
        ('{"accounts": {"name": "x"}}', "must be a list of rows"),
        ('{"accounts": ["x"]}', "must be an object"),
    ],
)
def test_a_malformed_document_is_refused_whole(tmp_path, text, message):
    path = tmp_path / "pool.json"
    path.write_text(text)
    stderr = io.StringIO()
    with pytest.raises(CommandError):
        call_command("pool_import", str(path), stdout=io.StringIO(), stderr=stderr)
    assert message in stderr.getvalue()
