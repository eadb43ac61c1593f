"""The terminal tables and the JSON files under ``bench/out/``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.simulate.metrics import Summary, dominating

Column = tuple[str, str, Callable[[Summary], object]]  # (header, cell format, value)

COLUMNS: tuple[Column, ...] = (
    ("policy", "{:<16}", lambda s: s.policy),
    ("jain_sess", "{:>9.4f}", lambda s: s.jain_sessions),
    ("jain_req", "{:>8.4f}", lambda s: s.jain_requests),
    ("starved", "{:>7d}", lambda s: len(s.starved)),
    ("mean_ms", "{:>7.0f}", lambda s: s.mean_latency_ms),
    ("p95_ms", "{:>6.0f}", lambda s: s.p95_latency_ms),
    ("p95_wait_ms", "{:>11.0f}", lambda s: s.p95_wait_ms),
    ("moved", "{:>6d}", lambda s: s.sessions_moved),
    ("rejected", "{:>8d}", lambda s: s.rejected),
)

# Issue 12's figures, for the dispatcher variants on the upkeep day.
UPKEEP_COLUMNS: tuple[Column, ...] = (
    ("run", "{:<16}", lambda s: s.policy),
    ("wasted", "{:>6.0f}", lambda s: s.credits_wasted),
    ("failed", "{:>6d}", lambda s: s.failed_calls),
    ("ejected", "{:>7d}", lambda s: s.ejections),
    ("moved", "{:>6d}", lambda s: s.sessions_moved),
    ("ret_moved", "{:>9.1%}", lambda s: s.moved_share),
    ("peak_moved", "{:>10.1%}", lambda s: s.moved_share_peak),
    ("p95_wait_ms", "{:>11.0f}", lambda s: s.p95_wait_ms),
    ("peak_p95_wait", "{:>13.0f}", lambda s: s.p95_wait_peak_ms),
    ("p95_to_token", "{:>12.0f}", lambda s: s.p95_first_token_ms),
    ("jain_sess", "{:>9.4f}", lambda s: s.jain_sessions),
    ("jain_req", "{:>8.4f}", lambda s: s.jain_requests),
    ("starved", "{:>7d}", lambda s: len(s.starved)),
    ("rejected", "{:>8d}", lambda s: s.rejected),
)

PATIENCE_COLUMNS: tuple[Column, ...] = (
    ("run", "{:<16}", lambda s: s.policy),
    ("peak_moved", "{:>10.1%}", lambda s: s.moved_share_peak),
    ("for_crowding", "{:>12.1%}", lambda s: s.moved_crowded_share_peak),
    ("peak_p95_wait", "{:>13.0f}", lambda s: s.p95_wait_peak_ms),
    ("day_moved", "{:>9.1%}", lambda s: s.moved_share),
    ("p95_wait_ms", "{:>11.0f}", lambda s: s.p95_wait_ms),
    ("moved", "{:>6d}", lambda s: s.sessions_moved),
)

# Issue 12 §7's aim for sticky patience, at peak.
PATIENCE_MAX_MOVED = 0.10
PATIENCE_MAX_WAIT_GROWTH = 0.10


def _table(summaries: Sequence[Summary], columns: Sequence[Column]) -> str:
    widths = [len(fmt.format("" if "<" in fmt else 0)) for _, fmt, _ in columns]
    cells = [(name, w) for (name, _, _), w in zip(columns, widths, strict=True)]
    header = "  ".join(name.ljust(w) if i == 0 else name.rjust(w) for i, (name, w) in enumerate(cells))
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append("  ".join(fmt.format(value(s)) for _, fmt, value in columns))
    return "\n".join(lines)


def table(summaries: Sequence[Summary]) -> str:
    return _table(summaries, COLUMNS)


def upkeep_table(summaries: Sequence[Summary]) -> str:
    return _table(summaries, UPKEEP_COLUMNS)


def patience_table(summaries: Sequence[Summary]) -> str:
    return _table(summaries, PATIENCE_COLUMNS)


def verdict(summaries: Sequence[Summary]) -> list[str]:
    """The issue's targets, stated plainly (they are reported, not enforced)."""
    by_name = {s.policy: s for s in summaries}
    base = by_name.get("kiropool")
    if base is None:
        return []
    lines = [
        f"kiropool Jain's index on bound sessions: {base.jain_sessions:.4f} "
        f"({'meets' if base.jain_sessions >= 0.99 else 'MISSES'} the 0.99 target)",
        "starved identities under kiropool: " + (", ".join(base.starved) if base.starved else "none"),
    ]
    for on, label in (("jain_sessions", "session"), ("jain_requests", "request")):
        better = dominating(summaries, on=on)
        lines.append(
            f"beats kiropool on {label} fairness and p95 wait at once: " + (", ".join(better) if better else "none")
        )
    greedy = by_name.get("exact_score")
    if greedy is not None and greedy.mean_latency_ms > 0:
        mean = base.mean_latency_ms - greedy.mean_latency_ms
        p95 = base.p95_latency_ms - greedy.p95_latency_ms
        lines.append(
            f"served-latency cost of fairness vs exact score: mean {mean:+.0f} ms "
            f"({mean / greedy.mean_latency_ms:+.1%}), p95 {p95:+.0f} ms"
        )
    return lines


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.0%}" if before else "n/a"


