"""Request rates as the settings write them: ``"<count>/<s|min|h|d>"``.

Pure (no app is loaded for it): the settings check theirs as they load, so
a bad rate stops every process at startup rather than the first request
that needs it (``accounts/throttling.py``, ``routing/completions.py``).
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate: str) -> tuple[int, int] | None:
    """``"60/min"`` → (60, 60); empty → None. Raises ImproperlyConfigured."""
    rate = (rate or "").strip()
    if not rate:
        return None
    count, _, period = rate.partition("/")
    try:
        requests = int(count)
        seconds = PERIODS[period.strip().lower()[:1]]
    except (ValueError, KeyError, IndexError):
        raise ImproperlyConfigured(f"rate {rate!r} is not <count>/<s|min|h|d>, e.g. 60/min") from None
    if requests < 1:
        raise ImproperlyConfigured(f"rate {rate!r} must allow at least one request")
    return requests, seconds


def rates_require(rates: dict[str, str]) -> None:
    """Raise ImproperlyConfigured, naming the setting, for the first bad rate."""
    for name, rate in rates.items():
        try:
            parse_rate(rate)
        except ImproperlyConfigured as exc:
            raise ImproperlyConfigured(f"kiropool refuses to start: {name}: {exc}") from None
