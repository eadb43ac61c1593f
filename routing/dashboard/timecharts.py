"""Time-series SVG charts of one account's recent hours: first-token latency
against the whole pool, leases started, and outcomes stacked. Pure, like
``charts.py`` (whose drawing helpers they share): buckets in, markup out.

Every chart shares one time axis, so a spike in one lines up with a change of
colour in another: that is when the account went bad.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from html import escape

from routing.dashboard.charts import GRID, INK, MUTED, _el, _empty, _short, _svg, _text, nice_ticks

# Wider than the pool's charts: the three stack full-width, one time axis above another.
WIDTH = 960
LEFT = 48
RIGHT = 12
TOP = 26
PLOT = 120
ACCOUNT_COLOUR = "#2563eb"
POOL_COLOUR = "#9ca3af"
OUTCOME_COLOURS = {
    "success": "#10b981",
    "retry_next": "#6366f1",
    "rate_limited": "#f59e0b",
    "quota_exhausted": "#ef4444",
    "fatal": "#7f1d1d",
    "expired": "#6b7280",
    "": "#93c5fd",
}
# Time labels every this many minutes, the first that gives at most MAX_TICKS.
TICK_MINUTES = (5, 10, 15, 30, 60, 120, 180, 240, 360, 720)
MAX_TICKS = 12


class _Frame:
    """The shared axes: ``count`` buckets of ``minutes`` from ``start`` across,
    0…``peak`` up."""

    def __init__(self, start: datetime, minutes: int, count: int, peak: float):
        self.start, self.minutes, self.count = start, minutes, count
        self.ticks = nice_ticks(0, peak, 4) if peak > 0 else [0.0, 1.0]
        self.top_value = max(self.ticks[-1], peak, 1e-9)
        self.width = (WIDTH - LEFT - RIGHT) / count

    def x(self, bucket: float) -> float:
        return LEFT + self.width * bucket

    def y(self, value: float) -> float:
        return TOP + PLOT - PLOT * value / self.top_value

    def bucket_time(self, i: int) -> datetime:
        return self.start + timedelta(minutes=self.minutes * i)

    def span_text(self, i: int) -> str:
        begin = self.bucket_time(i)
        if self.minutes == 1:
            return f"{begin:%H:%M}"
        return f"{begin:%H:%M}–{begin + timedelta(minutes=self.minutes):%H:%M}"

    def axes(self, unit: str) -> str:
        parts = []
        for tick in self.ticks:
            y = self.y(tick)
            parts.append(_el("line", x1=float(LEFT), x2=float(WIDTH - RIGHT), y1=y, y2=y, stroke=GRID))
            parts.append(_text(LEFT - 6, y + 4, _short(tick), text_anchor="end", fill=MUTED, font_size=11))
        parts.append(_text(4, TOP - 12, unit, fill=MUTED, font_size=11))
        span = self.minutes * self.count
        step = next((s for s in TICK_MINUTES if span / s <= MAX_TICKS), TICK_MINUTES[-1])
        midnight = self.start.replace(hour=0, minute=0, second=0, microsecond=0)
        offset = (self.start - midnight).total_seconds() / 60
        tick = math.ceil(offset / step) * step
        while tick <= offset + span:
            x = self.x((tick - offset) / self.minutes)
            when = midnight + timedelta(minutes=tick)
            bottom = TOP + PLOT
            parts.append(_el("line", x1=x, x2=x, y1=float(bottom), y2=float(bottom + 4), stroke=MUTED))
            parts.append(_text(x, bottom + 16, f"{when:%H:%M}", text_anchor="middle", fill=MUTED, font_size=11))
            tick += step
        return "".join(parts)

    def svg(self, body: str, *, label: str, css_class: str) -> str:
        return _svg(WIDTH, TOP + PLOT + 24, body, label=label, css_class=css_class)


def _legend(entries: Sequence[tuple[str, str, str]]) -> str:
    """Keys along the top right: (css class, colour, text)."""
    parts, x = [], WIDTH - RIGHT
    for css_class, colour, text in reversed(entries):
        x -= 7 * len(text) + 4
        parts.append(_text(x, 12, text, fill=INK, font_size=11))
        x -= 14
        parts.append(_el("rect", x=x, y=3.0, width=10.0, height=10.0, rx=2, fill=colour, class_=f"key {css_class}"))
        x -= 10
    return _el("g", "".join(parts), class_="legend")


def _window_text(minutes: int, count: int) -> str:
    hours = minutes * count / 60
    return f"{hours:g} h" if hours >= 1 else f"{minutes * count} min"


def latency_timeline(
    start: datetime, minutes: int, account_ms: Sequence[float | None], pool_ms: Sequence[float | None]
) -> str:
    """The account's mean first-token latency per bucket (a line through
    dots, broken where it served nothing) over the whole pool's (grey)."""
    css_class = "chart chart-timeline chart-activity-latency"
    count = len(account_ms)
    if not any(v is not None for v in account_ms):
        return _empty(
            f"No first-token latency reported in the last {_window_text(minutes, count)}", css_class=css_class
        )
    known = [v for v in (*account_ms, *pool_ms) if v is not None]
    frame = _Frame(start, minutes, count, max(known) * 1.1)
    body = [frame.axes("ms")]

    def runs(values):
        run = []
        for i, value in enumerate(values):
            if value is None:
                if run:
                    yield run
                run = []
            else:
                run.append((frame.x(i + 0.5), frame.y(value)))
        if run:
            yield run

    for run in runs(pool_ms):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
        body.append(
            _el("polyline", points=points, fill="none", stroke=POOL_COLOUR, stroke_width=1.5, class_="series-pool")
        )
    for run in runs(account_ms):
        if len(run) > 1:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            body.append(
                _el(
                    "polyline",
                    points=points,
                    fill="none",
                    stroke=ACCOUNT_COLOUR,
                    stroke_width=2,
                    class_="series-account",
                )
            )
    for i, value in enumerate(account_ms):
        if value is not None:
            pool = f", pool {pool_ms[i]:,.0f} ms" if pool_ms[i] is not None else ""
            tooltip = _el("title", escape(f"{frame.span_text(i)}: {value:,.0f} ms{pool}"))
            circle = _el("circle", cx=frame.x(i + 0.5), cy=frame.y(value), r=2.5, fill=ACCOUNT_COLOUR, class_="point")
            body.append(_el("g", tooltip + circle))
    body.append(_legend([("key-account", ACCOUNT_COLOUR, "this account"), ("key-pool", POOL_COLOUR, "whole pool")]))
    label = f"First-token latency of this account and of the whole pool, last {_window_text(minutes, count)}"
    return frame.svg("".join(body), label=label, css_class=css_class)


