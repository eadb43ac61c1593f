"""The dispatcher's settings: the pool's rules, what one key may take,
dispatches that wait, and how dispatches run.

Read from the environment like the rest; ``kiropool/settings.py`` imports
them after it has read ``.env`` and the local secrets. Numbers are kept to
ranges that work, whatever the environment asks for.
"""

import environ

_env = environ.Env()


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


# --- the pool -----------------------------------------------------------------

# SPEC §3: the affinity TTL is clamped to [60 s, 24 h] and the capacity to
# [1, 1 000 000] live bindings, whatever the environment asks for.
KIROPOOL_AFFINITY_TTL_SECONDS = _clamp(_env.int("KIROPOOL_AFFINITY_TTL_SECONDS", default=6 * 3600), 60, 24 * 3600)
KIROPOOL_AFFINITY_MAX_ENTRIES = _clamp(_env.int("KIROPOOL_AFFINITY_MAX_ENTRIES", default=4096), 1, 1_000_000)
# Completed leases and cooldown events are history (dashboards, export_trace);
# the hourly prune keeps this many days of it.
KIROPOOL_HISTORY_RETENTION_DAYS = _clamp(_env.int("KIROPOOL_HISTORY_RETENTION_DAYS", default=7), 1, 365)

# --- the pool looks after itself (README, "Decisions") --------------------------

# Outlier ejection: an identity whose last N completions all failed
# (retry_next / fatal) is out of selection for the base time, doubled with
# each ejection in a row, up to the cap; back, its limit ramps up from 1
# over the slow-start window.
KIROPOOL_EJECTION_FAILURES = max(1, _env.int("KIROPOOL_EJECTION_FAILURES", default=5))
KIROPOOL_EJECTION_BASE_SECONDS = _clamp(_env.int("KIROPOOL_EJECTION_BASE_SECONDS", default=30), 1, 24 * 3600)
KIROPOOL_EJECTION_MAX_SECONDS = _clamp(
    _env.int("KIROPOOL_EJECTION_MAX_SECONDS", default=15 * 60), KIROPOOL_EJECTION_BASE_SECONDS, 24 * 3600
)
KIROPOOL_SLOW_START_SECONDS = float(_clamp(_env.int("KIROPOOL_SLOW_START_SECONDS", default=60), 0, 3600))
# From this many accounts a key's dispatch reads the head of its order from
# an index (routing/selectors/walk.py) instead of ordering every account.
# Measured on the bench database: 0.7 against 0.5 ms at 10 accounts, 0.8
# against 2.4 ms at 50, 0.6-0.8 against 6-8 ms at 1,000.
KIROPOOL_WALK_MIN_ACCOUNTS = _clamp(_env.int("KIROPOOL_WALK_MIN_ACCOUNTS", default=32), 0, 1_000_000)
# An exhausted account (or one at its minimum balance) with no known reset
# time lets one probe lease through this often (half-open).
KIROPOOL_QUOTA_PROBE_SECONDS = _clamp(_env.int("KIROPOOL_QUOTA_PROBE_SECONDS", default=3600), 60, 31 * 24 * 3600)

# --- one key cannot hurt the others (README, "Security") ----------------------

# Leases a key may hold at once unless it has its own max_concurrency, so one
# gateway cannot take every slot of the pool (0: no default limit).
KIROPOOL_KEY_MAX_CONCURRENCY = max(0, _env.int("KIROPOOL_KEY_MAX_CONCURRENCY", default=64))
# How long a process may answer a gateway request from its copy of the key
# row (accounts/authentication.py). On PostgreSQL a change of the key reaches
# every process as it commits, and this is only a safety net. On SQLite the
# default is 0 (kiropool/settings.py): no process hears another's changes
# there, so each request reads its key.
KIROPOOL_KEY_CACHE_SECONDS = max(0.0, _env.float("KIROPOOL_KEY_CACHE_SECONDS", default=1.0))
# Reports that take capacity away from everyone (rate_limited cooling an
# identity, proxy_failure cooling a proxy, quota_exhausted) per key, as
# "<count>/<s|min|h|d>"; beyond it the lease is released but the report's
# effect is not applied. Empty: no limit.
KIROPOOL_CAPACITY_REPORT_RATE = _env.str("KIROPOOL_CAPACITY_REPORT_RATE", default="20/min")
# Each key's share of the binding capacity (KIROPOOL_AFFINITY_MAX_ENTRIES):
# over capacity, the purge evicts first from keys holding more than their
# share, so one key opening sessions cannot evict everyone else's.
KIROPOOL_AFFINITY_KEY_SHARE = min(1.0, max(0.01, _env.float("KIROPOOL_AFFINITY_KEY_SHARE", default=0.5)))
# A reported first-token time is recorded as at most this, so one gateway's
# absurd reports move the global average (and every band) only so far.
KIROPOOL_MAX_FIRST_TOKEN_MS = float(_clamp(_env.int("KIROPOOL_MAX_FIRST_TOKEN_MS", default=60_000), 1000, 3_600_000))

# --- dispatches that wait -----------------------------------------------------

# Sticky patience: how long a returning turn waits for its busy bound account
# before it moves (a key's own sticky_patience_ms overrides it; capped by the
# request's max_wait_ms). Every second of it turns about five points of moves
# at peak into waiting; 500 ms is the longest tried that keeps the p95 wait at
# peak within +10 % (+8 %; 1 s costs +16 %; `make simulate`, README "Fairness
# simulator").
KIROPOOL_STICKY_PATIENCE_MS = _clamp(_env.int("KIROPOOL_STICKY_PATIENCE_MS", default=500), 0, 300_000)

# Bounded waiting (routing/waiting.py): a dispatch waiting for a slot holds
# one of a web worker's threads (KIROPOOL_THREADS per worker, read by
# kiropool/serve.py too). At most this many wait per process, and per API key;
# beyond, 429 at once. The threads left over serve completions, probes and
# everything else.
KIROPOOL_THREADS = max(1, _env.int("KIROPOOL_THREADS", default=32))
KIROPOOL_WAIT_RESERVE_THREADS = max(1, _env.int("KIROPOOL_WAIT_RESERVE_THREADS", default=8))
KIROPOOL_MAX_WAITERS = max(
    1, _env.int("KIROPOOL_MAX_WAITERS", default=KIROPOOL_THREADS - KIROPOOL_WAIT_RESERVE_THREADS)
)
KIROPOOL_MAX_WAITERS_PER_KEY = max(
    1, _env.int("KIROPOOL_MAX_WAITERS_PER_KEY", default=max(1, KIROPOOL_MAX_WAITERS * 2 // 3))
)
# On PostgreSQL, after a release, a process's oldest waiter of a key gives an
# older waiter of the key in another process this long to take the slot first
# (waiters' order across processes); 0 turns the head start off.
KIROPOOL_WAIT_ORDER_GRACE_MS = _clamp(_env.int("KIROPOOL_WAIT_ORDER_GRACE_MS", default=25), 0, 1000)

# --- how dispatches run -------------------------------------------------------

# The one-statement PostgreSQL speedups of routing/pg.py. Off, the ORM
# services (their specification) do all the work: slower, same behaviour.
KIROPOOL_FAST_STATEMENTS = _env.bool("KIROPOOL_FAST_STATEMENTS", default=True)
KIROPOOL_LEASE_TTL_SECONDS = _clamp(_env.int("KIROPOOL_LEASE_TTL_SECONDS", default=900), 1, 24 * 3600)
