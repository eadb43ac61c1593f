"""The SVG chart builders: pure functions, no database."""

import xml.etree.ElementTree as ET

import pytest

from routing.dashboard import charts
from routing.selection import latency_band

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    """The markup is well-formed XML (an SVG a browser would refuse is a blank chart)."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img" and root.get("aria-label")
    return root


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def rects(root: ET.Element, css_class: str) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if css_class in (r.get("class") or "").split()]


@pytest.mark.parametrize(
    ("low", "high", "count", "expected"),
    [
        (0, 8, 4, [0, 2, 4, 6, 8]),
        (0, 1, 4, [0, 0.5, 1]),
        (0, 7, 4, [0, 2, 4, 6]),
        (380, 1210, 6, [400, 600, 800, 1000, 1200]),
        (5, 5, 4, [5]),
    ],
)
def test_nice_ticks(low, high, count, expected):
    assert charts.nice_ticks(low, high, count) == pytest.approx(expected)


# --- sessions per identity --------------------------------------------------------------------


def test_sessions_chart_without_identities_says_so():
    root = parse(charts.sessions_chart([]))
    assert texts(root) == ["No routing identities yet"]


def test_sessions_chart_puts_the_most_loaded_identity_first_with_its_figure():
    bars = [
        charts.SessionBar("ada", 3),
        charts.SessionBar("brian", 9, state="cooling"),
        charts.SessionBar("cleo", 0, state="exhausted"),
        charts.SessionBar("dara", 3),
    ]
    root = parse(charts.sessions_chart(bars))
    drawn = rects(root, "bar")
    assert len(drawn) == 4
    widths = [float(r.get("width")) for r in drawn]
    assert widths[0] > widths[1] == widths[2] > widths[3] == 0  # brian, ada, dara, cleo
    assert [r.get("class") for r in drawn] == ["bar bar-cooling", "bar bar-ok", "bar bar-ok", "bar bar-exhausted"]
    labels = texts(root)
    assert labels.index("brian") < labels.index("ada") < labels.index("dara") < labels.index("cleo")
    assert "cooling down" in labels and "quota exhausted" in labels
    assert "mean 3.8" in labels
    assert "brian: 9 live sessions" in charts.sessions_chart(bars)


def test_sessions_chart_links_bars_and_escapes_names():
    svg = charts.sessions_chart([charts.SessionBar('<b>"evil"</b>', 2, href="/dashboard/?q=a&b")])
    root = parse(svg)
    assert "<b>" not in svg
    assert '<b>"evil"</b>' in texts(root)
    links = list(root.iter(f"{SVG}a"))
    assert [a.get("href") for a in links] == ["/dashboard/?q=a&b"]


def test_sessions_chart_sums_the_identities_past_the_limit():
    bars = [charts.SessionBar(f"identity-{i:03d}", i) for i in range(30)]
    root = parse(charts.sessions_chart(bars, max_bars=24))
    assert len(rects(root, "bar")) == 24
    # identities 0..5 are the least loaded: 0+1+2+3+4+5 sessions
    assert "+ 6 more identities holding 15 sessions" in texts(root)


# --- latency bands --------------------------------------------------------------------------


@pytest.mark.parametrize("global_avg", [500.0, 612.3, 3.0, 0.5])
def test_band_edges_are_where_the_selector_changes_band(global_avg):
    tol = charts.band_tolerance(global_avg)
    step = tol / 1000
    edges = charts.band_edges(global_avg, global_avg - 7 * tol - step, global_avg + 7 * tol + step)
    # at G + (2k + 1)·tolerance for 2k + 1 in −7, −5, …, 7, both ends included
    assert [band for _, band in edges] == [-3, -2, -1, 0, 1, 2, 3, 4]
    for edge, band_above in edges:
        assert latency_band(edge + step, global_avg) == band_above
        assert latency_band(edge - step, global_avg) == band_above - 1


def test_latency_chart_without_a_snapshot_says_so():
    root = parse(charts.latency_chart([], global_avg_ms=None))
    assert "No latency snapshot yet" in texts(root)[0]
    assert "No latency snapshot yet" in charts.latency_chart([charts.LatencyPoint("a", 1, 0, 1)], global_avg_ms=None)


def test_latency_chart_draws_one_labelled_dot_per_account_over_the_bands():
    points = [
        charts.LatencyPoint("fast", 196.0, -2, 20, href="/dashboard/accounts/fast/"),
        charts.LatencyPoint("average", 500.0, 0, 0),
        charts.LatencyPoint("slow", 1060.0, 4, 20),
    ]
    svg = charts.latency_chart(points, global_avg_ms=500.0)
    root = parse(svg)
    dots = [c for c in root.iter(f"{SVG}circle") if c.get("class") == "dot"]
    assert len(dots) == 3
    xs = [float(c.get("cx")) for c in dots]
    assert xs == sorted(xs)  # rows in score order
    assert [c.get("fill") for c in dots] == [charts.band_colour(-2), charts.band_colour(0), charts.band_colour(4)]
    labels = texts(root)
    assert {"fast", "average", "slow", "band 0", "global average 500 ms"} <= set(labels)
    assert len(rects(root, "band-zero")) == 1
    zero = rects(root, "band-zero")[0]
    # band 0 spans G ± 75 ms and contains the average's dot
    assert float(zero.get("x")) < xs[1] < float(zero.get("x")) + float(zero.get("width"))
    assert "fast: score 196 ms, band -2, 20 samples" in svg
    assert 'href="/dashboard/accounts/fast/"' in svg


def test_latency_chart_stacks_dots_when_the_pool_is_large():
    points = [charts.LatencyPoint(f"account-{i:03d}", 300.0 + (i * 37) % 900, 0, 10) for i in range(500)]
    svg = charts.latency_chart(points, global_avg_ms=600.0, max_rows=40)
    root = parse(svg)
    dots = [c for c in root.iter(f"{SVG}circle") if c.get("class") == "dot"]
    assert 0 < len(dots) <= 500
    assert "account-000" not in texts(root)  # no per-account row labels
    height = float(root.get("viewBox").split()[3])
    assert height < 400, "500 accounts still fit one screen"
    # every account is either drawn or counted in a "+n" above its stack
    counted = sum(int(t.text[1:]) for t in root.iter(f"{SVG}text") if t.get("class") == "overflow")
    assert len(dots) + counted == 500


# --- the account's time series (routing/dashboard/timecharts.py) -----------------------------


def test_latency_timeline_breaks_the_line_where_the_account_served_nothing():
    from datetime import UTC, datetime

    from routing.dashboard import timecharts

    start = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    svg = timecharts.latency_timeline(start, 1, [400.0, 420.0, None, 900.0, 950.0], [500.0] * 5)
    assert svg.count('class="series-account"') == 2 and svg.count('class="point"') == 4
    assert "12:03: 900 ms, pool 500 ms" in svg
    assert ">12:00<" in svg and ">12:05<" in svg  # the time axis, every 5 minutes


def test_timelines_say_so_when_there_is_nothing_to_draw():
    from datetime import UTC, datetime

    from routing.dashboard import timecharts

    start = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    assert "No first-token latency reported in the last 1 h" in timecharts.latency_timeline(
        start, 1, [None] * 60, [300.0] * 60
    )
    assert "No leases" in timecharts.leases_timeline(start, 1, [0] * 60)
    assert "No leases" in timecharts.outcomes_timeline(start, 1, {}, {})