def _bars(frame: _Frame, i: int, stack: Sequence[tuple[str, int, str]], total_text: str) -> str:
    """One bucket's bar, stacked bottom up from ``(css class, value, colour)``."""
    width = max(frame.width - (1 if frame.width > 3 else 0), 0.8)
    parts, level = [_el("title", escape(f"{frame.span_text(i)}: {total_text}"))], 0
    for css_class, value, colour in stack:
        if value:
            top = frame.y(level + value)
            parts.append(
                _el(
                    "rect",
                    x=frame.x(i),
                    y=top,
                    width=width,
                    height=max(frame.y(level) - top, 0.5),
                    fill=colour,
                    class_=css_class,
                )
            )
            level += value
    return _el("g", "".join(parts))


def leases_timeline(start: datetime, minutes: int, started: Sequence[int]) -> str:
    """Leases started on the account per bucket."""
    css_class = "chart chart-timeline chart-activity-leases"
    count = len(started)
    if not any(started):
        return _empty(f"No leases in the last {_window_text(minutes, count)}", css_class=css_class)
    frame = _Frame(start, minutes, count, max(started))
    body = [frame.axes("leases")]
    for i, value in enumerate(started):
        if value:
            text = f"{value:,} lease{'s' if value != 1 else ''} started"
            body.append(_bars(frame, i, [("bar", value, ACCOUNT_COLOUR)], text))
    per = "minute" if minutes == 1 else f"{minutes} minutes"
    label = f"Leases started per {per}, last {_window_text(minutes, count)}: {sum(started):,} in all"
    return frame.svg("".join(body), label=label, css_class=css_class)


def outcomes_timeline(
    start: datetime, minutes: int, outcomes: Mapping[str, Sequence[int]], labels: Mapping[str, str]
) -> str:
    """Leases per bucket stacked by outcome, in the order given (bottom up);
    the page draws the key, which may be long."""
    css_class = "chart chart-timeline chart-activity-outcomes"
    count = len(next(iter(outcomes.values()), ()))
    totals = [sum(series[i] for series in outcomes.values()) for i in range(count)]
    if not any(totals):
        return _empty("No leases in this window", css_class=css_class)
    frame = _Frame(start, minutes, count, max(totals))
    body = [frame.axes("leases")]
    for i, total in enumerate(totals):
        if total:
            stack = [
                (f"stack stack-{outcome or 'open'}", series[i], OUTCOME_COLOURS.get(outcome, MUTED))
                for outcome, series in outcomes.items()
            ]
            text = ", ".join(f"{series[i]:,} {labels[o]}" for o, series in outcomes.items() if series[i])
            body.append(_bars(frame, i, stack, text))
    label = "Outcomes of the leases started per bucket: " + ", ".join(
        f"{sum(series):,} {labels[o]}" for o, series in outcomes.items()
    )
    return frame.svg("".join(body), label=label, css_class=css_class)
