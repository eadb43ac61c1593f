"""The one table `make bench` prints: every figure, its target (issues 14 and
11 §3) and whether it was met. Pure: it reads the report dict only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DISPATCH_VS_FLOOR = 0.6  # throughput, dispatch+complete at 65,536 bindings ÷ floor
BINDINGS_RATIO = 0.9  # 65,536 bindings ÷ none
POOL_RATIO = 0.8  # new sessions, 1,000 accounts ÷ 10 accounts (with latency bands too)
OPEN_P99_MS = {50: 15.0, 1000: 20.0}  # open loop at 100 dispatches/s, by pool size
WAKE_P50_MS = 50.0
PROBE_MS = 1000.0  # a completion and /healthz behind the waiters
LATE_STARTS = 0.01  # open loop: above this share of cycles started > 5 ms late the client set part of the pace

MET, NOT_MET, REFERENCE, MISSING = "met", "NOT met", "reference", "not measured"


@dataclass(frozen=True)
class Row:
    what: str
    value: str
    target: str
    verdict: str


def _verdict(ok: bool) -> str:
    return MET if ok else NOT_MET


def _ms(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _load(row: dict) -> str:
    errors = f" · {row['errors']} err" if row.get("errors") else ""
    runs = f" (runs: {' / '.join(f'{rps:.0f}' for rps in row['runs_rps'])})" if row.get("runs_rps") else ""
    return f"{row['rps']:.0f} rps{runs} · p50 {_ms(row['p50_ms'])} · p99 {_ms(row['p99_ms'])} ms{errors}"


def _cpu(split: dict) -> str:
    """Who spent a request's CPU: the server under load, PostgreSQL, the
    bench's clients, all of the machine (the rest included)."""
    return (
        f"server {split['server']:.2f} · PostgreSQL {split['postgres']:.2f} · clients {split['clients']:.2f}"
        f" · all {split['all']:.2f} ms"
    )


def _open(row: dict) -> str:
    errors = f" · {row['errors']} err" if row.get("errors") else ""
    served = f" ({_ms(row['service_p99_ms'])} from the actual start)" if row.get("service_p99_ms") is not None else ""
    return f"p50 {_ms(row['p50_ms'])} · p99 {_ms(row['p99_ms'])} ms{served}{errors}"


def _ratio(what: str, top: dict | None, bottom: dict | None, target: float) -> Row:
    if not _measured(top) or not _measured(bottom) or not bottom["rps"]:
        return Row(what, "—", f"≥ {target:.2f}", MISSING)
    ratio = top["rps"] / bottom["rps"]
    return Row(what, f"{ratio:.2f}", f"≥ {target:.2f}", _verdict(ratio >= target))


def _measured(section: dict | None) -> bool:
    return bool(section) and "error" not in section


def _missing(what: str, section: dict | None, target: str) -> Row:
    error = (section or {}).get("error", "phase not run")
    return Row(what, f"error: {error}"[:60], target, MISSING)


