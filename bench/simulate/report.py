"""The terminal table and the JSON files under ``bench/out/``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from bench.simulate.metrics import Summary, dominating

# (header, cell format); the header is right-aligned to the cell's width.
COLUMNS = (
    ("policy", "{:<16}"),
    ("jain_sess", "{:>9.4f}"),
    ("jain_req", "{:>8.4f}"),
    ("starved", "{:>7d}"),
    ("mean_ms", "{:>7.0f}"),
    ("p95_ms", "{:>6.0f}"),
    ("p95_wait_ms", "{:>11.0f}"),
    ("moved", "{:>6d}"),
    ("rejected", "{:>8d}"),
)


def table(summaries: Sequence[Summary]) -> str:
    widths = [len(fmt.format("" if "<" in fmt else 0)) for _, fmt in COLUMNS]
    header = "  ".join(
        name.ljust(w) if i == 0 else name.rjust(w) for i, ((name, _), w) in enumerate(zip(COLUMNS, widths, strict=True))
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        values = (
            s.policy,
            s.jain_sessions,
            s.jain_requests,
            len(s.starved),
            s.mean_latency_ms,
            s.p95_latency_ms,
            s.p95_wait_ms,
            s.sessions_moved,
            s.rejected,
        )
        lines.append("  ".join(fmt.format(v) for (_, fmt), v in zip(COLUMNS, values, strict=True)))
    return "\n".join(lines)


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


def write_json(summaries: Sequence[Summary], out: Path, *, meta: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    fairness = out / "fairness.json"
    fairness.write_text(json.dumps({s.policy: s.public() for s in summaries}, indent=2) + "\n")
    details = out / "fairness-details.json"
    details.write_text(
        json.dumps({"run": meta, "policies": {s.policy: s.details() for s in summaries}}, indent=2) + "\n"
    )
    return fairness, details
