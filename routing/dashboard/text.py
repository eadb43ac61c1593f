"""Readable numbers and moments for the dashboards: spans, "ago", milliseconds,
credits. Pure functions of their arguments."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from routing.readiness import cooldown_remaining


def duration_text(seconds: float, *, coarse: bool = False) -> str:
    """A span for people: '45 s', '4 min 12 s', '3 h 5 min', '2 d 4 h'.

    Rounded up, so a cooldown never reads '0 s' while it still holds;
    ``coarse`` rounds down and drops the seconds past a minute, for "ago"."""
    seconds = max(0, int(seconds) if coarse else math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs and not coarse else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ago_text(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = (now - when).total_seconds()
    if seconds < 0:
        return f"in {duration_text(-seconds)}"
    if seconds < 5:
        return "just now"
    return f"{duration_text(seconds, coarse=True)} ago"


def ms_text(ms: float | None) -> str:
    if ms is None or not math.isfinite(ms):
        return "—"
    if ms >= 10_000:
        return f"{ms / 1000:,.1f} s"
    return f"{ms:,.0f} ms"


def credits_text(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 1000 else f"{value:,.2f}"


@dataclass(frozen=True, slots=True)
class Moment:
    """A timestamp shown relative to now, with the exact time on hover."""

    text: str
    iso: str | None

    @classmethod
    def of(cls, when: datetime | None, now: datetime) -> Moment:
        return cls(ago_text(when, now), when.isoformat(timespec="seconds") if when else None)


@dataclass(frozen=True, slots=True)
class Left:
    """Time left until a moment, or nothing when it has passed."""

    text: str
    seconds: float
    until_iso: str

    @classmethod
    def of(cls, until: datetime | None, now: datetime) -> Left | None:
        remaining = cooldown_remaining(until, now)
        if remaining is None:
            return None
        return cls(
            duration_text(remaining.total_seconds()), remaining.total_seconds(), until.isoformat(timespec="seconds")
        )