def rows(report: dict) -> list[Row]:
    out: list[Row] = []

    def load_row(what: str, section: dict | None, target: str = "", verdict: str = "") -> None:
        """A measured phase; its own target, if any, is the ratio row below it."""
        if _measured(section):
            out.append(Row(what, _load(section), target, verdict))
            if section.get("cpu_ms_per_request"):
                out.append(Row("  CPU per request", _cpu(section["cpu_ms_per_request"]), "", ""))
        else:
            out.append(_missing(what, section, target))

    floor, dispatch, empty = report.get("floor"), report.get("dispatch"), report.get("dispatch_no_bindings")
    load_row("floor, closed loop", floor, REFERENCE, REFERENCE)
    bindings = f"{dispatch['bindings']:,}" if _measured(dispatch) else "65,536"
    load_row(f"dispatch+complete, {bindings} bindings", dispatch)
    out.append(_ratio("  ÷ floor (throughput)", dispatch, floor, DISPATCH_VS_FLOOR))
    load_row("dispatch+complete, 0 bindings", empty)
    out.append(_ratio(f"  {bindings} ÷ 0 bindings", dispatch, empty, BINDINGS_RATIO))

    sizes = report.get("pool_size") or {}
    small, large, banded = sizes.get("small"), sizes.get("large"), sizes.get("banded")
    for section, bands in ((small, ""), (large, ""), (banded, ", latency bands")):
        label = f"new sessions, {section['accounts']:,} accounts{bands}" if _measured(section) else "new sessions"
        load_row(label, section)
    out.append(_ratio("  large ÷ small pool", large, small, POOL_RATIO))
    out.append(_ratio("  large with latency bands ÷ small pool", banded, small, POOL_RATIO))

    open_loop = report.get("open_loop") or {}
    late = []
    for accounts, limit in OPEN_P99_MS.items():
        section = open_loop.get(f"accounts_{accounts}")
        what = f"open loop {open_loop.get('rate_per_s', 100):.0f}/s, {accounts:,} accounts: dispatch"
        target = f"p99 ≤ {limit:.0f} ms"
        if _measured(section):
            out.append(Row(what, _open(section), target, _verdict(section["p99_ms"] <= limit)))
            late.append(section)
        else:
            out.append(_missing(what, section, target))
    floor_open = open_loop.get("floor")
    if _measured(floor_open):
        out.append(Row(f"open loop {floor_open['rate_per_s']:.0f}/s, floor", _open(floor_open), REFERENCE, REFERENCE))
        late.append(floor_open)
    else:
        out.append(_missing("open loop, floor", floor_open, REFERENCE))
    out.extend(_crowding_rows(late))
    out.extend(_thirds_rows(late))
    out.extend(_server_timing_rows(late))
    out.extend(_cluster_rows(late))
    if late:
        shares = " / ".join(f"{s['late_starts'] / max(1, s['arrivals']):.1%}" for s in late)
        lags = " / ".join(_ms(s.get("start_lag_p99_ms")) for s in late)
        value = f"{shares} · start lag p99 {lags} ms"
        kept_up = all(s["late_starts"] <= LATE_STARTS * max(1, s["arrivals"]) for s in late)
        out.append(Row("  client started late (> 5 ms)", value, f"≤ {LATE_STARTS:.0%} each", _verdict(kept_up)))

    wake = report.get("wake_after_release_ms")
    if _measured(wake):
        value = f"p50 {_ms(wake['p50'])} · max {_ms(wake['max'])} ms"
        out.append(
            Row("wake after release", value, f"p50 ≤ {WAKE_P50_MS:.0f} ms", _verdict(wake["p50"] <= WAKE_P50_MS))
        )
    else:
        out.append(_missing("wake after release", wake, f"p50 ≤ {WAKE_P50_MS:.0f} ms"))

    out.extend(_history_rows(report.get("history")))
    out.extend(_waiting_rows(report.get("bounded_waiting")))
    out.extend(_upkeep_rows(report))
    return out


def _history_rows(history: dict | None) -> list[Row]:
    """New sessions on a pool without history, then with a day's completed
    leases not yet vacuumed: the reads' probe for unreaped leases from 1970,
    then from the reap mark. No target: flat would be 1.00."""
    what = "new sessions, 50 accounts, no history"
    if not _measured(history):
        return [_missing(what, history, REFERENCE)]
    clean, leases = history["clean"], history["completed_leases"]
    out = [Row(what, _load(clean), REFERENCE, REFERENCE)]
    for key, probe in (("from_oldest", "from 1970"), ("from_mark", "from the reap mark")):
        section = history[key]
        out.append(Row(f"  {leases:,} completed leases, probe {probe}", _load(section), REFERENCE, REFERENCE))
        ratio = f"{section['rps'] / clean['rps']:.2f}" if clean["rps"] else "—"
        out.append(Row("    ÷ no history", ratio, "flat: 1.00", REFERENCE))
    return out


