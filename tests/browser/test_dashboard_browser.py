"""An operator's walk through the dashboards in a real browser: log in through
the admin's form, read the pool, filter it, sort it, open an account and
unbind a session. Each page is saved under test-output/screenshots/."""

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import Account, Pool, RoutingIdentity
from routing.models import CooldownEvent, CooldownKind, Lease, LeaseOutcome, SessionBinding
from tests.factories import (
    AccountFactory,
    ApiKeyFactory,
    LeaseFactory,
    ProxyFactory,
    RoutingIdentityFactory,
    SessionBindingFactory,
    latency_snapshot_create,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "a-long-operator-password"

# (account, identity, pool, live sessions, latency samples and average ms or None)
ACCOUNTS = [
    ("kiro-ada", "ada", Pool.BALANCED, 6, (40, 610.0)),
    ("kiro-ada-eu", "ada", Pool.BALANCED, 2, (12, 580.0)),
    ("kiro-brian", "brian", Pool.BALANCED, 7, (35, 540.0)),
    ("kiro-cleo", "cleo", Pool.BALANCED, 5, (30, 210.0)),
    ("kiro-dara", "dara", Pool.BALANCED, 6, (28, 1450.0)),
    ("kiro-emil", "emil", Pool.BALANCED, 4, None),
    ("kiro-fern", "fern", Pool.BALANCED, 3, (22, 700.0)),
    ("kiro-gus", "gus", Pool.CREDIT_FIRST, 5, (25, 480.0)),
    ("kiro-gus-b", "gus", Pool.CREDIT_FIRST, 1, (6, 505.0)),
    ("kiro-hana", "hana", Pool.CREDIT_FIRST, 0, (18, 520.0)),
    ("kiro-ivo", "ivo", Pool.CREDIT_FIRST, 7, (30, 455.0)),
    ("kiro-juno", "juno", Pool.BALANCED, 0, None),
]


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser(username="operator", email="", password=PASSWORD)


@pytest.fixture
def seeded_pool(live_server):
    now = timezone.now()
    proxies = [
        ProxyFactory(name="egress-fra", url="http://egress-fra.internal:3128"),
        ProxyFactory(
            name="egress-ams",
            url="http://egress-ams.internal:3128",
            cooldown_until=now + timedelta(seconds=75),
            cooldown_reason="connection resets",
        ),
    ]
    identities = {}
    keys = [ApiKeyFactory(name="gateway-prod"), ApiKeyFactory(name="gateway-batch")]
    latency = {}
    for i, (name, identity_name, pool, sessions, samples) in enumerate(ACCOUNTS):
        identity = identities.get(identity_name) or RoutingIdentityFactory(
            name=identity_name, max_concurrency=2, last_started_at=now - timedelta(seconds=7 * i + 3)
        )
        identities[identity_name] = identity
        account = AccountFactory(
            name=name,
            identity=identity,
            pool=pool,
            proxy=proxies[1] if name == "kiro-dara" else proxies[0] if i % 3 == 0 else None,
            remaining_credits=round(900 - 61.5 * i, 2) if pool == Pool.CREDIT_FIRST else None,
        )
        for n in range(sessions):
            SessionBindingFactory(
                api_key=keys[n % 2],
                account=account,
                session_id=f"{name}-conversation-{n:02d}",
                created_at=now - timedelta(minutes=5 * n + 2),
                updated_at=now - timedelta(seconds=40 * n + 10),
            )
        if samples:
            latency[name] = list(samples)
    RoutingIdentity.objects.filter(name="brian").update(
        in_flight=2, cooldown_until=now + timedelta(minutes=4), cooldown_reason="rate limited by upstream"
    )
    RoutingIdentity.objects.filter(name__in=["ada", "cleo"]).update(in_flight=1)
    Account.objects.filter(name="kiro-hana").update(
        quota_exhausted=True,
        quota_exhausted_at=now - timedelta(minutes=2),
        quota_exhausted_reason="monthly quota used up",
        remaining_credits=0,
    )
    Account.objects.filter(name="kiro-juno").update(enabled=False)
    total = sum(n for n, _ in latency.values())
    latency_snapshot_create(
        generated_at=now - timedelta(seconds=25),
        window_seconds=3600,
        global_avg_ms=sum(n * avg for n, avg in latency.values()) / total,
        sample_count=total,
        accounts=latency,
        proxies={proxies[0].url: [120, 590.0], proxies[1].url: [90, 640.0]},
    )
    ada = Account.objects.get(name="kiro-ada")
    outcomes = [LeaseOutcome.SUCCESS] * 5 + [LeaseOutcome.RATE_LIMITED, LeaseOutcome.SUCCESS, LeaseOutcome.RETRY_NEXT]
    for i, outcome in enumerate(outcomes):
        started = now - timedelta(seconds=30 * i + 12)
        LeaseFactory(
            account=ada,
            api_key=keys[i % 2],
            session_id=f"kiro-ada-conversation-{i:02d}" if i % 3 else "",
            model="claude-sonnet-4",
            started_at=started,
            completed_at=started + timedelta(seconds=4 + i),
            outcome=outcome,
            first_token_ms=560.0 + 17 * i if outcome == LeaseOutcome.SUCCESS else None,
            error_message="429 Too Many Requests" if outcome == LeaseOutcome.RATE_LIMITED else "",
        )
    LeaseFactory(account=ada, api_key=keys[0], model="claude-sonnet-4", started_at=now - timedelta(seconds=2))
    CooldownEvent.objects.create(
        kind=CooldownKind.IDENTITY_COOLDOWN,
        identity=ada.identity,
        reason="429 Too Many Requests",
        until=now - timedelta(minutes=1),
        created_at=now - timedelta(minutes=6),
    )
    CooldownEvent.objects.create(
        kind=CooldownKind.PROXY_COOLDOWN,
        proxy=proxies[0],
        reason="proxy refused the connection",
        until=now - timedelta(minutes=20),
        created_at=now - timedelta(minutes=25),
    )
    return live_server


def log_in(page, live_server, path: str) -> None:
    page.goto(live_server.url + path)
    assert "/admin/login/" in page.url, "an anonymous visitor must land on the login page"
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(re.escape(live_server.url + path) + r"$"))


