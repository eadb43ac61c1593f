"""Server-side SVG charts for the dashboards. Pure: plain values in, markup out.

No JavaScript and no CDN: the page ships the chart as inline SVG, so it renders
the same in every browser, prints, and survives a locked-down network. Sizes
are in viewBox units; the stylesheet scales the SVG to the page width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from routing.selection import BAND_FRACTION, MIN_TOLERANCE_MS

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"

# Bar and dot colours, one per state; the stylesheet uses the same palette.
STATE_COLOURS = {
    "ok": "#3b82f6",
    "cooling": "#f59e0b",
    "exhausted": "#ef4444",
    "disabled": "#9ca3af",
}
STATE_WORDS = {"cooling": "cooling down", "exhausted": "quota exhausted", "disabled": "disabled"}
INK = "#111827"
MUTED = "#6b7280"
GRID = "#e5e7eb"


@dataclass(frozen=True, slots=True)
class SessionBar:
    """One routing identity's live bound sessions."""

    label: str
    value: int
    state: str = "ok"  # a key of STATE_COLOURS
    href: str | None = None
    detail: str = ""  # tooltip text after the figures


@dataclass(frozen=True, slots=True)
class LatencyPoint:
    """One account's latency score and the band it falls in."""

    label: str
    score_ms: float
    band: int
    samples: int
    href: str | None = None


def _num(value: float) -> str:
    """A coordinate: short, and never '-0'."""
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _attrs(**attrs: object) -> str:
    parts = []
    for key, value in attrs.items():
        if value is None:
            continue
        name = key.rstrip("_").replace("_", "-")
        text = _num(value) if isinstance(value, float) else str(value)
        parts.append(f'{name}="{escape(text, quote=True)}"')
    return " ".join(parts)


def _el(tag: str, body: str = "", **attrs: object) -> str:
    return f"<{tag} {_attrs(**attrs)}>{body}</{tag}>" if body else f"<{tag} {_attrs(**attrs)}/>"


def _text(x: float, y: float, text: str, **attrs: object) -> str:
    return _el("text", escape(text), x=float(x), y=float(y), **attrs)


def _linked(href: str | None, body: str) -> str:
    return f'<a href="{escape(href, quote=True)}">{body}</a>' if href else body


def _svg(width: float, height: float, body: str, *, label: str, css_class: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" {_attrs(viewBox=f"0 0 {_num(width)} {_num(height)}")} '
        f"{_attrs(class_=css_class, role='img', aria_label=label, font_family=FONT, font_size=12)}>"
        f"<title>{escape(label)}</title>{body}</svg>"
    )


def _empty(message: str, *, css_class: str, width: float = 640, height: float = 72) -> str:
    body = _text(width / 2, height / 2 + 4, message, text_anchor="middle", fill=MUTED, font_size=13)
    return _svg(width, height, body, label=message, css_class=f"{css_class} chart-empty")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round axis values spanning [low, high]: steps of 1, 2 or 5 × 10^k."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _short(value: float) -> str:
    """An axis label: 1200 → '1.2k', 40 → '40'."""
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}".rstrip("0").rstrip(".") + "k"
    return f"{value:g}"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- bound sessions per routing identity ---------------------------------------

SESSION_ROW = 22
SESSION_LABEL_WIDTH = 170
SESSION_WIDTH = 640


