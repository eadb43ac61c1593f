"""The decision's state: session affinities, leases, latency samples and
snapshots, and the cooldown/quota history. Everything the selector reads lives
here (or on the pool rows), shared by every process and host through the
database."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q


class SessionBinding(models.Model):
    """Affinity: (API key, session id) → account, until ``expires_at``.

    Rows past ``expires_at`` are ignored by every read and deleted by the purge
    task. Inserts, deletes and re-pointings keep ``Account.binding_rows`` exact
    through database triggers (see the migration), so even a cascade or a bulk
    delete cannot make the per-account count drift."""

    # No index of their own on either key: ``binding_unique_key_session`` and
    # ``binding_account_expiry_idx`` lead with them (test_indexes.py). A
    # redundant one cost every write, and PostgreSQL, with statistics from
    # before a key's sessions arrived, chose the key's one-column index for
    # the (key, session id) lookup and scanned every binding of the key.
    api_key = models.ForeignKey("accounts.ApiKey", on_delete=models.CASCADE, related_name="bindings", db_index=False)
    session_id = models.CharField(max_length=512)
    account = models.ForeignKey("accounts.Account", on_delete=models.CASCADE, related_name="bindings", db_index=False)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["api_key", "session_id"], name="binding_unique_key_session"),
            models.CheckConstraint(
                condition=Q(expires_at__gt=models.F("updated_at")), name="binding_expires_after_update"
            ),
        ]
        indexes = [
            # live count per account = binding_rows - rows already expired
            models.Index(fields=["account", "expires_at"], name="binding_account_expiry_idx"),
            models.Index(fields=["expires_at"], name="binding_expiry_idx"),
            models.Index(fields=["updated_at"], name="binding_lru_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.session_id} → {self.account_id}"


class LeaseOutcome(models.TextChoices):
    SUCCESS = "success", "success"
    RATE_LIMITED = "rate_limited", "rate limited"
    QUOTA_EXHAUSTED = "quota_exhausted", "quota exhausted"
    RETRY_NEXT = "retry_next", "retry next"
    FATAL = "fatal", "fatal"
    EXPIRED = "expired", "expired (never completed)"


class StickyOutcome(models.TextChoices):
    HIT = "hit", "served by its bound account"
    WAITED = "waited", "waited for its bound account"
    MOVED = "moved", "moved to another account"


class Lease(models.Model):
    """One in-flight upstream request on an account. It counts against its
    identity's (and key's) concurrency until completed or past ``expires_at``."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed with the lease's id (``lease_key_idx``): a completion looks its
    # lease up by both, and a one-column index on the key let PostgreSQL,
    # with statistics from before the key's leases, scan every lease the key
    # ever had instead of the primary key.
    api_key = models.ForeignKey(
        "accounts.ApiKey", on_delete=models.SET_NULL, null=True, related_name="leases", db_index=False
    )
    # An account may be deleted while its lease is out; the identity carries
    # the in-flight count, so it stays. Indexed by ``lease_account_recent_idx``.
    account = models.ForeignKey(
        "accounts.Account", on_delete=models.SET_NULL, null=True, related_name="leases", db_index=False
    )
    account_name = models.CharField(max_length=200)
    identity = models.ForeignKey("accounts.RoutingIdentity", on_delete=models.CASCADE, related_name="leases")
    proxy_url = models.CharField(max_length=500, blank=True)
    session_id = models.CharField(max_length=512, blank=True)
    model = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=20, choices=LeaseOutcome.choices, blank=True)
    first_token_ms = models.FloatField(null=True, blank=True)
    waited_ms = models.PositiveIntegerField(default=0)
    # For a session that was bound when the dispatch came: whether its bound
    # account served it at once (hit), after waiting (waited), or it moved,
    # and from which account (the dashboards count moves and waits).
    sticky = models.CharField(max_length=10, choices=StickyOutcome.choices, blank=True, default="", db_default="")
    moved_from = models.CharField(max_length=200, blank=True, default="", db_default="")
    # The key's slot this lease holds (``accounts.KeySlot``; none when its
    # key counts no leases). Looked up only from the lease, so neither
    # indexed nor constrained: a key deleted with its slots leaves the id.
    key_slot = models.ForeignKey(
        "accounts.KeySlot",
        on_delete=models.DO_NOTHING,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    # The one lease a quota-exhausted account lets through to see whether its
    # quota came back (half-open); its outcome decides.
    quota_probe = models.BooleanField(default=False, db_default=False)
    error_message = models.CharField(max_length=2000, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(outcome="") | Q(outcome__in=LeaseOutcome.values), name="lease_outcome_known"
            ),
            models.CheckConstraint(
                condition=Q(completed_at__isnull=True, outcome="") | Q(completed_at__isnull=False) & ~Q(outcome=""),
                name="lease_completed_has_outcome",
            ),
        ]
        # The open leases by identity and by key. "IS NOT NULL" keeps the
        # probe for unreaped leases (which names no identity or key) off
        # them: an analyze of a large lease table sees no open lease, and
        # then every index of open leases looks empty and as cheap as the
        # next; a plan that read one of these two whole walked every
        # completed lease not yet vacuumed, from the reap mark or not. The
        # queries that use them name the identity or key, which implies it.
        indexes = [
            models.Index(
                fields=["identity", "expires_at"],
                condition=Q(completed_at__isnull=True, identity__isnull=False),
                name="lease_live_identity_idx",
            ),
            models.Index(
                fields=["api_key", "expires_at"],
                condition=Q(completed_at__isnull=True, api_key__isnull=False),
                name="lease_live_key_idx",
            ),
            # "which identities hold a live-looking lease past its TTL": a
            # range over the few such rows, whatever the pool's size.
            models.Index(fields=["expires_at"], condition=Q(completed_at__isnull=True), name="lease_live_expiry_idx"),
            models.Index(fields=["api_key", "id"], name="lease_key_idx"),
            models.Index(fields=["account", "-started_at"], name="lease_account_recent_idx"),
            models.Index(fields=["started_at"], name="lease_started_idx"),
        ]

    def __str__(self) -> str:
        return str(self.id)