def _upkeep_rows(report: dict) -> list[Row]:
    """The periodic tasks a lease start can wait for (``bench/load/upkeep.py``):
    what each costs the machine once a minute, and the longest a lease start
    waited for it. No target."""
    refresh, purge = report.get("snapshot_refresh"), report.get("binding_purge")
    return [
        _upkeep_row(f"latency refresh, {(refresh or {}).get('samples', 360_000):,} samples", refresh),
        _upkeep_row(f"binding purge, {(purge or {}).get('expired', 6_000):,} expired bindings", purge),
    ]


def _upkeep_row(what: str, section: dict | None) -> Row:
    if not _measured(section):
        return _missing(what, section, REFERENCE)
    value = (
        f"{_ms(section['wall_ms'])} ms · its CPU {_ms(section['cpu_ms'])} · PostgreSQL's"
        f" {_ms(section['postgres_cpu_ms'])} ms · a lease start waits ≤ {_ms(section['lease_start_max_ms'])} ms"
    )
    if section.get("bands_written") is not None:
        value += " · bands written " + " / ".join(f"{n:,}" for n in section["bands_written"])
    return Row(what, value, REFERENCE, REFERENCE)


def _crowding_rows(phases: list[dict]) -> list[Row]:
    """What the slowest 1 % of each open loop arrived in (``crowding`` of
    ``bench.load.clients.open_loop``), in the order of the open-loop rows:
    no target, it tells a burst the server could not keep up with from a
    stall (``bench.load.stats.crowding``). Then the p99 of the arrivals
    that came after at most the average count, and of those after more."""
    crowds = [phase.get("crowding") or {} for phase in phases]
    if not crowds or any(crowd.get("slowest") is None for crowd in crowds):
        return []
    slowest = " / ".join(f"{crowd['slowest']:.1f}" for crowd in crowds)
    everyone = " / ".join(f"{crowd['all']:.1f}" for crowd in crowds)
    what = f"  arrivals in the {crowds[0]['window_ms']:.0f} ms up to each of the slowest 1%"
    out = [Row(what, f"{slowest} (up to any arrival: {everyone})", "", "")]
    # An older bench.json has no split; a loop without an arrival after a burst shows "—".
    if all("crowded_share" in crowd for crowd in crowds):
        calm = " / ".join(_ms(crowd["calm_p99_ms"]) for crowd in crowds)
        crowded = " / ".join(_ms(crowd["crowded_p99_ms"]) for crowd in crowds)
        shares = " / ".join(f"{crowd['crowded_share']:.0%}" for crowd in crowds)
        value = f"calm {calm} · after a burst {crowded} ms ({shares} of arrivals)"
        out.append(Row("  p99, calm (at most that average) / after a burst", value, "", ""))
    return out


def _thirds_rows(phases: list[dict]) -> list[Row]:
    """Each open loop's p99 in the first, middle and last third of its
    window (``bench.load.stats.p99_by_part``), in the order of the open-loop
    rows: no target, it tells a tail that builds up over the phase from one
    spread through it. None for an older bench.json."""
    if not phases or not all(phase.get("p99_by_third_ms") for phase in phases):
        return []
    thirds = " / ".join(" → ".join(_ms(p99) for p99 in phase["p99_by_third_ms"]) for phase in phases)
    return [Row("  p99 in the window's first → middle → last third", f"{thirds} ms", "", "")]


def _server_timing_rows(phases: list[dict]) -> list[Row]:
    """Where the slowest 1 % of each kiropool open loop spent its time, by
    kiropool's ``Server-Timing`` (``bench.load.stats.slowest_split``), then
    the same for all of its dispatches: only when kiropool sent the header
    (``KIROPOOL_SERVER_TIMING=1 make bench``). The floor sends none."""
    splits = [phase["server_timing"] for phase in phases if phase.get("server_timing")]
    if not splits:
        return []

    def split(found: dict) -> str:
        parts = f"statements {_ms(found['db'])} + CPU {_ms(found['cpu'])} + waits {_ms(found['wait'])}"
        return f"{_ms(found['service'])} = outside the app {_ms(found['outside'])} + {parts}"

    slowest = " / ".join(split(found["slowest"]) for found in splits)
    everyone = " / ".join(split(found["all"]) for found in splits)
    return [
        Row("  slowest 1%, medians (Server-Timing)", f"{slowest} ms", "", ""),
        Row("  every dispatch, medians (Server-Timing)", f"{everyone} ms", "", ""),
    ]