def sessions_chart(bars: Sequence[SessionBar], *, max_bars: int = 24) -> str:
    """Horizontal bars, most loaded identity first, with the mean as a dashed line.

    Least-connections spreading should keep the bars level; one long bar is an
    identity that new sessions are piling onto. Past ``max_bars`` the rest are
    summed in a footnote so the chart stays one screen tall.
    """
    css_class = "chart chart-sessions"
    if not bars:
        return _empty("No routing identities yet", css_class=css_class)
    ordered = sorted(bars, key=lambda b: (-b.value, b.label))
    shown, hidden = ordered[:max_bars], ordered[max_bars:]
    mean = sum(b.value for b in bars) / len(bars)
    peak = max(max(b.value for b in shown), 1)
    ticks = nice_ticks(0, peak, 4)
    axis_max = max(ticks[-1], peak) if ticks else peak

    # Room right of the longest bar for its figure, and for a state word if any bar has one.
    margin = 44 + (96 if any(b.state != "ok" for b in shown) else 0)
    left, right, top = SESSION_LABEL_WIDTH, SESSION_WIDTH - margin, 24
    plot = right - left

    def x(value: float) -> float:
        return left + plot * value / axis_max

    body = []
    bottom = top + SESSION_ROW * len(shown)
    for tick in ticks:
        body.append(_el("line", x1=x(tick), x2=x(tick), y1=float(top - 4), y2=float(bottom), stroke=GRID))
        body.append(_text(x(tick), top - 8, _short(tick), text_anchor="middle", fill=MUTED, font_size=11))

    for i, bar in enumerate(shown):
        y = top + i * SESSION_ROW
        colour = STATE_COLOURS.get(bar.state, STATE_COLOURS["ok"])
        width = max(plot * bar.value / axis_max, 1.5 if bar.value else 0)
        tooltip = f"{bar.label}: {bar.value:,} live session{'s' if bar.value != 1 else ''}"
        if bar.detail:
            tooltip += f" ({bar.detail})"
        row = [
            _el("title", escape(tooltip)),
            _text(left - 8, y + 15, _truncate(bar.label, 24), text_anchor="end", fill=INK),
            _el(
                "rect",
                x=float(left),
                y=float(y + 4),
                width=float(width),
                height=float(SESSION_ROW - 8),
                rx=3,
                fill=colour,
                class_=f"bar bar-{bar.state}",
            ),
            _text(left + width + 6, y + 15, f"{bar.value:,}", fill=INK, font_weight=600),
        ]
        if bar.state != "ok":
            # A zero-length bar shows no colour, so say what holds the identity back.
            offset = left + width + 14 + 7 * len(f"{bar.value:,}")
            row.append(_text(offset, y + 15, STATE_WORDS.get(bar.state, bar.state), fill=colour, font_size=11))
        body.append(_linked(bar.href, _el("g", "".join(row), class_="bar-row")))

    mean_x = x(mean)
    body.append(
        _el(
            "line",
            x1=mean_x,
            x2=mean_x,
            y1=float(top - 2),
            y2=float(bottom + 4),
            stroke=INK,
            stroke_dasharray="4 3",
            class_="mean",
        )
    )
    caption = f"mean {mean:.1f}"
    anchor = "end" if mean_x > left + plot * 0.8 else "start"
    body.append(_text(mean_x + (-4 if anchor == "end" else 4), bottom + 16, caption, text_anchor=anchor, fill=INK))
    height = bottom + 26
    if hidden:
        hidden_sessions = sum(b.value for b in hidden)
        note = f"+ {len(hidden):,} more identities holding {hidden_sessions:,} sessions"
        body.append(_text(left, height + 4, note, fill=MUTED, class_="more"))
        height += 14
    label = f"Live bound sessions per routing identity ({len(bars)} identities, mean {mean:.1f})"
    return _svg(SESSION_WIDTH, height, "".join(body), label=label, css_class=css_class)


# --- latency scores against the band boundaries -----------------------------------

LATENCY_WIDTH = 640
LATENCY_ROW = 20
LATENCY_LABEL_WIDTH = 150
DOT = 9


def band_tolerance(global_avg_ms: float) -> float:
    """Half the width of a band, in ms; the same figure ``selection.latency_band`` divides by."""
    return max(global_avg_ms * BAND_FRACTION, MIN_TOLERANCE_MS)


def band_edges(global_avg_ms: float, low: float, high: float) -> list[tuple[float, int]]:
    """Boundaries inside [low, high] as ``(ms, band above it)``: band k spans G + (2k ± 1)·tolerance."""
    tol = band_tolerance(global_avg_ms)
    first = math.ceil(((low - global_avg_ms) / tol - 1) / 2)
    edges = []
    k = first
    while True:
        edge = global_avg_ms + (2 * k + 1) * tol
        if edge > high:
            break
        if edge >= low:
            edges.append((edge, k + 1))
        k += 1
    return edges


def band_colour(band: int) -> str:
    if band < 0:
        return "#0d9488"  # faster than the pack
    if band == 0:
        return STATE_COLOURS["ok"]
    return "#f59e0b" if band == 1 else "#dc2626"