# A lease is open while it has no outcome: ``lease_completed_has_outcome``
# makes that the same as ``completed_at IS NULL``. The statements that close
# leases by id ask it this way, because ``completed_at IS NULL`` matches the
# live-lease partial indexes: with statistics taken while few leases were out,
# PostgreSQL scanned one of those and filtered every open lease by id instead
# of using the primary key (0.4 ms with 2,000 leases out, growing with them).
LEASE_OPEN = Q(outcome="")


class LatencySample(models.Model):
    """First-token latency of one successful request."""

    account = models.ForeignKey("accounts.Account", on_delete=models.CASCADE, related_name="latency_samples")
    proxy_url = models.CharField(max_length=500, blank=True)
    first_token_ms = models.FloatField()
    recorded_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(first_token_ms__gte=0), name="sample_latency_gte_0")]

    def __str__(self) -> str:
        return f"{self.first_token_ms:.0f} ms at {self.recorded_at:%Y-%m-%d %H:%M:%S}"


class LatencySnapshotQuerySet(models.QuerySet):
    def newest_first(self) -> LatencySnapshotQuerySet:
        """Newest first, by ``Meta.get_latest_by`` (so ``.latest()`` agrees).
        Two refreshes may stamp the same time: the later row (the higher id)
        is the newer, so every reader agrees which snapshot is current."""
        return self.order_by(*(f"-{name}" for name in self.model._meta.get_latest_by))


