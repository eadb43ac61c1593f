"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)

from bench.simulate.metrics import STARVED_FRACTION, Summary  # noqa: E402
from bench.simulate.results import RunResult  # noqa: E402
from bench.simulate.scenario import HOUR  # noqa: E402


def plots_write(summaries: Sequence[Summary], results: Sequence[RunResult], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [_shares(summaries, out / "share_per_identity.png")]
    by_name = {r.policy: r for r in results}
    pair = [by_name[name] for name in ("kiropool", "exact_score") if name in by_name]
    if pair:
        written.append(_sessions_over_time(pair, out / "sessions_over_time.png"))
    written.append(_fairness_vs_latency(summaries, out / "fairness_vs_latency.png"))
    return written


def _shares(summaries: Sequence[Summary], path: Path) -> Path:
    names = list(summaries[0].fair_share)
    fig, axes = plt.subplots(2, 1, figsize=(13, 8.5), sharex=True)
    width = 0.8 / len(summaries)
    for ax, attr, title in (
        (axes[0], "request_share", "Share of served requests ÷ fair share"),
        (axes[1], "session_share", "Share of bound sessions (time-averaged) ÷ fair share"),
    ):
        for k, s in enumerate(summaries):
            share = getattr(s, attr)
            ratios = [share[n] / s.fair_share[n] if s.fair_share[n] else 0.0 for n in names]
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
            ax.bar(xs, ratios, width, label=s.policy)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="fair share")
        ax.axhline(STARVED_FRACTION, color="red", linewidth=1, linestyle=":", label="starved below this")
        ax.set_title(title)
        ax.set_ylabel("1.0 = fair")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(names)), names)
    axes[0].legend(ncol=4, fontsize=9, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sessions_over_time(results: Sequence[RunResult], path: Path) -> Path:
    top = max(max(max(row) for row in r.bindings) for r in results)
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        hours = [t / HOUR for t in r.binding_ticks]
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate(r.identities):
            ax.plot(hours, [row[i] for row in r.bindings], label=name, color=cmap(i % 20), linewidth=1.2)
        ax.set_title(f"Live bound sessions per identity: {r.policy}")
        ax.set_xlabel("simulated hour")
        ax.set_ylim(0, top * 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("live bindings")
    axes[0][-1].legend(fontsize=8, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fairness_vs_latency(summaries: Sequence[Summary], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, attr, title in (
        (axes[0], "jain_sessions", "Bound-session fairness vs served latency"),
        (axes[1], "jain_requests", "Request fairness vs served latency"),
    ):
        for s in summaries:
            ax.scatter(s.mean_latency_ms, getattr(s, attr), s=60)
            ax.annotate(
                f"{s.policy}\n(p95 wait {s.p95_wait_ms / 1000:.1f} s)",
                (s.mean_latency_ms, getattr(s, attr)),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        ax.set_title(title)
        ax.set_xlabel("mean served first-token latency (ms)")
        ax.set_ylabel("Jain's index (1 = fair)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def upkeep_plots_write(
    variants: Sequence[Summary], sweep: Sequence[Summary], patience_ms: Sequence[int], out: Path
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if variants:
        written.append(_upkeep(variants, out / "upkeep.png"))
    if sweep:
        written.append(_patience(sweep, patience_ms, out / "patience.png"))
    return written


def _upkeep(summaries: Sequence[Summary], path: Path) -> Path:
    names = [s.policy for s in summaries]
    xs = range(len(names))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = (
        (axes[0][0], "Credits wasted at reset", [("", [s.credits_wasted for s in summaries])], "credits"),
        (axes[0][1], "Upstream calls that failed", [("", [s.failed_calls for s in summaries])], "calls"),
        (
            axes[1][0],
            "Returning turns that changed account",
            [
                ("over the day", [100 * s.moved_share for s in summaries]),
                ("at peak", [100 * s.moved_share_peak for s in summaries]),
            ],
            "% of returning turns",
        ),
        (
            axes[1][1],
            "p95 wait for a slot",
            [
                ("over the day", [s.p95_wait_ms / 1000 for s in summaries]),
                ("at peak", [s.p95_wait_peak_ms / 1000 for s in summaries]),
            ],
            "seconds",
        ),
    )
    for ax, title, series, unit in panels:
        width = 0.8 / len(series)
        for k, (label, values) in enumerate(series):
            bars = ax.bar([x - 0.4 + width * (k + 0.5) for x in xs], values, width, label=label or None)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(list(xs), names)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=9)
    fig.suptitle("Upkeep day: today's dispatcher, each new behaviour alone, and all of them (new)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _patience(summaries: Sequence[Summary], patience_ms: Sequence[int], path: Path) -> Path:
    seconds = [ms / 1000 for ms in patience_ms]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.plot(seconds, [100 * s.moved_share_peak for s in summaries], "o-", color="tab:blue", label="moved at peak")
    ax.plot(seconds, [100 * s.moved_share for s in summaries], "o--", color="tab:blue", alpha=0.5, label="moved, day")
    ax.axhline(10, color="tab:blue", linewidth=1, linestyle=":", label="aim: under 10 % moved")
    ax.set_xlabel("sticky patience (s)")
    ax.set_ylabel("returning turns that changed account (%)", color="tab:blue")
    ax.set_ylim(bottom=0)
    wait = ax.twinx()
    wait.plot(seconds, [s.p95_wait_peak_ms / 1000 for s in summaries], "s-", color="tab:red", label="p95 wait at peak")
    day = [s.p95_wait_ms / 1000 for s in summaries]
    wait.plot(seconds, day, "s--", color="tab:red", alpha=0.5, label="p95 wait, day")
    base = summaries[list(patience_ms).index(0)].p95_wait_peak_ms / 1000 if 0 in patience_ms else None
    if base is not None:
        wait.axhline(base * 1.1, color="tab:red", linewidth=1, linestyle=":", label="aim: p95 at peak +10 % at most")
    wait.set_ylabel("p95 wait (s)", color="tab:red")
    wait.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = wait.get_legend_handles_labels()
    fig.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower center", ncol=3)
    ax.set_title("Sticky patience: moves against waiting")
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