def account_names(page) -> list[str]:
    return page.locator("#accounts tbody tr[data-account]").evaluate_all("rows => rows.map(r => r.dataset.account)")


def test_operator_reads_filters_and_sorts_the_pool(page, seeded_pool, operator, screenshot):
    log_in(page, seeded_pool, "/dashboard/")

    assert page.locator("h1").inner_text() == "Account pool"
    assert account_names(page) == sorted(name for name, *_ in ACCOUNTS)
    summary = page.locator(".summary").inner_text()
    assert re.search(r"USABLE\s+9\s+of 12 accounts", summary, re.I), summary
    assert re.search(r"LIVE SESSIONS\s+46", summary, re.I), summary

    # One bar per routing identity, one dot per account with a score.
    assert page.locator("#sessions-chart svg rect.bar").count() == 10
    assert page.locator("#sessions-chart svg rect.bar-cooling").count() == 1
    assert page.locator("#latency-chart svg circle.dot").count() == len(ACCOUNTS)
    assert page.locator("#latency-chart svg rect.band-zero").count() == 1
    bar_box = page.locator("#sessions-chart svg").bounding_box()
    assert bar_box["width"] > 400 and bar_box["height"] > 150, "the chart is drawn at a readable size"
    screenshot("01-pool")

    page.click("a[data-filter=cooling]")
    page.wait_for_url("**state=cooling")
    assert account_names(page) == ["kiro-brian"]
    page.click("a[data-filter=abnormal]")
    assert account_names(page) == ["kiro-brian", "kiro-dara", "kiro-hana", "kiro-juno"]
    screenshot("02-pool-needs-attention")

    page.click("a[data-filter=all]")
    page.click("a[data-sort=sessions]")  # most sessions first
    page.wait_for_url("**sort=-sessions")
    assert account_names(page)[:2] == ["kiro-brian", "kiro-ivo"]
    page.click("a[data-sort=sessions]")  # and back
    page.wait_for_url("**sort=sessions")
    assert account_names(page)[-1] == "kiro-ivo"


def test_operator_opens_an_account_and_unbinds_a_session(page, seeded_pool, operator, screenshot):
    log_in(page, seeded_pool, "/dashboard/")
    page.click("#accounts a.account-link >> text=kiro-ada")
    page.wait_for_url("**/dashboard/accounts/kiro-ada/")

    assert "kiro-ada" in page.locator("h1").inner_text()
    bindings = page.locator("#bindings tbody tr")
    assert bindings.count() == 6
    assert page.locator("#leases tbody tr").count() == 9
    assert page.locator("#leases .outcome-rate_limited").count() == 1
    assert page.locator("#leases .outcome-in_flight").count() == 1
    assert page.locator("#history tbody tr").count() == 2
    assert page.locator("a", has_text="Edit account").get_attribute("href").startswith("/admin/accounts/account/")
    screenshot("03-account")

    session = "kiro-ada-conversation-03"
    page.locator(f'tr[data-binding="{session}"] button', has_text="Unbind").click()
    page.wait_for_selector(".message-success")
    assert f"Unbound session “{session}” from kiro-ada." in page.locator(".messages").inner_text()
    assert bindings.count() == 5
    assert page.locator(f'tr[data-binding="{session}"]').count() == 0
    assert not SessionBinding.objects.filter(session_id=session).exists()
    assert Account.objects.get(name="kiro-ada").binding_rows == 5
    screenshot("04-account-after-unbind")


# --- finding one's way: the root, the admin, the account's recent hours, bulk import -----------


def test_the_root_leads_through_the_login_to_the_dashboard(page, live_server, operator, screenshot):
    page.goto(live_server.url + "/")
    assert page.url == live_server.url + "/admin/login/?next=/dashboard/"
    assert "kiropool" in page.title() and "Django" not in page.title()
    screenshot("05-login")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(live_server.url + "/dashboard/")
    assert page.locator("h1").inner_text() == "Account pool"
    page.goto(live_server.url + "/")
    assert page.url == live_server.url + "/dashboard/", "a staff user goes straight to the dashboard"