class LatencySnapshot(models.Model):
    """The last hour of samples, aggregated: the global average here, the
    per-account and per-proxy figures in :class:`AccountLatency` and
    :class:`ProxyLatency` rows, so the dispatcher's query can join them."""

    generated_at = models.DateTimeField(db_index=True)
    window_seconds = models.PositiveIntegerField()
    global_avg_ms = models.FloatField(null=True, blank=True)
    sample_count = models.PositiveIntegerField(default=0)
    # When the refresh had checked every order row's band under this
    # snapshot (pool_order.pool_order_bands_write); until then no dispatch
    # under it walks the band index.
    bands_whole_at = models.DateTimeField(null=True, blank=True)

    objects = LatencySnapshotQuerySet.as_manager()

    class Meta:
        get_latest_by = ["generated_at", "id"]

    def __str__(self) -> str:
        return f"snapshot of {self.generated_at:%Y-%m-%d %H:%M:%S}"


class AccountLatency(models.Model):
    """One account's samples in one snapshot."""

    # Indexed by ``account_latency_unique``, which leads with it.
    snapshot = models.ForeignKey(
        LatencySnapshot, on_delete=models.CASCADE, related_name="account_stats", db_index=False
    )
    account = models.ForeignKey("accounts.Account", on_delete=models.CASCADE, related_name="latency_stats")
    samples = models.PositiveIntegerField()
    avg_ms = models.FloatField()
    # selection.account_score_part with the snapshot's global average: the
    # dispatcher's query adds the proxy's part to get the latency score.
    score_part = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["snapshot", "account"], name="account_latency_unique"),
            models.CheckConstraint(condition=Q(samples__gt=0), name="account_latency_samples_gt_0"),
        ]

    def __str__(self) -> str:
        return f"{self.samples} samples, {self.avg_ms:.0f} ms"


class ProxyLatency(models.Model):
    """One proxy URL's samples in one snapshot. Keyed by the URL the samples
    were taken through (SPEC §1), which may no longer belong to a proxy row:
    ``proxy`` joins on the URL and has no database constraint."""

    # Indexed by ``proxy_latency_unique``, which leads with it.
    snapshot = models.ForeignKey(LatencySnapshot, on_delete=models.CASCADE, related_name="proxy_stats", db_index=False)
    proxy = models.ForeignKey(
        "accounts.Proxy",
        to_field="url",
        db_column="proxy_url",
        db_constraint=False,
        on_delete=models.DO_NOTHING,
        related_name="latency_stats",
    )
    samples = models.PositiveIntegerField()
    avg_ms = models.FloatField()
    score_part = models.FloatField()  # selection.proxy_score_part with the snapshot's global average

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["snapshot", "proxy"], name="proxy_latency_unique"),
            models.CheckConstraint(condition=Q(samples__gt=0), name="proxy_latency_samples_gt_0"),
        ]

    def __str__(self) -> str:
        return f"{self.samples} samples, {self.avg_ms:.0f} ms"


class CooldownKind(models.TextChoices):
    IDENTITY_COOLDOWN = "identity_cooldown", "identity cooldown"
    PROXY_COOLDOWN = "proxy_cooldown", "proxy cooldown"
    IDENTITY_CLEARED = "identity_cleared", "identity cooldown cleared"
    PROXY_CLEARED = "proxy_cleared", "proxy cooldown cleared"
    QUOTA_EXHAUSTED = "quota_exhausted", "quota exhausted"
    QUOTA_RESET = "quota_reset", "quota reset"
    QUOTA_PROBE = "quota_probe", "quota probe"
    EJECTED = "ejected", "ejected (repeated failures)"


class CooldownEvent(models.Model):
    """History of cooldowns and quota changes, for the dashboards. The live
    state is on the identity, proxy and account rows."""

    kind = models.CharField(max_length=30, choices=CooldownKind.choices)
    identity = models.ForeignKey("accounts.RoutingIdentity", on_delete=models.CASCADE, null=True, blank=True)
    proxy = models.ForeignKey("accounts.Proxy", on_delete=models.CASCADE, null=True, blank=True)
    account = models.ForeignKey("accounts.Account", on_delete=models.CASCADE, null=True, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=CooldownKind.values), name="cooldown_event_kind_known")
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class LeaseReapMark(models.Model):
    """How far the periodic reaper has closed expired leases: one row, the
    ``now`` of its last run that went through every expired lease.

    A completed lease leaves its old row version in the indexes of live
    leases until PostgreSQL vacuums the table, which on a table keeping
    weeks of history can be a day or more apart. The reads' probe for
    leases past their TTL and not yet reaped walks those entries from the
    oldest expiry on: a dispatch's cost grew with the leases completed
    since the last vacuum. Below this mark (less a margin) no lease is
    still open, so the probe starts there (``routing/selectors/reaped.py``)."""

    reaped_through = models.DateTimeField()

    def __str__(self) -> str:
        return f"leases reaped through {self.reaped_through:%Y-%m-%d %H:%M:%S}"


