"""The pool: routing identities, the accounts that alias them, proxies,
account groups and the API keys gateways authenticate with."""

from __future__ import annotations

import hashlib
import secrets

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from accounts.fields import EncryptedJSONField
from accounts.proxy_urls import PASSWORD_MASK, proxy_url_has_mask


class Pool(models.TextChoices):
    BALANCED = "balanced", "balanced"
    CREDIT_FIRST = "credit_first", "credit first"


class RouteStrategy(models.TextChoices):
    AUTO = "auto", "auto (group or whole pool)"
    FIXED = "fixed", "fixed account"


# The longest pacing interval (ms, about 24.8 days): what a PostgreSQL integer
# column holds, on every database. SQLite's hold 64 bits, and an interval of
# 10**16 ms was taken there, then every dispatch after the next start
# overflowed a datetime adding it (a 500).
MAX_INTERVAL_MS = 2_147_483_647


def _pool_check(field: str, name: str) -> models.CheckConstraint:
    return models.CheckConstraint(condition=Q(**{f"{field}__in": Pool.values}), name=name)


class RoutingIdentity(models.Model):
    """One upstream Kiro user. Throttling, cooldowns, last-started and load are
    tracked here, so every alias of the user shares them."""

    name = models.CharField(max_length=200, unique=True)
    max_concurrency = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    min_start_interval_ms = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(MAX_INTERVAL_MS)])
    cooldown_until = models.DateTimeField(null=True, blank=True)
    cooldown_reason = models.CharField(max_length=500, blank=True)
    last_started_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Live (uncompleted) leases. Maintained by the lease services in the same
    # transaction as the lease row, so a slot is claimed with one conditional
    # UPDATE; leases past their TTL are reclaimed before the limit is enforced.
    in_flight = models.PositiveIntegerField(default=0, editable=False)
    # Outlier ejection (routing/completions.py): completions failed in a row, the
    # ejections in a row, and until when the identity is out of selection
    # (then slow start: its limit ramps up from 1 over KIROPOOL_SLOW_START_SECONDS).
    failure_streak = models.PositiveIntegerField(default=0, db_default=0, editable=False)
    ejections = models.PositiveIntegerField(default=0, db_default=0, editable=False)
    ejected_until = models.DateTimeField(null=True, blank=True, editable=False)
    # Sticky patience: slots held for returning turns waiting on the identity,
    # which new sessions may not take. The hold lapses at sticky_wait_until,
    # so a waiter that died cannot keep a slot.
    sticky_waiters = models.PositiveIntegerField(default=0, db_default=0, editable=False)
    sticky_wait_until = models.DateTimeField(null=True, blank=True, editable=False)
    # Accounts on this identity (its aliases). Kept by database triggers on
    # every insert, delete and move of an account (accounts/migrations/0006),
    # so the dispatch read knows which identities have aliases without
    # counting the account table on every call.
    account_rows = models.PositiveIntegerField(default=0, db_default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "routing identities"
        constraints = [
            models.CheckConstraint(condition=Q(max_concurrency__gte=1), name="identity_max_concurrency_gte_1"),
            models.CheckConstraint(condition=Q(min_start_interval_ms__gte=0), name="identity_interval_gte_0"),
            models.CheckConstraint(condition=Q(in_flight__gte=0), name="identity_in_flight_gte_0"),
        ]

    def __str__(self) -> str:
        return self.name

    def cooling_down(self, now=None) -> bool:
        return self.cooldown_until is not None and self.cooldown_until > (now or timezone.now())


class Proxy(models.Model):
    """An egress proxy that account traffic goes through."""

    name = models.CharField(max_length=200, unique=True)
    url = models.CharField(max_length=500, unique=True)
    cooldown_until = models.DateTimeField(null=True, blank=True)
    cooldown_reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "proxies"

    def __str__(self) -> str:
        return self.name

    def clean(self):
        # A masked URL that reached the model is not the stored one as read
        # (accounts/proxy_urls.py): its password was never typed.
        if proxy_url_has_mask(self.url):
            raise ValidationError(
                {
                    "url": f"The password is masked ({PASSWORD_MASK}): type the whole URL, password included. "
                    f"A masked password keeps the stored one only while the rest of the URL is unchanged."
                }
            )

    def cooling_down(self, now=None) -> bool:
        return self.cooldown_until is not None and self.cooldown_until > (now or timezone.now())


class Account(models.Model):
    """A credential for a routing identity; several accounts may alias one."""

    name = models.CharField(max_length=200, unique=True)
    identity = models.ForeignKey(RoutingIdentity, on_delete=models.PROTECT, related_name="accounts")
    proxy = models.ForeignKey(Proxy, on_delete=models.SET_NULL, null=True, blank=True, related_name="accounts")
    pool = models.CharField(max_length=20, choices=Pool.choices, default=Pool.BALANCED)
    enabled = models.BooleanField(default=True)
    remaining_credits = models.FloatField(null=True, blank=True)
    # Not handed out while a known balance is at or below this (SPEC §2).
    min_remaining_credits = models.FloatField(
        default=0.0, db_default=0.0, help_text="Not selected while its reported balance is at or below this."
    )
    quota_exhausted = models.BooleanField(default=False)
    quota_exhausted_at = models.DateTimeField(null=True, blank=True)
    quota_exhausted_reason = models.CharField(max_length=500, blank=True)
    # When the upstream quota resets (set by an operator or reported by a
    # completion): every alias comes back into selection then, and credit
    # pacing ranks credit_first accounts by it.
    quota_resets_at = models.DateTimeField(
        null=True, blank=True, help_text="When the upstream credits reset, if known."
    )
    # Without a reset time an exhausted account lets one probe lease through
    # at this time (half-open), then waits KIROPOOL_QUOTA_PROBE_SECONDS again.
    quota_next_probe_at = models.DateTimeField(null=True, blank=True, editable=False)
    region = models.CharField(max_length=50, blank=True)
    profile_arn = models.CharField(max_length=500, blank=True)
    # Upstream secrets, Fernet-encrypted at rest (accounts/fields.py). Write-only:
    # no admin page, list, dashboard, operator API read or log line shows them
    # back; only a dispatch for a key with ``credentials_access`` carries them.
    credentials = EncryptedJSONField()
    # Number of SessionBinding rows (live or expired-but-unpurged) that point
    # here. Kept exact by the binding services; the live count subtracts the
    # expired rows, a bounded read because the purge task deletes them.
    binding_rows = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            _pool_check("pool", "account_pool_known"),
            models.CheckConstraint(condition=Q(binding_rows__gte=0), name="account_binding_rows_gte_0"),
        ]
        indexes = [models.Index(fields=["enabled", "quota_exhausted"], name="account_selectable_idx")]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:  # never the credentials
        return f"<Account {self.name!r}>"