def latency_chart(points: Sequence[LatencyPoint], *, global_avg_ms: float | None, max_rows: int = 40) -> str:
    """Each account's score on a ms axis, over shaded bands centred on the global average.

    Accounts whose dots share a band tie on latency and take turns; a dot
    alone in a band to the left wins until another account joins it. With more
    than ``max_rows`` accounts the dots stack by score instead of one labelled
    row each, so 500 accounts still fit a screen.
    """
    css_class = "chart chart-latency"
    if global_avg_ms is None or not math.isfinite(global_avg_ms) or not points:
        return _empty("No latency snapshot yet: bands appear once samples are aggregated", css_class=css_class)
    g = global_avg_ms
    tol = band_tolerance(g)
    scores = [p.score_ms for p in points]
    low = min(min(scores), g - 2.5 * tol)
    high = max(max(scores), g + 2.5 * tol)
    pad = (high - low) * 0.04
    low, high = max(0.0, low - pad), high + pad

    dense = len(points) > max_rows
    left = 16 if dense else LATENCY_LABEL_WIDTH
    right = LATENCY_WIDTH - 16
    top = 30
    plot = right - left

    def x(ms: float) -> float:
        return left + plot * (ms - low) / (high - low)

    ordered = sorted(points, key=lambda p: (p.score_ms, p.label))
    if dense:
        columns: dict[int, list[LatencyPoint]] = {}
        for p in ordered:
            columns.setdefault(int((x(p.score_ms) - left) // DOT), []).append(p)
        stack_cap = 24
        tallest = min(max(len(c) for c in columns.values()), stack_cap)
        plot_height = tallest * DOT + 12
    else:
        plot_height = len(ordered) * LATENCY_ROW + 8
    bottom = top + plot_height

    body = []
    # Band stripes: band 0 (the tie band) tinted, the others alternating.
    edges = band_edges(g, low, high)
    bounds = [low, *(e for e, _ in edges), high]
    bands = [edges[0][1] - 1 if edges else 0, *(b for _, b in edges)]
    for (start, end), band in zip(zip(bounds, bounds[1:], strict=False), bands, strict=False):
        fill = "#dcfce7" if band == 0 else ("#f9fafb" if band % 2 else "#f3f4f6")
        body.append(
            _el(
                "rect",
                x=x(start),
                y=float(top),
                width=max(x(end) - x(start), 0.0),
                height=float(plot_height),
                fill=fill,
                class_=f"band band-{'zero' if band == 0 else 'other'}",
            )
        )
        if x(end) - x(start) >= 30:
            name = "band 0" if band == 0 and x(end) - x(start) >= 44 else f"{band:+d}" if band else "0"
            body.append(_text((x(start) + x(end)) / 2, top - 8, name, text_anchor="middle", fill=MUTED, font_size=11))
    for edge, _ in edges:
        body.append(
            _el("line", x1=x(edge), x2=x(edge), y1=float(top), y2=float(bottom), stroke="#d1d5db", class_="edge")
        )
    gx = x(g)
    body.append(_el("line", x1=gx, x2=gx, y1=float(top - 2), y2=float(bottom), stroke=INK, stroke_width=1.5))

    for tick in nice_ticks(low, high, 6):
        body.append(_el("line", x1=x(tick), x2=x(tick), y1=float(bottom), y2=float(bottom + 4), stroke=MUTED))
        body.append(_text(x(tick), bottom + 16, _short(tick), text_anchor="middle", fill=MUTED, font_size=11))
    body.append(_text(right, bottom + 32, "latency score, ms", text_anchor="end", fill=MUTED, font_size=11))
    body.append(_text(gx, bottom + 32, f"global average {g:,.0f} ms", text_anchor="middle", fill=INK, font_size=11))

    def dot(p: LatencyPoint, cx: float, cy: float, r: float) -> str:
        tooltip = f"{p.label}: score {p.score_ms:,.0f} ms, band {p.band:+d}, {p.samples} samples"
        circle = _el("circle", cx=cx, cy=cy, r=r, fill=band_colour(p.band), stroke="#ffffff", class_="dot")
        return _linked(p.href, _el("g", _el("title", escape(tooltip)) + circle, class_="dot-row"))

    if dense:
        for column, members in sorted(columns.items()):
            cx = left + column * DOT + DOT / 2
            for level, p in enumerate(members[:stack_cap]):
                body.append(dot(p, cx, bottom - 6 - level * DOT - DOT / 2, DOT / 2 - 0.5))
            if len(members) > stack_cap:
                extra = f"+{len(members) - stack_cap}"
                body.append(_text(cx, top - 2, extra, text_anchor="middle", fill=INK, font_size=10, class_="overflow"))
    else:
        for i, p in enumerate(ordered):
            cy = top + 4 + i * LATENCY_ROW + LATENCY_ROW / 2
            body.append(_text(left - 8, cy + 4, _truncate(p.label, 22), text_anchor="end", fill=INK))
            body.append(_el("line", x1=float(left), x2=float(right), y1=cy, y2=cy, stroke=GRID, stroke_width=0.6))
            body.append(dot(p, x(p.score_ms), cy, 5.5))

    label = (
        f"Latency score of {len(points)} accounts against bands of ±{tol:,.0f} ms around the global average {g:,.0f} ms"
    )
    return _svg(LATENCY_WIDTH, bottom + 40, "".join(body), label=label, css_class=css_class)