class WaitTicket(models.Model):
    """A dispatch waiting for a slot, in any process: its id is its place in
    the key's queue across processes and hosts (``routing/waiting.py``).
    Taken when the dispatch starts waiting, deleted when it stops; a ticket
    a dead process left behind stops counting at ``expires_at`` (past the
    longest wait a dispatch may ask for) and the reaper deletes it. On
    PostgreSQL the table is unlogged (migration 0014): a ticket is not worth
    a WAL flush, and a crash empties the table, as it ends every wait."""

    key_id = models.BigIntegerField()
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["key_id", "id"], name="wait_ticket_key_idx")]

    def __str__(self) -> str:
        return f"wait ticket {self.pk} of key {self.key_id}"


# The hot counters the reconcile task recomputes (routing/maintenance.py),
# each exported on /metrics from the first scrape.
COUNTER_NAMES = ("identity_in_flight", "key_in_flight", "account_binding_rows", "identity_account_rows")


class CounterDrift(models.Model):
    """How far the reconcile task found each hot counter off from the rows it
    counts, summed over every run (exported on /metrics). A counter only
    drifts if something wrote it outside its owners: this is the alarm."""

    counter = models.CharField(max_length=50, unique=True)
    corrections = models.PositiveIntegerField(default=0)  # rows set right
    total = models.PositiveBigIntegerField(default=0)  # sum of |counter - counted|
    last_seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.counter}: {self.total}"


class PoolOrder(models.Model):
    """The columns of the dispatch order of one account in one scope, kept by
    database triggers (migration 0008) and never written by the application.

    A scope is an account group (``scope_id`` its id) or every account
    (``scope_id`` 0): one row per account and scope. Its two indexes hold a
    scope's *plain* accounts (balanced, alone on their identity) in the order
    SPEC §2 gives them, sessions first or not, so a dispatch on a large pool
    reads the head of that order from an index instead of sorting the pool
    (``routing/selectors/walk.py``). The copies change in the transaction
    that changes their source (an account, its identity, a membership, a
    binding through the binding counter), so a read never sees them apart.
    Two more indexes hold them by latency band as well, for the rows whose
    band the refresh wrote (migration 0009)."""

    ALL_ACCOUNTS = 0  # the scope of keys that route over every account

    scope_id = models.BigIntegerField()
    account = models.ForeignKey(
        "accounts.Account", on_delete=models.DO_NOTHING, db_constraint=False, related_name="order_rows"
    )
    enabled = models.BooleanField()
    plain = models.BooleanField()  # balanced, and its identity has no other account
    binding_rows = models.PositiveIntegerField()  # the account's binding counter
    last_started_at = models.DateTimeField(null=True)  # the identity's
    credits_sort = models.FloatField()  # balanced credits descending: -(balance, or -1 unknown)
    name = models.CharField(max_length=200)  # the account's; byte order (collation "C") on PostgreSQL
    # The account's latency band, written by the snapshot refresh under the
    # snapshot ``band_snapshot_id`` (pool_order.pool_order_bands_write),
    # and only when it changed: it holds under each later snapshot whose
    # bands are whole. Cleared by a trigger when the account's proxy, or its
    # URL, changes.
    band = models.IntegerField(null=True)
    band_snapshot_id = models.BigIntegerField(null=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope_id", "account"], name="pool_order_unique_scope_account")]

    def __str__(self) -> str:
        return f"{self.name} in scope {self.scope_id}"
