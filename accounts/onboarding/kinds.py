"""The four kinds an onboarding file holds, in the order they are written.

Only what an operator edits travels: names, limits, references and, on import
only, credentials. Never the dispatcher's state (in-flight and binding
counters, last started, cooldowns, quota state) nor reported figures
(remaining credits): an old file imported back must not roll them back.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Model

from accounts.models import Account, AccountGroup, Proxy, RoutingIdentity
from accounts.onboarding.columns import (
    Boolean,
    Choice,
    Column,
    Credentials,
    Integer,
    Names,
    ProxyUrl,
    Reference,
    Text,
)

# Named in an error when a file carries them, so nobody wonders why they were ignored.
STATE_FIELDS = frozenset(
    {
        "in_flight",
        "binding_rows",
        "last_started_at",
        "cooldown_until",
        "cooldown_reason",
        "quota_exhausted",
        "quota_exhausted_at",
        "quota_exhausted_reason",
        "remaining_credits",
        "live_sessions",
        "created_at",
        "id",
    }
)


@dataclass(frozen=True, slots=True)
class Kind:
    key: str  # the JSON key, and the CSV file's name
    label: str
    model: type[Model]
    columns: tuple[Column, ...]

    @property
    def by_name(self) -> dict[str, Column]:
        return {c.name: c for c in self.columns}

    @property
    def exported(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.export is not None)

    @property
    def singular(self) -> str:
        return self.model._meta.verbose_name


NAME = Text("name", "name", "name")

IDENTITIES = Kind(
    "identities",
    "routing identities",
    RoutingIdentity,
    (
        NAME,
        Integer("max_concurrency", "max_concurrency", "max_concurrency"),
        Integer("min_start_interval_ms", "min_start_interval_ms", "min_start_interval_ms"),
    ),
)
PROXIES = Kind("proxies", "proxies", Proxy, (NAME, ProxyUrl("url", "url", "url")))
ACCOUNTS = Kind(
    "accounts",
    "accounts",
    Account,
    (
        NAME,
        Reference("identity", "identity", "identity__name"),
        Reference("proxy", "proxy", "proxy__name", nullable=True),
        Choice("pool", "pool", "pool"),
        Boolean("enabled", "enabled", "enabled"),
        Text("region", "region", "region"),
        Text("profile_arn", "profile_arn", "profile_arn"),
        Credentials("credentials", "credentials", None),
    ),
)
GROUPS = Kind("groups", "account groups", AccountGroup, (NAME, Names("accounts", "accounts", "accounts__name")))

# Dependency order: what a row references is written before it.
KINDS: dict[str, Kind] = {k.key: k for k in (IDENTITIES, PROXIES, ACCOUNTS, GROUPS)}
KIND_BY_MODEL: dict[type[Model], Kind] = {k.model: k for k in KINDS.values()}
# Which kind a reference column names.
REFERENCED = {"identity": IDENTITIES, "proxy": PROXIES, "accounts": ACCOUNTS}