def test_the_admin_is_kiropool_and_leads_to_the_dashboards(page, seeded_pool, operator, screenshot):
    log_in(page, seeded_pool, "/admin/")

    assert page.title() == "kiropool administration | kiropool"
    assert page.locator("#site-name").inner_text() == "kiropool"
    assert page.locator("#user-tools a", has_text="View site").get_attribute("href") == "/dashboard/"
    dashboards = page.locator("#kiropool-dashboards")
    assert dashboards.locator("caption").inner_text().lower() == "dashboards"
    link = dashboards.locator("a", has_text="Account pool").bounding_box()
    assert link["width"] > link["height"], "the link reads on one line"
    screenshot("06-admin-index")

    dashboards.locator("a", has_text="Accounts needing attention").click()
    page.wait_for_url("**/dashboard/?state=abnormal")
    assert account_names(page) == ["kiro-brian", "kiro-dara", "kiro-hana", "kiro-juno"]
    page.go_back()
    page.locator("#user-tools a", has_text="View site").click()
    page.wait_for_url(seeded_pool.url + "/dashboard/")


def test_the_account_page_draws_its_recent_hours(page, seeded_pool, operator, screenshot):
    # Two and a half hours of kiro-ada: fine, then a bad spell 60 to 40 minutes
    # ago (slow first tokens, then rate limits), then fine again; the rest of
    # the pool steady at 600 ms.
    now = timezone.now()
    ada, other = Account.objects.get(name="kiro-ada"), Account.objects.get(name="kiro-brian")
    leases = []
    for minute in range(3, 150):
        started = now - timedelta(minutes=minute, seconds=20)
        bad = 40 <= minute < 60
        for n in range(3 if minute % 4 else 2):
            if bad and n:
                leases.append(
                    LeaseFactory.build(account=ada, started_at=started, completed_at=started, outcome="rate_limited")
                )
            else:
                ms = 2400.0 + 40 * n if bad else 520.0 + (minute % 7) * 15
                leases.append(
                    LeaseFactory.build(
                        account=ada, started_at=started, completed_at=started, outcome="success", first_token_ms=ms
                    )
                )
        leases.append(
            LeaseFactory.build(
                account=other, started_at=started, completed_at=started, outcome="success", first_token_ms=600.0
            )
        )
    Lease.objects.bulk_create(leases)

    log_in(page, seeded_pool, "/dashboard/accounts/kiro-ada/")

    latency = page.locator("#latency-timeline svg")
    assert latency.locator("circle.point").count() >= 140
    assert latency.locator("polyline.series-pool").count() >= 1
    assert page.locator("#leases-timeline svg rect.bar").count() >= 140
    outcomes = page.locator("#outcomes-timeline svg")
    assert outcomes.locator("rect.stack-rate_limited").count() >= 20
    assert outcomes.locator("rect.stack-success").count() >= 140
    box = latency.bounding_box()
    assert box["width"] > 400 and box["height"] > 100, "the chart is drawn at a readable size"
    assert "rate limited" in page.locator("#outcomes-timeline .legend").inner_text()
    page.locator("#activity").scroll_into_view_if_needed()
    screenshot("07-account-recent-hours")

    page.locator("#activity .window-links a", has_text="24 h").click()
    page.wait_for_url("**hours=24**")
    assert "The last 24 hours" in page.locator("#activity h2").inner_text()
    assert page.locator("#leases-timeline svg rect.bar").count() >= 18  # 8-minute buckets


def test_an_operator_imports_accounts_from_a_csv_file(page, seeded_pool, operator, screenshot, tmp_path):
    csv_file = tmp_path / "accounts.csv"
    csv_file.write_text(
        "name,identity,proxy,pool,credentials\n"
        'kiro-new-1,ada,egress-fra,balanced,"{""refresh_token"": ""new-secret-1""}"\n'
        "kiro-new-2,brian,,credit_first,\n"
    )
    log_in(page, seeded_pool, "/admin/accounts/account/")
    page.locator(".object-tools a", has_text="Import").click()
    page.set_input_files("#id_import_file", str(csv_file))
    page.select_option("#id_format", label="csv")
    page.click("input[type=submit]")

    page.wait_for_selector("table.import-preview")
    preview = page.locator("table.import-preview")
    assert preview.locator("tr.new").count() == 2
    assert "new-secret-1" not in page.content(), "credentials are never shown back"
    assert not Account.objects.filter(name__startswith="kiro-new").exists(), "the preview is a dry run"
    screenshot("08-admin-import-preview")

    page.click("input[name=confirm]")
    page.wait_for_url("**/admin/accounts/account/")
    assert "Import finished: 2 new" in page.locator(".messagelist").inner_text()
    assert Account.objects.get(name="kiro-new-1").credentials == {"refresh_token": "new-secret-1"}
    screenshot("09-admin-import-done")