def _cluster_rows(phases: list[dict]) -> list[Row]:
    """How each open loop's slowest 1 % group by when they were answered
    (``bench.load.stats.slowest_clusters``), in the order of the open-loop
    rows, and the largest group: how far apart it started and was
    answered, and its statements and waits (kiropool, with the
    ``Server-Timing`` header). None for an older bench.json."""
    found = [phase.get("clusters") for phase in phases]
    if not found or any(clusters is None for clusters in found):
        return []

    def cluster(c: dict) -> str:
        text = (
            f"{c['count']} in {c['clusters']}, the largest {c['largest']}: started over "
            f"{_ms(c['largest_started_over_ms'])}, answered within {_ms(c['largest_answered_within_ms'])}"
        )
        if c["largest_db_ms"] is not None:
            text += f", statements {_ms(c['largest_db_ms'])} + waits {_ms(c['largest_wait_ms'])}"
        return text

    what = f"  slowest 1%, answered within {found[0]['gap_ms']:.0f} ms of the one before"
    return [Row(what, " / ".join(cluster(c) for c in found) + " ms", "", "")]


def _waiting_rows(waiting: dict | None) -> list[Row]:
    what = f"{(waiting or {}).get('waiters', 96)} waiters on one slot"
    probe_target = f"≤ {PROBE_MS:.0f} ms"
    if not _measured(waiting):
        return [_missing(what, waiting, probe_target)]
    out = []
    for probe, label in (("completion", "a completion"), ("healthz", "/healthz")):
        ms, status = waiting[f"{probe}_ms"], waiting[f"{probe}_status"]
        value = f"{ms:.0f} ms" + (f" (status {status})" if status != 200 else "")
        if not status:
            value = f"no answer in {ms:.0f} ms"
        out.append(Row(f"{what}: {label} answers in", value, probe_target, _verdict(status == 200 and ms <= PROBE_MS)))
    unanswered = sum(n for status, n in waiting["other"].items() if status in ("0", "None"))
    other = sum(waiting["other"].values()) - unanswered
    served = (
        f"200: {waiting['granted']} · 429 at once: {waiting['refused_at_once']}"
        f" · 429 later: {waiting['refused_later']} · no answer: {unanswered}"
    ) + (f" · other: {other}" if other else "")
    out.append(Row(f"{what}: answers", served, "200 or 429, each", _verdict(other + unanswered == 0)))
    tau = waiting["kendall_tau"]
    if tau is None:
        out.append(Row(f"{what}: 200s in arrival order", "fewer than 2 granted", "tau 1.00", MISSING))
    else:
        value = f"tau {tau:.2f} · {waiting['inversion_fraction']:.1%} pairs inverted"
        out.append(Row(f"{what}: 200s in arrival order", value, "tau 1.00", _verdict(tau >= 1.0)))
    return out


def table(report: dict) -> str:
    lines = rows(report)
    widths = [max(len(getattr(r, f)) for r in lines) for f in ("what", "value", "target")]
    header = Row("what", "value", "target", "verdict")
    rule = "-" * (sum(widths) + 6 + len(NOT_MET))
    out = []
    for i, row in enumerate([header, *lines]):
        out.append(
            f"{row.what:<{widths[0]}}  {row.value:<{widths[1]}}  {row.target:<{widths[2]}}  {row.verdict}".rstrip()
        )
        if i == 0:
            out.append(rule)
    return "\n".join(out)


def checks(report: dict) -> list[dict]:
    """The table as data, for bench.json."""
    return [asdict(row) for row in rows(report)]