class AccountGroup(models.Model):
    """A named set of accounts an API key can be limited to."""

    name = models.CharField(max_length=200, unique=True)
    accounts = models.ManyToManyField(Account, related_name="groups", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


KEY_PREFIX_BYTES = 6
KEY_SECRET_BYTES = 32


def hash_key(plaintext: str) -> str:
    """SHA-256 of the whole key. Keys carry 256 random bits, so a fast hash is
    enough: there is nothing to brute-force that a slow hash would protect."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def key_prefix(plaintext: str) -> str | None:
    # The secret part is url-safe base64 and may itself contain "_".
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != "kp" or not parts[1] or not parts[2]:
        return None
    return parts[1]


def generate_key() -> tuple[str, str, str]:
    """A new key as (plaintext, prefix, hash). The prefix is a lookup index,
    not a secret; only the hash of the whole key is stored."""
    prefix = secrets.token_hex(KEY_PREFIX_BYTES)
    plaintext = f"kp_{prefix}_{secrets.token_urlsafe(KEY_SECRET_BYTES)}"
    return plaintext, prefix, hash_key(plaintext)


# Bounds on a key's model preferences: each listed name is compared on every
# dispatch for that model, and a hand-written mapping far past these is a mistake.
MAX_PREFERENCE_MODELS = 64
MAX_PREFERENCE_ACCOUNTS = 256
MAX_PREFERENCE_NAME_LENGTH = 200


def validate_model_preferences(value) -> None:
    """``{"model": ["account", ...]}``: a bounded object of lists of names."""
    if not isinstance(value, dict):
        raise ValidationError("Model preferences must be a JSON object of model name → list of account names.")
    if len(value) > MAX_PREFERENCE_MODELS:
        raise ValidationError(f"At most {MAX_PREFERENCE_MODELS} models may have preferences.")
    for model, names in value.items():
        # NUL: PostgreSQL's jsonb cannot store it (the save failed with a DataError).
        if not isinstance(model, str) or not model or len(model) > MAX_PREFERENCE_NAME_LENGTH or "\x00" in model:
            raise ValidationError(
                f"Model names must be strings of 1 to {MAX_PREFERENCE_NAME_LENGTH} characters, without NUL."
            )
        if not isinstance(names, list) or len(names) > MAX_PREFERENCE_ACCOUNTS:
            raise ValidationError(
                f"The preference of model {model[:50]!r} must be a list of at most {MAX_PREFERENCE_ACCOUNTS} names."
            )
        if not all(isinstance(n, str) and 0 < len(n) <= MAX_PREFERENCE_NAME_LENGTH and "\x00" not in n for n in names):
            raise ValidationError(
                f"Account names in the preference of model {model[:50]!r} must be strings of 1 to "
                f"{MAX_PREFERENCE_NAME_LENGTH} characters."
            )


class ApiKey(models.Model):
    """What a gateway authenticates with. The plaintext is shown once, at
    creation; only its prefix (for lookup) and hash are stored."""

    name = models.CharField(max_length=200, unique=True)
    prefix = models.CharField(max_length=32, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    enabled = models.BooleanField(default=True)
    account_group = models.ForeignKey(
        AccountGroup, on_delete=models.PROTECT, null=True, blank=True, related_name="api_keys"
    )
    route_strategy = models.CharField(max_length=10, choices=RouteStrategy.choices, default=RouteStrategy.AUTO)
    fixed_account = models.ForeignKey(
        Account, on_delete=models.PROTECT, null=True, blank=True, related_name="fixed_keys"
    )
    preferred_pool = models.CharField(max_length=20, choices=Pool.choices, default=Pool.BALANCED)
    latency_routing_enabled = models.BooleanField(default=True)
    max_concurrency = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    min_start_interval_ms = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(MAX_INTERVAL_MS)])
    # {"model name": ["account name", ...]}: accounts tried first for that model.
    model_preferences = models.JSONField(default=dict, blank=True, validators=[validate_model_preferences])
    # Whether dispatch responses for this key carry the account's credentials.
    # Off by default: most gateways hold their upstream secrets themselves.
    credentials_access = models.BooleanField(
        default=False,
        help_text="Include the chosen account's decrypted credentials in dispatch responses for this key.",
    )
    # How long a returning turn waits for its busy bound account before it
    # moves to another one; empty: KIROPOOL_STICKY_PATIENCE_MS.
    sticky_patience_ms = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="How long a returning conversation waits for its busy account before moving (ms). "
        "Empty: the server default.",
    )
    # The key's last start, for its optional pacing (its live leases hold
    # its ``slots``).
    last_started_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "API key"
        # Apart from change_apikey: a key with credentials access hands account
        # secrets to its gateway, which is more than configuring routing.
        permissions = [("grant_credentials_access", "Can create or change API keys with credentials access")]
        constraints = [
            _pool_check("preferred_pool", "apikey_preferred_pool_known"),
            models.CheckConstraint(
                condition=Q(route_strategy__in=RouteStrategy.values), name="apikey_route_strategy_known"
            ),
            models.CheckConstraint(
                condition=Q(route_strategy=RouteStrategy.AUTO) | Q(fixed_account__isnull=False),
                name="apikey_fixed_names_account",
            ),
            models.CheckConstraint(
                condition=Q(max_concurrency__isnull=True) | Q(max_concurrency__gte=1),
                name="apikey_max_concurrency_gte_1",
            ),
            models.CheckConstraint(condition=Q(min_start_interval_ms__gte=0), name="apikey_interval_gte_0"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def in_flight(self) -> int:
        """The key's leases holding one of its counted slots: the
        ``held_slots`` annotation when the query added it (``KeySlot.held``),
        else one count."""
        held = getattr(self, "held_slots", None)
        return held if held is not None else self.slots.filter(taken=True).count()

    def set_new_secret(self) -> str:
        """Give the key a fresh secret and return its plaintext (not saved)."""
        plaintext, self.prefix, self.key_hash = generate_key()
        return plaintext

    def is_usable(self, now=None) -> bool:
        return self.enabled and (self.expires_at is None or self.expires_at > (now or timezone.now()))


class KeySlot(models.Model):
    """One of an API key's concurrency slots: a lease counted on its key
    takes a free one (``Lease.key_slot``) and frees it when it ends.

    A row per slot rather than a count on the key: a claim takes any free
    slot, skipping those other transactions have locked, and a completion
    frees only its own, so one key's leases never queue on a single row
    (each would hold it through its commit's flush). Rows are made on
    demand up to the key's limit; ``number`` ≥ the limit are left after it
    is lowered and stay unused."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="slots", db_index=False)
    number = models.PositiveIntegerField()
    taken = models.BooleanField(default=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["api_key", "number"], name="keyslot_key_number_unique")]

    def __str__(self) -> str:
        return f"{self.api_key_id}#{self.number}"

    @staticmethod
    def held() -> models.Count:
        """The ``held_slots`` annotation of an ``ApiKey`` query."""
        return models.Count("slots", filter=Q(slots__taken=True))