def upkeep_verdict(summaries: Sequence[Summary], *, old: str = "today", new: str = "new") -> list[str]:
    by_name = {s.policy: s for s in summaries}
    if old not in by_name or new not in by_name:
        return []
    a, b = by_name[old], by_name[new]
    return [
        f"credits wasted at reset: {old} {a.credits_wasted:.0f}, {new} {b.credits_wasted:.0f} "
        f"({_change(a.credits_wasted, b.credits_wasted)})",
        f"upstream calls that failed: {old} {a.failed_calls}, {new} {b.failed_calls} "
        f"({_change(a.failed_calls, b.failed_calls)})",
        f"returning turns that changed account: {old} {a.moved_share:.1%} of the day, {a.moved_share_peak:.1%} "
        f"at peak; {new} {b.moved_share:.1%}, {b.moved_share_peak:.1%}",
        f"p95 wait: {old} {a.p95_wait_ms:.0f} ms ({a.p95_wait_peak_ms:.0f} at peak), {new} {b.p95_wait_ms:.0f} ms "
        f"({b.p95_wait_peak_ms:.0f} at peak)",
        f"p95 from arrival to first token (waits, failed attempts, latency): {old} {a.p95_first_token_ms:.0f} ms, "
        f"{new} {b.p95_first_token_ms:.0f} ms",
    ]


def patience_meets(s: Summary, base: Summary) -> bool:
    """Issue 12 §7's aim: under 10 % of returning turns moved at peak, at no
    more than +10 % p95 wait at peak over no patience."""
    return s.moved_share_peak < PATIENCE_MAX_MOVED and s.p95_wait_peak_ms <= base.p95_wait_peak_ms * (
        1 + PATIENCE_MAX_WAIT_GROWTH
    )


def patience_verdict(summaries: Sequence[Summary], patience_ms: Sequence[int]) -> list[str]:
    """Each patience against none: moves and p95 wait at peak, and the aim."""
    runs = dict(zip(patience_ms, summaries, strict=True))
    base = runs.get(0)
    if base is None:
        return []
    lines = []
    for ms, s in runs.items():
        if ms == 0:
            continue
        wait = _change(base.p95_wait_peak_ms, s.p95_wait_peak_ms)
        lines.append(
            f"patience {ms / 1000:g} s: {s.moved_share_peak:.1%} of returning turns move at peak "
            f"(none: {base.moved_share_peak:.1%}), p95 wait at peak {wait}"
        )
    meeting = [f"{ms / 1000:g} s" for ms, s in runs.items() if patience_meets(s, base)]
    lines.append(
        f"under {PATIENCE_MAX_MOVED:.0%} moved at no more than +{PATIENCE_MAX_WAIT_GROWTH:.0%} p95 wait: "
        + (", ".join(meeting) if meeting else "no patience tried meets both")
    )
    return lines


def _dump(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_json(summaries: Sequence[Summary], out: Path, *, meta: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    fairness = _dump(out / "fairness.json", {s.policy: s.public() for s in summaries})
    details = _dump(
        out / "fairness-details.json", {"run": meta, "policies": {s.policy: s.details() for s in summaries}}
    )
    return fairness, details


def write_upkeep_json(
    variants: Sequence[Summary], sweep: Sequence[Summary], patience_ms: Sequence[int], out: Path, *, meta: dict
) -> list[Path]:
    """``upkeep.json`` (run -> figures), ``patience.json`` (run -> patience and
    figures) and ``upkeep-details.json`` (every run in full, and the scenario)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if variants:
        written.append(_dump(out / "upkeep.json", {s.policy: s.upkeep() for s in variants}))
    if sweep:
        figures = {s.policy: {"patience_ms": ms} | s.upkeep() for ms, s in zip(patience_ms, sweep, strict=True)}
        written.append(_dump(out / "patience.json", figures))
    runs = {s.policy: s.details() for s in [*variants, *sweep]}
    written.append(_dump(out / "upkeep-details.json", {"run": meta, "runs": runs}))
    return written
